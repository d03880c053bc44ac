"""FOUND against a naive implementation of the paper's equations (float64, loops, BFS) written here independently
of the library, hand-made cases whose seed and components are known, the shipped head, the miner's parameters and
checks, the picture, and one mine stage run."""
from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.discovery import build_miner
from pipeline.discovery.found import (SHIPPED_HEAD_FILE, FoundHead, FoundResult, found, head_from_state_dict,
                                      load_head, sparsity_weights)

SHIPPED_SHA256 = "47ff2a4af3dbc6c80cb832cc81f8ed8ae81809e52576d0de5f9c754cf46ef9b5"


# ---------------------------------------------------------------- naive reading of the paper
def naive_found(K: np.ndarray, A: np.ndarray, h: int, w: int, p: int, H: int, W: int, head=None,
                bkg_th: float = 0.3, mode: str = "single") -> dict:
    """FOUND from its equations, float64, one number at a time.

    Head sparsity (CroW): ``t`` = mean attention over heads and patches, ``Q_i`` = share of head i's patches
    above ``t``, ``beta_i = log(sum_j Q_j / Q_i)`` (with the 1e-10 of the code); seed = first patch of least
    ``sum_i beta_i A_i``; background = patches whose cosine to the seed, on the beta-weighted per-head keys,
    exceeds ``bkg_th``; object = ``w . k + b > 0`` (sigmoid > 0.5) with a head, else not background; boxes of
    the 4-connected components, largest first (equal sizes: the one whose first patch in raster order comes
    first), ``[x0, y0, x1 + 1, y1 + 1] * p`` clipped to (W, H)."""
    nh, n = A.shape
    d = K.shape[1]
    dh = d // nh
    t = sum(float(a) for row in A for a in row) / (nh * n)
    Q = [sum(1 for j in range(n) if A[i, j] > t) / n for i in range(nh)]
    total = sum(q + 1e-10 for q in Q)
    beta = [math.log(total / (q + 1e-10)) for q in Q]
    weighted = [sum(beta[i] * float(A[i, j]) for i in range(nh)) for j in range(n)]
    seed = 0
    for j in range(1, n):
        if weighted[j] < weighted[seed]:
            seed = j
    desc = []
    for j in range(n):
        v = [beta[c // dh] * float(K[j, c]) for c in range(d)]
        norm = max(math.sqrt(sum(x * x for x in v)), 1e-12)
        desc.append([x / norm for x in v])
    sim = [sum(a * b for a, b in zip(desc[seed], desc[j])) for j in range(n)]
    bkg = [s > bkg_th for s in sim]
    if head is not None:
        wv, b = head
        logit = [sum(float(wv[c]) * float(K[j, c]) for c in range(d)) + float(b) for j in range(n)]
        obj = [z > 0 for z in logit]
        value = [1 / (1 + math.exp(-z)) for z in logit]
    else:
        logit = None
        obj = [not x for x in bkg]
        value = [(1 - s) / 2 for s in sim]
    # components by BFS, found in raster order of their first patch
    seen, comps = [False] * n, []
    for start in range(n):
        if not obj[start] or seen[start]:
            continue
        seen[start], cells, todo = True, [], deque([start])
        while todo:
            c = todo.popleft()
            cells.append(c)
            y, x = divmod(c, w)
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and obj[yy * w + xx] and not seen[yy * w + xx]:
                    seen[yy * w + xx] = True
                    todo.append(yy * w + xx)
        comps.append(sorted(cells))
    comps.sort(key=len, reverse=True)  # stable: equal sizes keep raster order
    if mode == "single":
        comps = comps[:1]
    boxes, masks, scores = [], [], []
    for cells in comps:
        ys, xs = [c // w for c in cells], [c % w for c in cells]
        boxes.append([min(xs) * p, min(ys) * p, min((max(xs) + 1) * p, W), min((max(ys) + 1) * p, H)])
        m = np.zeros((h, w), bool)
        m[ys, xs] = True
        masks.append(m)
        scores.append(sum(value[c] for c in cells) / len(cells))
    ordered = sorted(weighted)
    return dict(seed=seed, beta=beta, sim=np.array(sim).reshape(h, w), bkg=np.array(bkg).reshape(h, w),
                obj=np.array(obj).reshape(h, w), boxes=boxes, masks=masks, scores=scores, t=t,
                margins=dict(att=min(abs(float(a) - t) for a in A.ravel()),
                             seed=(ordered[1] - ordered[0]) if n > 1 else 1.0,
                             sim=min(abs(s - bkg_th) for s in sim),
                             logit=min(abs(z) for z in logit) if logit is not None else 1.0))


def random_case(rng: np.random.Generator, h: int, w: int, nh: int, dh: int):
    """Keys: a background direction, one or two object rectangles with their own directions, noise; attention:
    softmax of per-head logits (some heads sparse, some flat), lower on the background."""
    d = nh * dh
    bg = rng.normal(size=d)
    K = np.tile(bg, (h * w, 1)) + rng.normal(scale=0.6, size=(h * w, d))
    obj = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 3))):
        y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        obj[y0:y1, x0:x1] = True
        K[obj.ravel()] += 2.0 * rng.normal(size=d)
    logits = rng.normal(size=(nh, h * w)) * rng.uniform(0.2, 3.0, size=(nh, 1)) + 1.5 * obj.ravel()
    A = np.exp(logits) / (np.exp(logits).sum(axis=1, keepdims=True) + 1.0)  # + CLS's own share
    return K.astype(np.float32), A.astype(np.float32)


