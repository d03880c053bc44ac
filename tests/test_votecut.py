"""VoteCut: checked against a literal transcription of the authors' reference functions (CuVLER, MIT licence,
Copyright (c) 2024 Shahaf Arica: ``votecut/ncut.py``, ``votecut/votecut.py``; the CRF step left out, as the miner's
``crf=false``), scikit-learn's KMeans and OpenCV's connected components when they are installed, and hand-built
cases."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.backbones.backbone import FeatureOutput
from pipeline.discovery import boxes_of, build_miner
from pipeline.discovery.votecut import (cluster_by_iou, instance_masks, kmeans_labels, ncut_eigenvectors, vote,
                                        votecut, votecut_groups)


# ------------------------------------------------------------------- the reference, transcribed (no CRF, no I/O)
def ref_ncut(features, tau=0.15, eps=1e-5, eig_vecs=1):
    features = F.normalize(features, p=2, dim=-1)
    A = torch.bmm(features, features.permute(0, 2, 1))
    A = A > tau
    A = torch.where(~A, eps, A.double())
    D = torch.sum(A, dim=2)
    D_diag = torch.diag_embed(D)
    D_over_sqrt = torch.diag_embed(torch.sqrt(1.0 / D))
    L = torch.matmul(D_over_sqrt, torch.matmul(D_diag - A, D_over_sqrt))
    return L, torch.linalg.eigh(L, UPLO="L")[1][:, :, 1:eig_vecs + 1]


def ref_components(semantic_mask):
    try:
        import cv2
        return cv2.connectedComponents(semantic_mask * 255, connectivity=4)[1]
    except ImportError:
        return scipy.ndimage.label(semantic_mask)[0]


def ref_instances(semantic_labels, min_mask_w=5, min_mask_h=5):
    instance_masks = []
    for s_label in semantic_labels:
        dims = s_label.shape
        for lab in np.unique(s_label):
            semantic_mask = (s_label == lab).astype(np.uint8)
            m = semantic_mask
            if m[0, 0] + m[0, -1] + m[-1, 0] + m[-1, -1] >= 2:
                continue
            components = ref_components(semantic_mask)
            components[semantic_mask == 0] = -1
            instance_labels = np.unique(components)[1:]
            if len(instance_labels) > 30:
                continue
            for i_label in instance_labels:
                instance_mask = np.zeros(dims)
                instance_mask[components == i_label] = 1
                x = np.where(instance_mask.sum(axis=0))[0]
                y = np.where(instance_mask.sum(axis=1))[0]
                if np.max(x) - np.min(x) + 1 < min_mask_w and np.max(y) - np.min(y) + 1 < min_mask_h:
                    continue
                instance_masks.append(instance_mask)
    return instance_masks


def ref_cluster(masks, threshold=0.6, pivot_iter=5):
    m = torch.Tensor(masks.reshape(masks.shape[0], -1))
    diff = torch.cdist(m, m, p=1.0)
    inter = m @ m.T
    ious = (inter / (diff + inter)).numpy()
    indices, occurrences = np.unique(np.where(ious > threshold)[0], return_counts=True)
    indices = indices[np.argsort(occurrences)[::-1]]
    ind_list, selected, used = indices.tolist(), [], set()
    for _ in range(len(indices)):
        if len(ind_list) == 0:
            break
        pivot = ind_list.pop(0)
        seg = np.array([pivot]).astype(int)
        for _ in range(pivot_iter):
            prev = len(seg)
            seg = np.unique(np.concatenate((seg, np.array(np.where(ious[pivot] > threshold)).flatten())))
            if prev == len(seg):
                break
            sub = ious[:, seg][seg, :]
            pivot = seg[np.argmax(np.sum(sub, axis=1))]
        if pivot not in used:
            seg = np.array([i for i in seg if i not in used])
            selected.append(seg)
        used.update(seg)
        ind_list = [i for i in ind_list if i not in used]
    return selected


def ref_votecut_masks(instances, tau_m=0.2, max_masks=10):
    masks = np.array([np.asarray(x, dtype=np.float32) for x in instances])
    out = []
    for i, seg in enumerate(ref_cluster(masks)):
        if len(out) >= max_masks:
            break
        cm = masks[seg]
        out.append(((np.sum(cm, axis=0) / cm.shape[0] > tau_m).astype(np.uint8), len(seg)))
    out = sorted(out, key=lambda x: x[1], reverse=True)
    biggest = max(n for _, n in out)
    return [m.astype(bool) for m, _ in out], [n / biggest for _, n in out]


# ----------------------------------------------------------------------------------------------- fixtures
def scene(h=24, w=24, seed=0, blobs=((3, 9, 4, 11), (13, 20, 12, 19), (2, 7, 16, 22)), noise=0.3) -> torch.Tensor:
    """Patch features: a background direction plus one direction per blob, and noise."""
    g = torch.Generator().manual_seed(seed)
    f = noise * torch.randn(h, w, 32, generator=g)
    f[..., 0] += 1.0
    for i, (y0, y1, x0, x1) in enumerate(blobs):
        f[y0:y1, x0:x1, i + 1] += 2.5 + 0.5 * i
    return f.reshape(h * w, 32)


def test_ncut_is_the_reference_ncut():
    feats = scene(12, 12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's bits depend on its threads; the miner solves with one
    try:
        L, vecs = ref_ncut(feats[None], eig_vecs=2)
    finally:
        torch.set_num_threads(threads)
    ours = ncut_eigenvectors(feats, (12, 12), num=2)
    ref = vecs[0].T.reshape(2, 12, 12).numpy()
    assert np.array_equal(ours, ref)


def test_kmeans_partitions_separated_values():
    v = np.array([0.0, 0.1, 5.0, 5.1, 0.05, 10.0, 10.2, 5.05, 0.02])
    lab = kmeans_labels(v, 3)
    groups = {tuple(np.flatnonzero(lab == k)) for k in range(3)}
    assert groups == {(0, 1, 4, 8), (2, 3, 7), (5, 6)}
    lab2 = kmeans_labels(v.reshape(3, 3), 2)
    assert lab2.shape == (3, 3) and len(np.unique(lab2)) == 2


def test_kmeans_is_sklearns():
    sklearn = pytest.importorskip("sklearn.cluster")
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(3)
    vecs = [rng.normal(size=400), np.concatenate([rng.normal(0, .01, 300), rng.normal(1, .05, 600)]),
            ncut_eigenvectors(scene(), (24, 24))[0].ravel()]
    for v in vecs:
        for k in (2, 3):
            with threadpool_limits(1):
                ref = sklearn.KMeans(n_clusters=k, random_state=0, n_init=10).fit(v.reshape(-1, 1)).labels_
            assert np.array_equal(kmeans_labels(v, k), ref)


def test_instances_and_votes_match_the_reference():
    rng = np.random.default_rng(0)
    labellings = []
    for _ in range(6):  # blocky random labellings with 2-3 labels (some noisy: > 30 components)
        lab = rng.integers(0, 3, size=(6, 6)).repeat(4, 0).repeat(4, 1)
        lab[:2] = lab[:, :2] = 0
        labellings.append(lab)
    labellings.append(rng.integers(0, 2, size=(24, 24)))
    for labels in (labellings, [kmeans_labels(v, k) for v in ncut_eigenvectors(scene(), (24, 24), num=3)
                                for k in (2, 3)]):
        ref = ref_instances(labels)
        ours = instance_masks(labels)
        assert len(ours) == len(ref) > 0 and all(np.array_equal(a, b.astype(bool)) for a, b in zip(ours, ref))
        masks, sizes = vote(ours)
        ref_masks, ref_scores = ref_votecut_masks(ref)
        assert [s / sizes[0] for s in sizes] == ref_scores
        assert all(np.array_equal(a, b) for a, b in zip(masks, ref_masks)) and len(masks) == len(ref_masks)


def test_hand_built_clusters():
    """A and A' overlap by IoU 0.8, B and B' too, A'' (IoU 0.8 with A) joins A's cluster; C stands alone."""
    def box(y0, y1, x0, x1):
        m = np.zeros((10, 10), dtype=bool)
        m[y0:y1, x0:x1] = True
        return m
    A, A2, A3 = box(0, 5, 0, 5), box(0, 5, 0, 4), box(0, 4, 0, 5)  # IoU(A, A2) = 20 / 25
    B, B2 = box(5, 10, 5, 10), box(6, 10, 5, 10)
    C = box(0, 3, 7, 10)
    clusters = cluster_by_iou(np.array([A, B, C, A2, B2, A3], dtype=np.float32))
    assert [sorted(c.tolist()) for c in clusters] == [[0, 3, 5], [1, 4], [2]]
    masks, sizes = vote([A, B, C, A2, B2, A3], tau_m=0.5)
    assert sizes == [3, 2, 1]
    # > half of A's cluster covers A but its corner (4, 4) (only A has it); B's cluster: both B and B2 = B2
    corner = A.copy()
    corner[4, 4] = False
    assert np.array_equal(masks[0], corner) and np.array_equal(masks[1], B2) and np.array_equal(masks[2], C)
    # tau_m: a patch is kept when more than that share of the cluster's masks covers it
    assert np.array_equal(vote([A, A2, A3], tau_m=0.7)[0][0], box(0, 4, 0, 4))


