"""DINO-seg on hand-made attention maps, plus a naive loop implementation on random maps."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.discovery import DinoSegResult, dinoseg, run_miner
from pipeline.discovery.dinoseg import attention_mass_mask

ROOT = Path(__file__).resolve().parents[1]


def grid_attn(values: dict, h: int, w: int, rest: float = 0.1, heads: int = 1, head: int = 0) -> torch.Tensor:
    """(heads, h*w) attention: ``rest`` everywhere, ``values[(y, x)]`` on the listed cells of ``head``."""
    a = torch.full((heads, h * w), rest)
    for (y, x), v in values.items():
        a[head, y * w + x] = v
    return a


# ---------------------------------------------------------------- hand cases
def test_largest_component_is_the_last_label():
    # 4x4 grid: A = 2 patches of 10 at the top (label 1), B = 3 patches of 5 on row 2 (label 2),
    # 11 patches of 0.1 (1.1). Total 36.1; ascending cumsum: 1.1, 6.1, 11.1, 16.1, 26.1, 36.1.
    # mass 0.9 keeps cumsum > 3.61: all of A and B. B is larger; the reference, which never
    # considers the last label, would return A.
    attn = grid_attn({(0, 0): 10, (0, 1): 10, (2, 1): 5, (2, 2): 5, (2, 3): 5}, 4, 4)
    res = dinoseg(attn, (4, 4), 16, (64, 64), head=0, mass=0.9)
    assert res.box.tolist() == [16.0, 32.0, 64.0, 48.0]
    assert res.mask.sum() == 3 and res.mask[2, 1:].all()
    assert res.score == pytest.approx(15 / 36.1)


def test_single_component_is_not_the_background():
    # a 2x2 block of 10s, 26 cells of 0.1: total 42.6, ascending cumsum 2.6, 12.6, 22.6, ...;
    # mass 0.8 keeps cumsum > 8.52: exactly the block (one component). The reference would take
    # label 0 (the background) and return the box of everything else.
    attn = grid_attn({(1, 2): 10, (1, 3): 10, (2, 2): 10, (2, 3): 10}, 5, 6)
    res = dinoseg(attn, (5, 6), 8, (40, 48), head=0, mass=0.8)
    assert res.box.tolist() == [16.0, 8.0, 32.0, 24.0]
    assert res.mask.sum() == 4


def test_mass_threshold():
    # 1x4 strip [1, 2, 3, 4] (total 10): ascending cumsum of the normalised values 0.1, 0.3, 0.6, 1.0
    attn = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = {0.35: [3], 0.6: [2, 3], 0.75: [1, 2, 3], 0.95: [0, 1, 2, 3]}
    for mass, kept in expected.items():
        assert torch.nonzero(attention_mass_mask(attn[0], mass)).ravel().tolist() == kept, mass
        res = dinoseg(attn, (1, 4), 16, (16, 64), head=0, mass=mass)
        assert res.box.tolist() == [16.0 * kept[0], 0.0, 16.0 * (kept[-1] + 1), 16.0], mass
    # strict ">": [1, 1, 2] normalised cumsum 0.25, 0.5, 1.0; with mass 0.5 the 0.5 (exact) is dropped
    assert torch.nonzero(attention_mass_mask(torch.tensor([1.0, 1.0, 2.0]), 0.5)).ravel().tolist() == [2]
    # order matters, not position: the same values shuffled keep the same values
    shuffled = torch.tensor([3.0, 1.0, 4.0, 2.0])
    assert torch.nonzero(attention_mass_mask(shuffled, 0.6)).ravel().tolist() == [0, 2]


def test_box_clipped_to_unpadded_image():
    attn = grid_attn({(2, 3): 10, (2, 2): 10}, 3, 4)
    res = dinoseg(attn, (3, 4), 16, (37, 50), head=0, mass=0.6)
    assert res.box.tolist() == [32.0, 32.0, 50.0, 37.0]


def test_head_selection():
    a = torch.full((6, 3 * 5), 0.1)
    a[1, 0] = a[1, 1] = 10.0  # head 1: top-left pair
    a[4, 13] = a[4, 14] = 10.0  # head 4 (the default): bottom-right pair
    assert dinoseg(a, (3, 5), 16, (48, 80), head=1).box.tolist() == [0.0, 0.0, 32.0, 16.0]
    assert dinoseg(a, (3, 5), 16, (48, 80)).box.tolist() == [48.0, 32.0, 80.0, 48.0]
    assert dinoseg(a[None], (3, 5), 16, (48, 80)).box.tolist() == [48.0, 32.0, 80.0, 48.0]
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 5\]"):
        dinoseg(a, (3, 5), 16, (48, 80), head=6)


def test_zero_attention_falls_back_to_whole_image():
    res = dinoseg(torch.zeros(2, 12), (3, 4), 16, (40, 60), head=1)
    assert res.box.tolist() == [0.0, 0.0, 60.0, 40.0] and res.score == 0.0 and res.mask.all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cls_attn=torch.rand(6, 12), dims=(3, 5)), "dims"),
        (dict(cls_attn=torch.rand(12), dims=(3, 4)), "num_heads, N"),
        (dict(cls_attn=torch.rand(6, 12), dims=(3, 4), mass=0.0), "mass"),
        (dict(cls_attn=torch.full((6, 12), float("nan")), dims=(3, 4)), "NaN"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dinoseg(**(dict(patch_size=16, image_size=(40, 60)) | kwargs))


# ---------------------------------------------------------------- naive reference on random maps
def naive_dinoseg(vals: list[float], h: int, w: int, p: int, H: int, W: int, mass: float):
    n = len(vals)
    order = sorted(range(n), key=lambda i: (vals[i], i))
    total = sum(vals)
    keep = [False] * n
    acc = 0.0
    for i in order:
        acc += vals[i]
        keep[i] = acc > (1 - mass) * total
    seen = [False] * n
    best = None
    for start in range(n):  # components found in row-major order of their first cell
        if not keep[start] or seen[start]:
            continue
        comp, todo = [], deque([start])
        seen[start] = True
        while todo:
            c = todo.popleft()
            comp.append(c)
            y, x = divmod(c, w)
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and keep[yy * w + xx] and not seen[yy * w + xx]:
                    seen[yy * w + xx] = True
                    todo.append(yy * w + xx)
        if best is None or len(comp) > len(best):
            best = comp
    ys = [c // w for c in best]
    xs = [c % w for c in best]
    return [min(xs) * p, min(ys) * p, min((max(xs) + 1) * p, W), min((max(ys) + 1) * p, H)]


def test_matches_naive_on_random_maps():
    rng = np.random.default_rng(0)
    shapes = [(1, 9), (8, 1), (4, 4), (5, 7), (9, 6), (12, 12)]
    for trial in range(120):
        h, w = shapes[trial % len(shapes)]
        # integer attention (exact sums) with many ties; thresholds away from cumsum values
        vals = rng.integers(0, 6, size=h * w).astype(np.float32)
        vals[0] += 1  # never all zero
        mass = float(rng.choice([0.3, 0.5, 0.6, 0.8]))
        total, cums = vals.sum(), np.cumsum(np.sort(vals))
        if np.min(np.abs(cums - (1 - mass) * total)) < 1e-3 * total:
            continue  # a boundary case where float32 normalisation may legitimately differ
        H, W = h * 16 - int(rng.integers(0, 16)), w * 16 - int(rng.integers(0, 16))
        res = dinoseg(torch.from_numpy(vals)[None], (h, w), 16, (H, W), head=0, mass=mass)
        assert res.box.tolist() == naive_dinoseg(vals.tolist(), h, w, 16, H, W, mass), trial


# ---------------------------------------------------------------- dispatch and config
def test_run_miner_dinoseg_and_config_file():
    from omegaconf import OmegaConf

    from stage_utils import compose_cfg

    cfg = OmegaConf.to_container(compose_cfg("mine", ["miner=dinoseg"]).miner)
    assert cfg == {"name": "dinoseg", "head": 4, "mass": 0.6, "crf": False}  # its parameters and every miner's crf
    attn = torch.full((2, 6, 12), 0.1)
    attn[0, 4, [6, 7]] = 10.0  # image 0, head 4
    attn[1, 4, [0, 1]] = 10.0  # image 1 must be ignored
    fo = SimpleNamespace(feats=torch.randn(2, 12, 8), dims=(3, 4), cls_attn=attn)
    res = run_miner(cfg["name"], fo, (40, 60), patch_size=16, **cfg)
    assert isinstance(res, DinoSegResult) and res.box.tolist() == [32.0, 16.0, 60.0, 32.0]
    with pytest.raises(ValueError, match="cls_attn is None"):
        run_miner("dinoseg", SimpleNamespace(feats=fo.feats, dims=(3, 4), cls_attn=None), (40, 60), patch_size=16)
    with pytest.raises(ValueError, match="unknown parameter"):
        run_miner("dinoseg", fo, (40, 60), patch_size=16, k_patches=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    attn = torch.from_numpy(np.random.default_rng(1).integers(0, 6, size=(6, 150)).astype(np.float32))
    a = dinoseg(attn, (10, 15), 16, (155, 233))
    b = dinoseg(attn.cuda(), (10, 15), 16, (155, 233))
    assert a.box.tolist() == b.box.tolist() and (a.mask == b.mask).all()