def test_matches_the_naive_reading_of_the_paper_on_random_cases():
    rng = np.random.default_rng(0)
    shapes = [(4, 5), (6, 6), (5, 9), (8, 7), (3, 12), (7, 9)]
    checked = 0
    for trial in range(36):
        h, w = shapes[trial % len(shapes)]
        nh, dh = int(rng.choice([2, 3, 6])), int(rng.choice([2, 4]))
        p = int(rng.choice([8, 16]))
        H, W = int(rng.integers((h - 1) * p + 1, h * p + 1)), int(rng.integers((w - 1) * p + 1, w * p + 1))
        K, A = random_case(rng, h, w, nh, dh)
        wv = rng.normal(size=nh * dh).astype(np.float32)
        b = np.float32(rng.normal(scale=0.5))
        head = FoundHead(torch.from_numpy(wv).reshape(1, -1, 1, 1), torch.tensor([b]), "test")
        th = float(rng.choice([0.3, 0.1, 0.5]))
        for use_head in (True, False):
            for mode in ("single", "multi"):
                ref = naive_found(K, A, h, w, p, H, W, (wv, b) if use_head else None, th, mode)
                m = ref["margins"]
                # well-posed only: float32 and float64 must agree on every comparison
                if m["att"] < 1e-6 or m["seed"] < 1e-6 or m["sim"] < 1e-5 or m["logit"] < 1e-5:
                    continue
                res = found(torch.from_numpy(K), torch.from_numpy(A), (h, w), p, (H, W),
                            head=head if use_head else "none", bkg_th=th, mode=mode)
                label = f"trial {trial} {h}x{w} head={use_head} {mode}"
                assert res.seed == ref["seed"], label
                np.testing.assert_allclose(res.beta, ref["beta"], rtol=1e-5, err_msg=label)
                np.testing.assert_allclose(res.similarity, ref["sim"], atol=1e-5, err_msg=label)
                assert (res.bkg_mask == ref["bkg"]).all() and (res.object_mask == ref["obj"]).all(), label
                if not ref["boxes"]:
                    assert res.degenerate and res.boxes[0].tolist() == [0, 0, W, H], label
                    continue
                assert [bx.tolist() for bx in res.boxes] == [[float(v) for v in bx] for bx in ref["boxes"]], label
                assert all((a == b).all() for a, b in zip(res.masks, ref["masks"])), label
                np.testing.assert_allclose(res.scores, ref["scores"], atol=1e-6, err_msg=label)
                assert not res.degenerate
                checked += 1
    assert checked >= 100  # the margin filter must not silently skip everything