def test_votecut_finds_the_blobs_and_scores_them():
    r = votecut(scene(noise=0.05), (24, 24), 8, (192, 192))
    assert not r.degenerate and r.scores[0] == 1.0 and all(0 < s <= 1 for s in r.scores)
    assert r.scores == sorted(r.scores, reverse=True)
    assert [s * r.cluster_sizes[0] for s in r.scores] == pytest.approx(r.cluster_sizes)
    found = {tuple(b) for b in r.boxes}
    for y0, y1, x0, x1 in ((3, 9, 4, 11), (13, 20, 12, 19), (2, 7, 16, 22)):
        assert (x0 * 8.0, y0 * 8.0, x1 * 8.0, y1 * 8.0) in found
    for b, m in zip(r.boxes, r.masks):
        ys, xs = np.nonzero(m)
        assert list(b) == [xs.min() * 8, ys.min() * 8, (xs.max() + 1) * 8, (ys.max() + 1) * 8]


def test_two_groups_vote_together_at_the_finer_grid():
    fine = ncut_eigenvectors(scene(), (24, 24))
    coarse = fine[:, ::2, ::2]  # a 12 x 12 backbone seeing the same scene
    masks, sizes, n = votecut_groups([fine, coarse], (24, 24))
    m1, s1, n1 = votecut_groups([fine], (24, 24))
    assert n > n1 and all(m.shape == (24, 24) for m in masks) and sizes[0] >= s1[0]


