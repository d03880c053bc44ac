"""Where weights came from: one rule for "this result rests on random weights" (a smoke test, not a result).

A result is *random* when the network that made it started from random weights, or when what it learnt
from (pseudo-boxes, pseudo-labels) was made by a randomly initialised backbone. The sources:

- a backbone description (``Backbone.describe()``: ``{"init": "random" | "pretrained", ...}``);
- a COCO file's ``info`` written by mine (``info.random_init``) or cluster (``info.clustering.random_init``);
- a detector checkpoint: its spec (``init``) and its provenance (``boxes_random_init``).
"""
from __future__ import annotations

from typing import Any, Mapping


def _init_is_random(obj: Any) -> bool:
    if obj is None:
        return False
    init = obj.get("init") if isinstance(obj, Mapping) else getattr(obj, "init", None)
    return str(init) == "random"


def coco_random_init(coco: Mapping | None) -> bool:
    """Whether a COCO box/label file says a random-weight backbone made it."""
    info = (coco or {}).get("info") or {}
    return bool(info.get("random_init") or (info.get("clustering") or {}).get("random_init"))


def random_init(*, backbone: Any = None, coco: Mapping | None = None, spec: Any = None,
                provenance: Mapping | None = None) -> bool:
    """True when any given source says random weights (see the module docstring).

    ``backbone``: a backbone description (dict or object with ``init``); ``coco``: a COCO json dict;
    ``spec``: a :class:`~pipeline.detection.checkpoint.DetectorSpec` (or its dict); ``provenance``:
    a checkpoint's provenance dict (``boxes_random_init``/``random_init``).
    """
    prov = provenance or {}
    return (_init_is_random(backbone) or coco_random_init(coco) or _init_is_random(spec)
            or bool(prov.get("boxes_random_init")) or bool(prov.get("random_init")))
