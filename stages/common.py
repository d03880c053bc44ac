"""What every stage entry point shares: config -> device, backbone, dataset, banners, manifests.

This is the only place (with the other ``stages/*.py``) that knows about Hydra/OmegaConf; the library in
``pipeline/`` only sees plain arguments.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import runtime
from pipeline.lifecycle import Produced  # noqa: F401 - what a stage's work returns to run_stage
from pipeline.runtime import warn_random


class StageError(Exception):
    """What a stage says when it cannot go on: one ``error:`` line (naming the config key, file or stage and
    the fix) and exit code 2. Raised by the stages; :func:`run_guarded` prints it."""


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dict (what manifests and artifact ``info`` record)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def resolve_device(name: str) -> str:
    """``device=``: :func:`pipeline.runtime.resolve_device`, its refusal as a :class:`StageError`."""
    try:
        return runtime.resolve_device(name)
    except ValueError as e:
        raise StageError(str(e)) from None


def dataset_identity(cfg: DictConfig) -> dict:
    """:func:`pipeline.data.settings.dataset_identity` of the configured dataset."""
    from pipeline.data.settings import dataset_identity as identity

    return identity(to_container(cfg.dataset))


def build_backbone_from_cfg(cfg: DictConfig, device: str, quiet: bool = False, arch: str | None = None):
    """The configured backbone (``arch``: an ensemble's member, its default weights). ``backbone.init=auto`` (``make
    demo``) tries the real weights and falls back, loudly, to random weights when they cannot be found or downloaded."""
    from pipeline.backbones import WeightsError, build_backbone

    b, arch = cfg.backbone, arch or cfg.backbone.arch
    kwargs = dict(weights=b.get("weights") if arch == b.arch else None, weights_dir=cfg.paths.weights_dir,
                  seed=int(b.get("seed", 0)), device=device, precision=str(b.get("precision", "fp32")),
                  force_precision=bool(b.get("force_precision", False)), compile=bool(b.get("compile", False)))
    init = str(b.get("init", "pretrained"))
    if init == "auto":
        try:
            return build_backbone(arch, init="pretrained", **kwargs)
        except WeightsError as e:
            warn_random(f"backbone {arch}", f"backbone.init=auto and no weights: {e}")
            return build_backbone(arch, init="random", **kwargs)
    try:
        backbone = build_backbone(arch, init=init, **kwargs)
    except WeightsError:
        raise
    except ValueError as e:  # e.g. the precision refused on this device
        from stages.checks import in_config_keys

        raise StageError(in_config_keys(str(e), "mine")) from None
    if init == "random" and not quiet:
        warn_random(f"backbone {arch}", "backbone.init=random")
    return backbone


def coco_image_root(cfg: DictConfig, coco: dict, *, override=None, fallback: Path | None = None) -> Path:
    """:func:`pipeline.data.paths.box_file_image_root` with the configured dataset's image root."""
    from pipeline.data.paths import box_file_image_root, records_root

    return box_file_image_root(coco, override=override, fallback=fallback,
                               dataset_root=lambda: records_root(build_dataset_from_cfg(cfg).records))


def build_dataset_from_cfg(cfg: DictConfig, quiet: bool = False):
    from pipeline.data import build_dataset

    d = cfg.dataset
    ds = build_dataset(
        d.kind, str(d.root), image_set=d.image_set or "trainval", ann_file=d.ann_file, image_dir=d.image_dir,
        list_file=d.list_file, name=d.name, max_images=d.max_images,
    )
    for note in [] if quiet else ds.skipped_notes():
        print(note, flush=True)
    return ds


def run_guarded(fn, cfg: DictConfig) -> Any:
    """Turn the library's clear errors into a one-line message and exit code 2 (no deep traceback)."""
    from pipeline.artifacts import ArtifactError
    from pipeline.data import DatasetError
    from pipeline.journal import JournalMismatch
    from pipeline.parallel import WorkerError
    from pipeline.weights import WeightsError

    from stages.checks import in_config_keys

    expected = (StageError, ArtifactError, FileNotFoundError, JournalMismatch, WeightsError, DatasetError,
                WorkerError)
    try:
        return fn(cfg)
    except expected as e:  # the library names parameters; the user sets config keys
        stage = getattr(fn, "__module__", "").rpartition(".")[2]
        print(f"error: {e if isinstance(e, StageError) else in_config_keys(str(e), stage)}", file=sys.stderr,
              flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted: what was finished is kept; the same command resumes.", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run_stage(cfg: DictConfig, *, force: bool | None = None, **kw) -> dict | None:
    """:func:`pipeline.lifecycle.run_stage` in ``cfg.stage_dir`` with the resolved config in the manifest and
    ``force`` from the config unless given."""
    from pipeline.lifecycle import run_stage as life_cycle

    return life_cycle(Path(cfg.stage_dir), config=to_container(cfg), force=bool(cfg.force) if force is None else force,
                      redo_hint="FORCE=1 redoes it", **kw)