def test_no_instances_falls_back_to_the_whole_image():
    r = votecut(torch.ones(16, 8), (4, 4), 8, (30, 32))
    assert r.degenerate and r.scores == [0.0] and list(r.boxes[0]) == [0, 0, 32, 30]


def test_miner():
    m = build_miner("votecut", 8, image_size=None)
    assert m.input_size is None and m.params["ks"] == (2, 3) and "backbones" not in m.params
    assert build_miner("votecut", 8).input_size == 480
    out = FeatureOutput(feats=scene(noise=0.05)[None], cls_attn=None, dims=(24, 24))
    mined = boxes_of(m(out, (192, 192)))
    assert len(mined) >= 3 and mined[0].score == 1.0 and all(b.mask is not None for b in mined)
    assert [type(r) for r in m.mine_batch([out, out], [(192, 192)] * 2)] == [type(m(out, (192, 192)))] * 2
    for bad, key in (({"ks": [1, 2]}, "ks"), ({"tau_m": 1.0}, "tau_m"), ({"iou_threshold": 1.5}, "iou_threshold"),
                     ({"backbones": ["dino_vits9"]}, "backbones"), ({"image_size": 4}, "image_size"),
                     ({"num_eigenvectors": 0}, "num_eigenvectors"), ({"tau": 1.0}, "tau")):
        with pytest.raises(ValueError, match=key):
            build_miner("votecut", 8, **bad)
    assert build_miner("votecut", 8, backbones=[]).params["ks"] == (2, 3)


def test_mine_stage_writes_scored_masks_and_names_bad_keys(tmp_path, voc07_mini):
    import json

    from stage_utils import compose_cfg
    from stages.checks import config_errors
    from stages.mine import run

    base = [f"paths.output_root={tmp_path}", "backbone.init=random", "num_workers=0", "progress=false",
            "dataset=voc07", f"paths.data_root={voc07_mini}", "dataset.max_images=1", "miner=votecut"]
    cfg = compose_cfg("mine", [*base, "miner.image_size=128", "miner.min_size=1"])
    metrics = run(cfg)
    assert metrics["method"] == "votecut" and metrics["images"] == 1
    out = tmp_path / "voc07" / "dino_vits16" / "mine_votecut"
    data = json.loads((out / "pseudo_boxes.json").read_text())
    scores = [a["score"] for a in data["annotations"]]
    assert scores and scores[0] == 1.0 and all(0 < s <= 1 for s in scores)
    assert all("counts" in a["segmentation"] for a in data["annotations"]) and any((out / "viz").iterdir())
    errors = config_errors(compose_cfg("mine", [*base, "miner.ks=[1]"]), "mine")
    assert len(errors) == 1 and errors[0].startswith("miner.ks")
