"""Loading a torchvision-format ResNet-50 state dict (DINO or ImageNet) into a detector.

The file is read by :mod:`pipeline.weights` (so a DINO training checkpoint's teacher loads here exactly as
into the DINO ResNet-50 backbone, heads and ``fc`` dropped). The official DINO ResNet-50 checkpoint
(``https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth``) is the
``state_dict`` of a ``torchvision.models.resnet50`` without the ``fc`` layer: keys ``conv1.weight``,
``bn1.*``, ``layer{1..4}.{block}.{conv,bn}{1..3}.*``, ``layer{1..4}.0.downsample.{0,1}.*``.
Each preset maps those names into its own module tree with a prefix table; every key of the
checkpoint other than ``fc.*`` must land on a parameter or buffer of the model, and every
ResNet parameter/buffer of the model must be filled (``num_batches_tracked`` excepted), otherwise
a :class:`WeightsError` names the keys and the file.
"""
from __future__ import annotations

import os

import torch

from pipeline.weights import WeightsError, read_state_dict

__all__ = ["WeightsError", "load_resnet50_weights", "map_keys", "INIT_URLS"]

DINO_RESNET50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
IMAGENET_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
INIT_URLS = {"dino": DINO_RESNET50_URL, "imagenet": IMAGENET_RESNET50_URL}
_OPTIONAL_TARGET_SUFFIX = ("num_batches_tracked",)


def map_keys(sd: dict[str, torch.Tensor], prefix_map: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``sd`` keys by their first matching source prefix; returns (mapped, unmappable keys)."""
    mapped, unknown = {}, []
    for k, v in sd.items():
        for src, dst in prefix_map.items():
            if k.startswith(src):
                mapped[dst + k[len(src):]] = v
                break
        else:
            unknown.append(k)
    return mapped, unknown


def _fmt(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_resnet50_weights(model: torch.nn.Module, path: str | os.PathLike, prefix_map: dict[str, str]) -> dict:
    """Load a torchvision-format ResNet-50 checkpoint into ``model`` via ``prefix_map``.

    ``prefix_map`` maps checkpoint prefixes (``"conv1."``, ``"layer4."``...) to model prefixes; the
    model keys under those target prefixes are the ones that must be filled. Returns a summary
    ``{"path", "loaded": n}`` (``fc`` and DINO head keys are dropped by the reader).
    """
    sd = read_state_dict(path, "resnet", hint=f"Download it (DINO ResNet-50: {DINO_RESNET50_URL}) and pass its path "
                         "with detector.weights=/path/to/file.pth")
    mapped, unknown = map_keys(sd, prefix_map)
    target = model.state_dict()
    # frozen batch norms have no step counter: the file's counters have nowhere to go and carry nothing
    mapped = {k: v for k, v in mapped.items() if k in target or not k.endswith(_OPTIONAL_TARGET_SUFFIX)}
    owned = [k for k in target if k.startswith(tuple(prefix_map.values()))]
    unexpected = unknown + [k for k in mapped if k not in target]
    missing = [k for k in owned if k not in mapped and not k.endswith(_OPTIONAL_TARGET_SUFFIX)]
    if unexpected or missing:
        msg = [f"weights file {path} is not a torchvision-format ResNet-50 state dict (as the official DINO "
               f"ResNet-50 checkpoint {DINO_RESNET50_URL} is):"]
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if missing:
            inv = {v: k for k, v in prefix_map.items()}
            names = [next((inv[p] + k[len(p):] for p in inv if k.startswith(p)), k) for k in missing]
            msg.append(f"missing keys ({len(missing)}): {_fmt(names)}")
        raise WeightsError("\n  ".join(msg))
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in mapped.items()
           if v.shape != target[k].shape]
    if bad:
        raise WeightsError(f"weights file {path}: shape mismatch for {len(bad)} tensors: {_fmt(bad, 4)}")
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return {"path": str(path), "loaded": len(mapped)}
