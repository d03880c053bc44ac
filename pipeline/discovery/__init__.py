"""Object discovery on one image: features in, result out; no I/O.

Methods: LOST (:func:`lost`), DINO-seg (:func:`dinoseg`). :func:`build_miner` gives any of them behind one
interface (:class:`Miner`: what it needs from the backbone, parameters checked once, ranked boxes out).
"""
from __future__ import annotations

from pipeline.discovery.dinoseg import DinoSegResult, dinoseg
from pipeline.discovery.lost import LostResult, lost
from pipeline.discovery.miners import MINERS, MinedBox, Miner, Needs, boxes_of, build_miner

__all__ = ["lost", "dinoseg", "LostResult", "DinoSegResult", "Miner", "Needs", "MinedBox", "MINERS",
           "build_miner", "boxes_of", "run_miner"]


def run_miner(name: str, feature_output, image_size, /, **params):
    """Run miner ``name`` once on the first image of a backbone's ``feature_output`` (``params`` must hold
    ``patch_size``). For many images build the miner once with :func:`build_miner`."""
    params = dict(params)
    if "patch_size" not in params:
        raise ValueError(f"run_miner({name!r}): pass patch_size (the backbone's patch size) in params")
    return build_miner(name, params.pop("patch_size"), **params)(feature_output, image_size)
