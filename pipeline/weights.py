"""Reading weight files: one reader and one error for every model of the pipeline (DINO and DINOv2 ViTs,
DINO ResNet-50 backbones and the detectors' ResNet-50 initialisation).

Accepted forms, normalised to the model's own key names: a plain state dict (the official DINO or DINOv2
release, torchvision or timm format); DINO's full training checkpoint (``{"teacher", "student", ...}``:
the teacher is used); a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper; ``module.`` (DDP) and
``backbone.`` prefixes are stripped; projection/classifier heads (``head.*``, and ``fc.*`` for a
ResNet) are dropped. Anything else raises :class:`WeightsError` naming the file.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import torch

_WRAPPERS = ("teacher", "state_dict", "model")
_PREFIXES = ("module.", "backbone.")


class WeightsError(ValueError):
    """Weights could not be found, fetched, read or loaded; the message names the file and the fix."""


def read_checkpoint(path: str | os.PathLike, hint: str = "") -> Mapping:
    """``torch.load`` safely (weights only; argparse.Namespace allowed for DINO's ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}. {hint}".strip())
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure of a foreign/corrupt file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"cannot read weights file {path}: {msg}. Expected a PyTorch state dict (.pth) such as "
                           f"the official DINO release. {hint}".strip()) from None


def normalise_state_dict(obj: Mapping, family: str, path: str | os.PathLike = "<memory>") -> dict[str, torch.Tensor]:
    """Unwrap / strip prefixes / drop heads (``family``: "vit" or "resnet"), giving the model's key names."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict.")
    for key in _WRAPPERS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    drop = ("head.", "fc.") if family == "resnet" else ("head.",)
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"weights file {path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                               "expected a state dict or a DINO checkpoint with a 'teacher' entry.")
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if not k.startswith(drop):
            out[k] = v
    return out


def read_state_dict(path: str | os.PathLike, family: str, hint: str = "") -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` + :func:`normalise_state_dict`."""
    return normalise_state_dict(read_checkpoint(path, hint), family, path)
