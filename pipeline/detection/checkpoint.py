"""Detector checkpoints: what a trained detector is (:class:`DetectorSpec`), saving and loading them.

One file, ``model.pt``, written by the trainer's :class:`Checkpointer` (atomically: a killed run leaves
the previous checkpoint) and read back by :func:`load_detector`. Its fields::

    {"format": "lost-pipeline/detector-v1",
     "spec": DetectorSpec as a dict (how to rebuild the network, its classes and initialisation),
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "iteration": iterations done, "schedule": the Schedule as a dict (its ``iterations`` = the target),
     "rng": {"torch", "numpy", "python", "cuda"} states at ``iteration`` (exact resume),
     "artifact_config": what decided the weights (config sections + input hash; compared on reruns),
     "provenance": how it was made (stage, input path, random-weight origin), not compared}

Only this format is read; checkpoints of earlier versions of the pipeline (``config``/``detector_info``
fields) are refused with a message saying to retrain (loading them is out of scope).
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import ArtifactError, atomic_path, sha256_file
from pipeline.detection.settings import DetectorSettings

FORMAT = "lost-pipeline/detector-v1"
_TOP = ("preset", "init", "weights")  # settings stored beside ``build`` in the checkpoint's spec


@dataclass
class DetectorSpec:
    """Everything needed to rebuild a trained detector and read its outputs.

    ``settings``: how it is built (:class:`~pipeline.detection.settings.DetectorSettings`, or a preset name for
    that preset's defaults); ``seed``: its random initialisation; ``weights_sha256``: the file its weights
    started from (``init="random"``: none). ``category_ids[label - 1]`` / ``category_names[label - 1]``: the
    COCO category of the model's label ``label`` (1..num_classes).

    Stored in ``model.pt`` as ``{"preset", "num_classes", "init", "weights", "weights_sha256", "build": the
    other settings and the seed, "category_ids", "category_names"}`` (:meth:`to_dict`, :meth:`from_dict`).
    """
    settings: DetectorSettings
    num_classes: int
    seed: int = 0
    weights_sha256: str | None = None
    category_ids: list[int] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.settings, str):
            self.settings = DetectorSettings(preset=self.settings)
        if not self.category_ids:
            self.category_ids = list(range(1, int(self.num_classes) + 1))
        if len(self.category_ids) != int(self.num_classes):
            raise ValueError(f"{len(self.category_ids)} category ids for {self.num_classes} classes")

    @classmethod
    def create(cls, settings: DetectorSettings, num_classes: int, *, seed: int = 0, category_ids=None,
               category_names=None) -> "DetectorSpec":
        """The spec of a detector about to be trained: the weights file's sha256 is computed when there is one
        (no file is kept with ``init="random"``)."""
        weights = None if settings.init == "random" or settings.weights is None else str(settings.weights)
        sha = sha256_file(weights) if weights and Path(weights).is_file() else None
        return cls(replace(settings, weights=weights), int(num_classes), int(seed), sha, list(category_ids or []),
                   list(category_names or []))

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorSpec":
        known = {"num_classes", "weights_sha256", "build", "category_ids", "category_names", *_TOP}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DetectorSpec field(s) {unknown}")
        build = dict(d.get("build") or {})
        seed = build.pop("seed", 0)
        names = {f.name for f in fields(DetectorSettings)} - set(_TOP)
        unknown = sorted(set(build) - names)
        if unknown:
            raise ValueError(f"unknown detector build argument(s) {unknown}; known: {', '.join(sorted(names))}")
        settings = DetectorSettings(**{k: d[k] for k in _TOP if k in d}, **build)
        return cls(settings, int(d["num_classes"]), seed, d.get("weights_sha256"), list(d.get("category_ids") or []),
                   list(d.get("category_names") or []))

    def to_dict(self) -> dict:
        s = asdict(self.settings)
        build = {k: v for k, v in s.items() if k not in _TOP}
        return {"preset": s["preset"], "num_classes": self.num_classes, "init": s["init"],
                "weights": s["weights"], "weights_sha256": self.weights_sha256, "build": {**build, "seed": self.seed},
                "category_ids": list(self.category_ids), "category_names": list(self.category_names)}

    @property
    def preset(self) -> str:
        return self.settings.preset

    @property
    def init(self) -> str:
        return self.settings.init

    @property
    def weights(self) -> str | None:
        return self.settings.weights

    @property
    def random_init(self) -> bool:
        return self.init == "random"

    def build_model(self, *, pretrained: bool = True) -> torch.nn.Module:
        """The network: initialised as the spec says (``pretrained=False``: random, to load trained weights
        into; no weights file needed)."""
        from pipeline.detection.builders import build_detector

        settings = self.settings if pretrained else replace(self.settings, init="random", weights=None)
        return build_detector(settings, self.num_classes, seed=self.seed)


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, hint: str = "", *, mmap: bool = False) -> dict:
    """The checkpoint dict at ``path``; :class:`ArtifactError` (naming the file and ``hint``) when it is
    missing, unreadable or not a ``lost-pipeline/detector-v1`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"detector checkpoint not found: {path}. {hint}".strip())
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ArtifactError(f"cannot read detector checkpoint {path} ({type(e).__name__}: {e}). {hint}".strip()) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or not ckpt.get("spec"):
        raise ArtifactError(f"{path} is not a {FORMAT} detector checkpoint (written by an older version of the "
                            f"pipeline, or not by train-cag/train-cad); it has to be retrained. {hint}".strip())
    return ckpt


def checkpoint_complete(ckpt: dict) -> bool:
    """Whether the checkpoint's run reached its schedule's last iteration."""
    target = (ckpt.get("schedule") or {}).get("iterations")
    return target is not None and int(ckpt.get("iteration", 0)) >= int(target)


def load_detector(path: str | os.PathLike, hint: str = "") -> tuple[torch.nn.Module, DetectorSpec, dict]:
    """``(model in eval mode, spec, meta)`` from a detector checkpoint.

    The network is rebuilt from ``spec`` (no pretrained file needed) and the trained weights loaded;
    frozen vs. trainable batch norms differ only by ``num_batches_tracked`` (same inference). ``meta``:
    ``{"path", "iteration", "complete", "schedule", "artifact_config", "provenance"}``.
    """
    ckpt = read_checkpoint(path, hint)
    try:
        spec = DetectorSpec.from_dict(ckpt["spec"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable detector spec ({e}). {hint}".strip()) from None
    model = spec.build_model(pretrained=False)
    res = model.load_state_dict(ckpt["model"], strict=False)
    bad = [k for k in [*res.missing_keys, *res.unexpected_keys] if not k.endswith("num_batches_tracked")]
    if bad:
        raise ArtifactError(f"{path}: weights do not fit the {spec.preset} detector it describes "
                            f"({len(bad)} keys, e.g. {bad[:3]}); it has to be retrained. {hint}".strip())
    meta = {"path": str(path), "iteration": int(ckpt.get("iteration", 0)), "complete": checkpoint_complete(ckpt),
            "schedule": ckpt.get("schedule") or {}, "artifact_config": ckpt.get("artifact_config") or {},
            "provenance": ckpt.get("provenance") or {}}
    return model.eval(), spec, meta


def init_weights(model: torch.nn.Module, path: str | os.PathLike, hint: str = "") -> None:
    """Start ``model`` from the trained weights of the detector checkpoint at ``path`` (a self-training round
    from the previous round's model): the same preset and classes, or an :class:`ArtifactError` naming both."""
    ckpt = read_checkpoint(path, hint)
    try:
        res = model.load_state_dict(ckpt["model"], strict=False)
        bad = [k for k in [*res.missing_keys, *res.unexpected_keys] if not k.endswith("num_batches_tracked")]
    except RuntimeError as e:  # shapes differ (another number of classes)
        bad = [line.strip() for line in str(e).splitlines()[1:]]
    if bad:
        raise ArtifactError(f"{path}: its weights do not fit this detector ({len(bad)} keys, e.g. {bad[:3]}; it is "
                            f"a {ckpt['spec'].get('preset')} with {ckpt['spec'].get('num_classes')} class(es)). "
                            f"{hint}".strip())


# --------------------------------------------------------------------------- writing
class Checkpointer:
    """Saves and restores a training run's state in one file (atomically), RNG states included.

    ``spec``, ``schedule`` (a dict), ``artifact_config`` and ``provenance`` are stored with every save;
    :meth:`restore` puts model/optimizer/scheduler/scaler back and returns ``(iteration, rng state)``.
    """

    def __init__(self, path: str | os.PathLike, *, spec: DetectorSpec | None = None, schedule: dict | None = None,
                 artifact_config: dict | None = None, provenance: dict | None = None) -> None:
        self.path = Path(path)
        self.spec, self.schedule = spec, dict(schedule or {})
        self.artifact_config, self.provenance = dict(artifact_config or {}), dict(provenance or {})

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, model, optimizer, scheduler, scaler, iteration: int) -> Path:
        state = {"format": FORMAT, "spec": self.spec.to_dict() if self.spec is not None else None,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": int(iteration),
                 "schedule": self.schedule, "rng": rng_state(), "artifact_config": self.artifact_config,
                 "provenance": self.provenance}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(state, tmp)
        return self.path

    def restore(self, model, optimizer, scheduler, scaler) -> tuple[int, dict]:
        ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ArtifactError(f"cannot resume from {self.path}: not a {FORMAT} checkpoint (an older version of "
                                "the pipeline wrote it); it has to be trained again from the start")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        return int(ckpt["iteration"]), ckpt["rng"]