# ---------------------------------------------------------------- hand-made cases
def test_sparsity_weights_by_hand():
    # t = 2/8 = 0.25; head 0 has 1 of 4 patches above it, head 1 has 2: beta = log(3), log(1.5)
    A = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    np.testing.assert_allclose(sparsity_weights(A)[0].numpy(), [math.log(3), math.log(1.5)], rtol=1e-6)


def test_the_seed_is_the_least_attended_patch_of_the_weighted_heads():
    # beta = log 3, log 1.5: weighted = .89, .197, .205, .211 -> patch 1 (unweighted sums pick patch 2)
    A = torch.tensor([[0.7, 0.05, 0.15, 0.1], [0.3, 0.35, 0.1, 0.25]])
    K = torch.cat([torch.eye(4), torch.eye(4)], dim=1)  # 4 patches, 2 heads of 4 dims, orthogonal
    res = found(K, A, (2, 2), 8, (16, 16), head="none")
    assert res.seed == 1 and int(np.argmin(A.sum(0).numpy())) == 2
    # orthogonal keys: the seed alone is background, the other three patches are one L-shaped object
    assert res.bkg_mask.tolist() == [[False, True], [False, False]]
    assert res.boxes[0].tolist() == [0.0, 0.0, 16.0, 16.0] and res.masks[0].sum() == 3


def planted(h=6, w=8, rects=((1, 4, 1, 4), (3, 6, 6, 8)), nh=2, dh=2):
    """Unit keys: e0 on the background, e1 on the object rectangles (y0, y1, x0, x1); attention lowest at the
    bottom-left corner patch (the seed) and higher on the objects."""
    K = torch.zeros(h * w, nh * dh)
    K[:, 0] = 1.0
    obj = np.zeros((h, w), bool)
    for y0, y1, x0, x1 in rects:
        obj[y0:y1, x0:x1] = True
    K[torch.from_numpy(obj.ravel())] = torch.eye(nh * dh)[1]
    A = torch.full((nh, h * w), 0.01)
    A[:, torch.from_numpy(obj.ravel())] = 0.03
    A[:, (h - 1) * w] = 0.001
    return K, A, obj


def test_training_free_seed_finds_the_planted_objects_single_and_multi():
    K, A, obj = planted()
    single = found(K, A, (6, 8), 10, (55, 75), head="none")
    assert single.seed == 40 and (single.object_mask == obj).all() and (single.bkg_mask == ~obj).all()
    # the 3 x 3 block is larger than the 3 x 2 one: single keeps it; the box is clipped to (W, H)
    assert [b.tolist() for b in single.boxes] == [[10.0, 10.0, 40.0, 40.0]]
    multi = found(K, A, (6, 8), 10, (55, 75), head="none", mode="multi")
    assert [b.tolist() for b in multi.boxes] == [[10.0, 10.0, 40.0, 40.0], [60.0, 30.0, 75.0, 55.0]]
    assert multi.boxes[0].tolist() == single.box.tolist() and multi.masks[0].sum() == 9
    # cosine to the seed 0 on the objects: score (1 - 0) / 2
    assert multi.scores == [pytest.approx(0.5), pytest.approx(0.5)] and multi.saliency is None


def test_head_mask_is_sigmoid_above_one_half_and_scores_are_its_mean():
    K, A, obj = planted()
    wv = torch.zeros(1, 4, 1, 1)
    wv[0, 1] = 4.0
    head = FoundHead(wv, torch.tensor([-2.0]), "test")  # logit +2 on the objects, -2 elsewhere
    res = found(K, A, (6, 8), 10, (55, 75), head=head, mode="multi")
    assert (res.object_mask == obj).all() and len(res.boxes) == 2
    assert res.scores == [pytest.approx(1 / (1 + math.exp(-2)))] * 2
    np.testing.assert_allclose(res.saliency[obj], 1 / (1 + math.exp(-2)), rtol=1e-6)
    assert res.seed == 40  # the background seed is computed with a head too (for the pictures)


