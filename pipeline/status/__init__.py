"""The state of each stage of a dataset/backbone: the one answer that `make status` and `make report` give.

:mod:`~pipeline.status.states` decides (done, partial, failed, stale, missing), :mod:`~pipeline.status.commands`
says what to run, :mod:`~pipeline.status.tree` finds a copied tree's own inputs. Where the stages are is the
caller's :class:`pipeline.layout.Layout` (the config's ``dirs`` map)."""
from pipeline.status.commands import SELECTOR_DEFAULTS, default_args, format_status, next_command
from pipeline.status.states import (STAGES, StageState, annotations_digest, dataset_facts, pipeline_status,
                                    stage_state)

__all__ = ["SELECTOR_DEFAULTS", "STAGES", "StageState", "annotations_digest", "dataset_facts", "default_args",
           "format_status", "next_command", "pipeline_status", "stage_state"]
