"""Object discovery on one image: LOST and DINO-seg. Features in, result out; no I/O."""
from __future__ import annotations

import inspect

from pipeline.discovery.dinoseg import DinoSegResult, dinoseg
from pipeline.discovery.lost import LostResult, lost

__all__ = ["lost", "dinoseg", "LostResult", "DinoSegResult", "run_miner", "MINERS"]

MINERS = {"lost": lost, "dinoseg": dinoseg}


def run_miner(name: str, feature_output, image_size, /, **params) -> LostResult | DinoSegResult:
    """Run miner ``name`` on the first image of a backbone's ``feature_output``.

    ``feature_output`` has ``.feats`` (B, N, D), ``.dims`` (h, w) and ``.cls_attn`` (B, heads, N)
    or None. ``params`` must hold ``patch_size`` and may hold the miner's options (``k_patches``
    for lost; ``head``, ``mass`` for dinoseg); a ``name`` key equal to ``name`` and a ``stage`` key
    (the config's output directory) are ignored, so a whole miner config can be splatted in.
    """
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; known miners: {sorted(MINERS)} (set miner=<name>)")
    params = dict(params)
    params.pop("stage", None)
    other = params.pop("name", name)
    if other != name:
        raise ValueError(f"run_miner: params name {other!r} disagrees with miner {name!r}")
    if "patch_size" not in params:
        raise ValueError(f"run_miner({name!r}): pass patch_size (the backbone's patch size) in params")
    fn = MINERS[name]
    allowed = [k for k in inspect.signature(fn).parameters if k not in ("feats", "cls_attn", "dims", "image_size")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"run_miner({name!r}): unknown parameter(s) {unknown}; accepted: {allowed}")
    if name == "lost":
        return lost(feature_output.feats[0], feature_output.dims, image_size=image_size, **params)
    attn = getattr(feature_output, "cls_attn", None)
    if attn is None:
        raise ValueError(
            "miner 'dinoseg' needs the CLS attention of the last block, but the backbone returned none "
            "(cls_attn is None); use a DINO ViT backbone and ask it for CLS attention, or use miner=lost"
        )
    return dinoseg(attn[0], feature_output.dims, image_size=image_size, **params)
