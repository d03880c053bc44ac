"""Finding and loading DINO weights: explicit file, weights dir, torch.hub cache, official URL.

Files are read by :mod:`pipeline.weights` (the forms it accepts) and loaded with ``strict=True``: any
missing, unexpected or wrongly shaped key raises :class:`WeightsError` naming keys and file.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import hub, nn

from pipeline.backbones.specs import ArchSpec
from pipeline.weights import WeightsError, read_state_dict

_SHOW = 5


def _overrides(spec: ArchSpec) -> str:
    return (f"Fix: pass weights=/path/to/{spec.weights_file}, or weights_dir=<dir holding "
            f"{spec.weights_file}>, or init=random for a smoke run (no real results).")


def default_cache_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(hub.get_dir()) / "checkpoints"


def resolve_weights(spec: ArchSpec, weights: str | os.PathLike | None = None,
                    weights_dir: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the weights file: ``weights`` > ``weights_dir/<file>`` > cache > download into cache."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file for {spec.arch} not found: {path}. Pass weights=<an existing .pth "
                               f"file> (official: {spec.url}), or init=random for a smoke run.")
        return path
    candidates = []
    if weights_dir is not None:
        candidates.append(Path(weights_dir).expanduser() / spec.weights_file)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / spec.weights_file
    candidates.append(target)
    for path in candidates:
        if path.is_file():
            return path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        hub.download_url_to_file(spec.url, str(target), progress=True)  # temp file + rename: atomic
    except Exception as e:  # offline, HTTP error, read-only cache...
        looked = " or ".join(str(p) for p in candidates)
        raise WeightsError(
            f"no weights for {spec.arch}: expected file {looked} is absent and downloading {spec.url} "
            f"into {target} failed ({type(e).__name__}: {e}). {_overrides(spec)}") from None
    if not target.is_file():
        raise WeightsError(f"download of {spec.url} did not produce {target}. {_overrides(spec)}")
    return target


def load_weights(model: nn.Module, spec: ArchSpec, path: str | os.PathLike) -> None:
    """Load ``path`` into ``model`` exactly (strict); mismatches raise :class:`WeightsError`."""
    sd = read_state_dict(path, spec.family)
    own = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints from old PyTorch lack it)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            problems.append(f"{name}: {', '.join(items[:_SHOW])}{more}")
    if problems:
        raise WeightsError(f"weights file {path} does not fit {spec.arch} ({spec.model_name}): "
                           + "; ".join(problems) + f". Use the official file {spec.url} or a matching "
                           f"checkpoint for this arch (arch=<arch> must match the weights).")
    model.load_state_dict(sd, strict=True)