def test_equal_sizes_go_to_the_first_in_raster_order():
    K, A, _ = planted(rects=((3, 5, 0, 2), (0, 2, 5, 7)))
    res = found(K, A, (6, 8), 8, (48, 64), head="none", mode="multi")
    assert [b.tolist() for b in res.boxes] == [[40.0, 0.0, 56.0, 16.0], [0.0, 24.0, 16.0, 40.0]]


def test_bkg_th_is_a_strict_threshold():
    K, A, obj = planted()  # cosine exactly 1 to the seed on the background, exactly 0 on the objects
    assert (found(K, A, (6, 8), 8, (48, 64), head="none", bkg_th=0.0).object_mask == obj).all()
    assert found(K, A, (6, 8), 8, (48, 64), head="none", bkg_th=-0.01).degenerate  # 0 > -0.01: all background
    K[torch.from_numpy(obj.ravel())] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # cosine 0.7071 to the seed
    assert (found(K, A, (6, 8), 8, (48, 64), head="none", bkg_th=0.71).object_mask == obj).all()
    assert found(K, A, (6, 8), 8, (48, 64), head="none", bkg_th=0.70).degenerate


def test_an_empty_object_mask_falls_back_to_the_whole_image():
    K, A, _ = planted()
    head = FoundHead(torch.zeros(1, 4, 1, 1), torch.tensor([-5.0]), "test")
    res = found(K, A, (6, 8), 10, (55, 75), head=head, mode="multi")
    assert res.degenerate and res.boxes[0].tolist() == [0.0, 0.0, 75.0, 55.0] and res.scores == [0.0]
    assert res.mask.all() and not res.object_mask.any()
    same = found(torch.ones(48, 4), A, (6, 8), 10, (55, 75), head="none")  # every patch is background
    assert same.degenerate and same.bkg_mask.all()


def test_one_row_grid_is_kept_two_dimensional():
    K, A, _ = planted(h=1, w=6, rects=((0, 1, 2, 4),))
    res = found(K, A, (1, 6), 8, (8, 48), head="none")
    assert res.mask.shape == (1, 6) and res.box.tolist() == [16.0, 0.0, 32.0, 8.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(bkg_th=1.0), "bkg_th must be"), (dict(bkg_th=True), "bkg_th must be"), (dict(mode="all"), "mode must"),
    (dict(head="nowhere.pt"), "no head file at nowhere.pt"), (dict(head=3), "head must be"),
    (dict(dims=(5, 8)), "dims"), (dict(cls_attn=torch.rand(2, 47)), "cls_attn must be"),
    (dict(cls_attn=torch.rand(3, 48)), "do not split into the attention's 3 heads"),
    (dict(cls_attn=torch.full((2, 48), float("nan"))), "NaN"),
    (dict(head="shipped"), "takes 384-dim keys"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    K, A, _ = planted()
    args = dict(feats=K, cls_attn=A, dims=(6, 8), patch_size=8, image_size=(48, 64), head="none") | kwargs
    with pytest.raises(ValueError, match=match):
        found(**args)


def test_numpy_input_and_batch_of_one():
    K, A, _ = planted()
    a = found(K.numpy(), A.numpy(), (6, 8), 8, (48, 64), head="none", mode="multi")
    b = found(K[None], A[None], (6, 8), 8, (48, 64), head="none", mode="multi")
    assert [x.tolist() for x in a.boxes] == [x.tolist() for x in b.boxes] and a.seed == b.seed


# ---------------------------------------------------------------- the shipped head
def test_shipped_head_is_the_authors_file_with_its_licence():
    folder = SHIPPED_HEAD_FILE.parent
    assert hashlib.sha256(SHIPPED_HEAD_FILE.read_bytes()).hexdigest() == SHIPPED_SHA256
    assert "Apache License" in (folder / "LICENSE").read_text() and SHIPPED_SHA256 in (folder / "README.md").read_text()
    raw = torch.load(SHIPPED_HEAD_FILE, map_location="cpu", weights_only=True)
    assert set(raw) == {"decoder"} and set(raw["decoder"]) == {"weight", "bias"}
    head = load_head("shipped")
    assert head.source == "shipped" and head.in_dim == 384 and tuple(head.weight.shape) == (1, 384, 1, 1)
    assert torch.equal(head.weight, raw["decoder"]["weight"]) and torch.equal(head.bias, raw["decoder"]["bias"])
    assert load_head("none") is None


def test_shipped_head_is_package_data():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    data = [f.strip() for f in cfg["options.package_data"]["pipeline.discovery"].split(",")]
    assert {"found_head/decoder_weights.pt", "found_head/LICENSE", "found_head/README.md"} <= set(data)


def test_other_head_files(tmp_path):
    conv = torch.nn.Conv2d(8, 1, 1)
    torch.save({"decoder": conv.state_dict()}, tmp_path / "authors_format.pt")   # as decoder_save_weights
    torch.save(conv.state_dict(), tmp_path / "bare.pt")
    for name in ("authors_format.pt", "bare.pt"):
        head = load_head(str(tmp_path / name))
        assert head.in_dim == 8 and head.source == str(tmp_path / name)
        assert torch.equal(head.weight, conv.weight.detach()) and torch.equal(head.bias, conv.bias.detach())
    torch.save({"decoder": {"kernel": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not a FOUND head"):
        load_head(str(tmp_path / "wrong.pt"))
    torch.save({"weight": torch.zeros(2, 8, 1, 1), "bias": torch.zeros(2)}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="1x1 convolution to one channel"):
        load_head(str(tmp_path / "two.pt"))
    with pytest.raises(ValueError, match="not a FOUND head"):
        head_from_state_dict([1, 2])


def test_a_head_file_is_recorded_by_its_content(tmp_path):
    """A run's identity (``Miner.recorded``) holds a user's head file's sha256: a head retrained at the same path is
    another run; the shipped head and none are recorded by name only, other miners as before."""
    import hashlib

    from pipeline.discovery import Miner

    path = tmp_path / "head.pt"
    torch.save(torch.nn.Conv2d(8, 1, 1).state_dict(), path)
    params = {"name": "found", "head": str(path), "bkg_th": 0.3, "mode": "single"}
    first = Miner.recorded(params)
    assert first == {**params, "head_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    torch.save(torch.nn.Conv2d(8, 1, 1).state_dict(), path)   # retrained in place
    assert Miner.recorded(params)["head_sha256"] != first["head_sha256"]
    for head in ("shipped", "none"):
        assert Miner.recorded({**params, "head": head}) == {**params, "head": head}
    assert Miner.recorded({"name": "lost", "k_patches": 100}) == {"name": "lost", "k_patches": 100}


# ---------------------------------------------------------------- the miner and its configuration
def test_miner_parameters_schema_and_reading_the_head_once(monkeypatch):
    from pipeline.discovery import found as found_module
    from pipeline.discovery.miners import MINERS

    cls = MINERS["found"]
    assert cls.parameters() == {"head": "shipped", "bkg_th": 0.3, "mode": "single", "crf": False}
    assert cls.needs.features and cls.needs.cls_attn
    miner = build_miner("found", 8)
    assert isinstance(miner.head, FoundHead) and build_miner("found", 8, head="none").head is None
    reads = []
    monkeypatch.setattr(found_module, "load_head", lambda h: reads.append(h))
    K, A, _ = planted()
    from pipeline.backbones.backbone import FeatureOutput

    out = FeatureOutput(K[None], (6, 8), A[None])
    res = build_miner("found", 8, head="none", mode="multi")(out, (48, 64))
    assert isinstance(res, FoundResult) and len(res.boxes) == 2 and reads == []  # no file read per image
    with pytest.raises(ValueError, match="needs the CLS attention"):
        build_miner("found", 8, head="none")(FeatureOutput(K[None], (6, 8), None), (48, 64))


def test_config_checks_name_the_key(tmp_path):
    from stage_utils import compose_cfg
    from stages.checks import config_errors

    base = [f"paths.output_root={tmp_path}", "miner=found"]
    assert config_errors(compose_cfg("mine", [*base, "backbone=dino_vits8"]), "mine") == []
    assert config_errors(compose_cfg("mine", [*base, "backbone=dino_vitb16", "miner.head=none"]), "mine") == []
    width = config_errors(compose_cfg("mine", [*base, "backbone=dino_vitb16"]), "mine")
    assert len(width) == 1 and width[0].startswith("miner.head=shipped: ") and "768" in width[0] \
        and "head=none" in width[0]
    feature = config_errors(compose_cfg("mine", [*base, "backbone=dino_vits8", "backbone.feature=q"]), "mine")
    assert len(feature) == 1 and feature[0].startswith("miner.head=shipped: ") and "use feature=k" in feature[0]
    assert config_errors(compose_cfg("mine", [*base, "backbone.feature=q", "miner.head=none"]), "mine") == []
    cnn = config_errors(compose_cfg("mine", [*base, "backbone=dino_resnet50", "miner.head=none"]), "mine")
    assert len(cnn) == 1 and "no attention heads" in cnn[0]
    assert config_errors(compose_cfg("mine", [*base, "miner.mode=all"]), "mine")[0].startswith("miner.mode=all: ")
    assert config_errors(compose_cfg("mine", [*base, "miner.head=/no/such.pt"]), "mine") == [
        "miner.head=/no/such.pt: no head file at /no/such.pt; head takes 'shipped' (the authors' head for DINO "
        "ViT-S/8 keys), 'none' (the training-free background seed alone) or the path of a head file"]


def test_each_box_writes_its_mask():
    from pipeline.data.records import ImageRecord
    from pipeline.masks import decode_rle
    from pipeline.mining import make_row

    K, A, obj = planted()
    res = found(K, A, (6, 8), 10, (55, 75), head="none", mode="multi")
    row = make_row(ImageRecord("x", 1, "x.png", width=75, height=55, has_gt=False), (55, 75), res, None,
                   patch_size=10)
    assert row["seed"] == 40 and len(row["masks"]) == len(row["boxes"]) == 2 and row["scores"] == res.scores
    union = sum(decode_rle(m).astype(int) for m in row["masks"])
    assert union.max() == 1 and union.sum() == 9 * 100 + 15 * 25  # the second clipped at W=75, H=55


def test_draw_found_picture():
    from pipeline.viz import draw_result, style
    from pipeline.viz.cut import panel_zoom

    K, A, _ = planted()
    head = FoundHead(torch.eye(4)[1].reshape(1, 4, 1, 1) * 4, torch.tensor([-2.0]), "test")
    image = np.full((45, 60, 3), 128, dtype=np.uint8)
    k = panel_zoom(45, 60)
    for res in (found(K, A, (6, 8), 8, (45, 60), head="none", mode="multi"), found(K, A, (6, 8), 8, (45, 60),
                head=head), found(torch.ones(48, 4), A, (6, 8), 8, (45, 60), head="none")):
        pic = draw_result(image, res, 8, gt_boxes=[[5, 5, 30, 30]], title="found")
        assert pic.size == (3 * 60 * k + 2 * 6, 45 * k + style.LEGEND_BAND) and pic.mode == "RGB"


# ---------------------------------------------------------------- a real backbone and the mine stage
def test_on_backbone_outputs_the_library_equals_the_naive_reading(voc07_mini):
    """Random-weight ViT-S/8 keys and CLS attention of a VOC crop: the seed, background and head masks equal the
    naive float64 reading except at patches within rounding of a threshold (none expected)."""
    from pipeline.backbones import build_backbone
    from pipeline.data import build_dataset, load_image
    from pipeline.data.preprocess import preprocess_image

    backbone = build_backbone("dino_vits8", init="random", seed=1)
    rec = build_dataset("voc07", str(voc07_mini), max_images=1).records[0]
    img = load_image(rec.path)[:96, :120]
    x, (H, W) = preprocess_image(img, 8)
    out = backbone.features(x[None], which="k", with_cls_attn=True)
    h, w = out.dims
    miner = build_miner("found", 8, mode="multi")
    res = miner(out, (H, W))
    K, A = out.feats[0].numpy(), out.cls_attn[0].numpy()
    wv, b = miner.head.weight.reshape(-1).numpy(), miner.head.bias.numpy()[0]
    ref = naive_found(K, A, h, w, 8, H, W, (wv, b), mode="multi")
    assert ref["margins"]["seed"] > 1e-6 and ref["margins"]["att"] > 1e-7
    assert res.seed == ref["seed"] and (res.object_mask == ref["obj"]).all()
    near = np.abs(ref["sim"] - 0.3) < 1e-5
    assert (res.bkg_mask == ref["bkg"])[~near].all()
    assert [bx.tolist() for bx in res.boxes] == [[float(v) for v in bx] for bx in ref["boxes"]]


def test_mine_stage_writes_boxes_masks_scores_and_pictures(tmp_path, voc07_mini):
    from pipeline.masks import decode_rle
    from stage_utils import compose_cfg
    from stages.mine import run

    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path}", "dataset=voc07", f"paths.data_root={voc07_mini}",
                               "backbone=dino_vits8", "backbone.init=random", "miner=found", "miner.mode=multi",
                               "dataset.max_images=2", "dataset.max_side=96", "num_workers=0", "progress=false"])
    metrics = run(cfg)
    stage = tmp_path / "voc07" / "dino_vits8" / "mine_found"
    data = json.loads((stage / "pseudo_boxes.json").read_text())
    assert metrics["method"] == "found" and metrics["images"] == 2 and metrics["corloc_total"] == 2
    assert data["info"]["miner_params"] == {"head": "shipped", "bkg_th": 0.3, "mode": "multi"}
    size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    assert {a["image_id"] for a in data["annotations"]} == set(size)
    for a in data["annotations"]:
        m = decode_rle(a["segmentation"])
        assert m.shape == size[a["image_id"]] and a["area"] == m.sum() > 0 and 0.0 <= a["score"] <= 1.0
        assert ("seed" in a) == (a["rank"] == 0)
    assert len(list((stage / "viz").glob("*.png"))) == 2 and (stage / "contact_sheet.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    head = load_head("shipped")
    for trial in range(5):
        K, A = random_case(rng, 9, 11, 6, 64)
        for kw in (dict(head=head), dict(head="none")):
            a = found(torch.from_numpy(K), torch.from_numpy(A), (9, 11), 8, (70, 85), mode="multi", **kw)
            b = found(torch.from_numpy(K).cuda(), torch.from_numpy(A).cuda(), (9, 11), 8, (70, 85), mode="multi",
                      **kw)
            assert a.seed == b.seed and (a.object_mask == b.object_mask).all(), trial
            assert [x.tolist() for x in a.boxes] == [x.tolist() for x in b.boxes], trial


def test_published_corloc_needs_the_authors_head():
    from pipeline.report import published_corloc

    assert [published_corloc("found", "dino_vits8", d) for d in ("voc07", "voc12", "coco20k")] == [72.5, 76.1, 62.9]
    assert published_corloc("found", "dino_vits8", "voc07", {"head": "shipped", "mode": "multi"}) == 72.5
    assert published_corloc("found", "dino_vits8", "voc07", {"head": "none"}) is None
    assert published_corloc("found", "dino_vits16", "voc07") is None
