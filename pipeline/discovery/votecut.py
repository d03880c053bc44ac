"""VoteCut (CuVLER, Arica et al., CVPR 2024): multi-object masks voted over several normalized cuts, a score each.

Features in, result out; no I/O. Ported from the authors' reference code (shahaf-arica/CuVLER, MIT licence,
"Copyright (c) 2024 Shahaf Arica"): ``votecut/ncut.py`` ``ncut``, ``votecut/votecut.py`` (``kmeans_labeling``,
``instances_from_semantic_labels``, ``iou_between_masks``, ``cluster_mask_by_iou``, ``iou_clustering``) and
``utils/annotaions_worker.py`` (the score). The k-means is a port of scikit-learn's ``KMeans`` (BSD-3-Clause,
"Copyright (c) 2007-2024 The scikit-learn developers"), which the reference calls with ``random_state=0,
n_init=10`` (k-means++ init, Lloyd), so that no new dependency is needed. One image, for each backbone (a
"group": the reference's models; a miner has one, see below):

1. Normalized cut (``ncut``): float32 ``F.normalize`` of the patch features, ``bmm`` cosine similarities,
   ``A = 1`` where ``> tau`` (0.15) else ``eps`` (1e-5) in float64, ``L = D^-1/2 (D - A) D^-1/2`` and
   ``torch.linalg.eigh(L)``: the eigenvectors 2 .. ``num_eigenvectors + 1`` of ``L`` itself (not
   ``D^-1/2``-rescaled as TokenCut's), each as an (h, w) map. (``L`` is formed elementwise, which gives the
   same bits as the reference's products with diagonal matrices.)
2. K-means of each eigenvector's values for every ``k`` in ``ks`` ((2, 3)): a labelling of the grid each.
3. Instances (``instances_from_semantic_labels``): for every labelling and label (ascending), the label's
   mask is skipped if it holds 2 or more of the 4 grid corners (background); else its 4-connected components
   (raster order of their first patch: ``scipy.ndimage.label``, which numbers them as the reference's
   ``cv2.connectedComponents``) are instances, unless there are more than 30 of them (the label is noise:
   skipped) or the component's box is under ``min_size`` (5) patches in width AND height.
4. Votes (``cluster_mask_by_iou``, threshold ``iou_threshold`` 0.6, 5 pivot iterations): float32 IoUs of
   every pair of instances; instances ordered by how many instances they overlap by more than the threshold
   (``np.argsort`` of the counts, reversed: its order on ties); each still unused one starts a cluster: its
   neighbours above the threshold join, the pivot moves to the member with the highest IoU sum, up to 5
   times; a cluster whose final pivot is new keeps its members not used by earlier clusters.
5. Each of the first ``max_objects`` (10) clusters becomes one object: the mean of its members' masks
   ``> tau_m`` (0.2); objects sorted by cluster size, largest first (stable); score = the cluster's size over
   the largest kept cluster's size (1.0 for rank 0): CuVLER's soft target.

Boxes: each object's patch extent in pixels (``grid_mask_box``), as the other miners; the mining loop maps them
(and the masks, as RLE) back to the original image. ``image_size`` (480) resizes the image to that square first,
as the reference (480 x 480 for DINO; it resizes with PIL's Lanczos, the mining loader with its own resize).

Ensembles: the reference runs steps 1-3 on each backbone (its default: six DINO/DINOv2 models), resizes all
instances to the 60 x 60 grid (nearest) and votes over all of them. :func:`votecut_ensemble` does that with the
features of several backbones (the miner's ``backbones``, computed once per image by
:class:`pipeline.backbones.ensemble.BackboneEnsemble`), on the grid of the finest one (60 x 60 for a ViT/8 at 480
px, as the reference's); :func:`votecut` is the one-backbone case.

Where this cannot match the reference, or does not follow it:

* Instances are voted on the finest backbone's grid, not always 60 x 60. The reference resizes them to 60 x 60;
  with a patch-8 backbone at 480 px (the reference's set has two) that is the same grid, and a lone patch-16
  backbone's 30 x 30 is an exact duplication (same IoUs, same means: the same objects); for other grids (a lone
  DINOv2's 34 x 34, or an ensemble without a patch-8 member) it is not.
* The eigenvectors come from ``torch.linalg.eigh`` on the features' device: a GPU's when mining on one (as the
  reference ran it), else LAPACK on the CPU with one thread; the sign is irrelevant (k-means of ``v`` and ``-v``
  give the same labels), rounding is not where a value sits on a k-means boundary. A repeated eigenvalue leaves
  the eigenvector arbitrary, in both.
* The k-means is a port, not scikit-learn itself: the same random draws and the same arithmetic, except that
  scikit-learn's BLAS/OpenMP reductions may round differently (this matters only for a point equidistant, to
  the last bit, from two centres, or two restarts of equal inertia); ``tests/test_votecut.py`` compares with
  scikit-learn when it is installed.
* CRF: the reference always refines each object with a dense CRF on a crop around it and keeps the uncut mask
  when the CRF fails. Here, as every miner, ``crf`` (off by default) refines in the mining loop and drops an
  object whose CRF mask moved too far (:func:`pipeline.masks.refine_or_drop`); with ``crf`` off the masks are
  the voted patch masks (the reference's ``bit_mask``).
* An object whose voted mask is empty is dropped (the reference's box of it raises, and it loses the image);
  an image without any instance gets the whole-image box, score 0.0, ``degenerate`` (the reference skips it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.discovery.lost import as_feats, check_grid, check_positive_int, grid_mask_box
from pipeline.discovery.tokencut import FirstOfRanked, blas_single_thread

# the reference's constants
MAX_COMPONENTS = 30          # a label with more 4-connected components than this is noise (skipped)
PIVOT_ITERATIONS = 5         # cluster_mask_by_iou's pivot_iter
KMEANS_SEED, KMEANS_RESTARTS, KMEANS_MAX_ITER, KMEANS_TOL = 0, 10, 300, 1e-4   # sklearn KMeans(random_state=0, n_init=10)


@dataclass
class VoteCutResult(FirstOfRanked):
    """What VoteCut found in one image (CPU numpy, patch grid (h, w) row-major).

    ``boxes``: float64 (4,) xyxy pixel boxes (x2/y2 exclusive), largest cluster first; ``scores``: cluster size
    over the largest cluster's size (in (0, 1], 1.0 first); ``masks``: (h, w) bool voted masks; ``cluster_sizes``:
    the votes of each; ``num_instances``: how many instance masks voted; ``eigvec``: the first backbone's first
    eigenvector (h, w) (for the picture); ``bipartition``: the union of the objects' masks; ``seed``: the patch of
    largest ``|eigvec|``; ``degenerate``: True for the whole-image fallback (no instance, or no eigenvectors)."""

    boxes: list[np.ndarray]
    scores: list[float]
    masks: list[np.ndarray]
    cluster_sizes: list[int] = field(default_factory=list)
    num_instances: int = 0
    eigvec: Optional[np.ndarray] = None
    bipartition: Optional[np.ndarray] = None
    seed: int = 0
    degenerate: bool = False


# --------------------------------------------------------------------------------------------- normalized cut
def ncut_eigenvectors(feats: torch.Tensor, dims: tuple[int, int], tau: float = 0.15, eps: float = 1e-5,
                      num: int = 1) -> Optional[np.ndarray]:
    """(num, h, w) float64: eigenvectors 2 .. num + 1 of the normalized Laplacian of the binary similarity graph
    of ``feats`` (N, D) (the reference's ``ncut``); None when ``eigh`` fails."""
    f = F.normalize(feats.to(torch.float32)[None], p=2, dim=-1)
    A = torch.bmm(f, f.permute(0, 2, 1)) > tau
    A = torch.where(~A, eps, A.double())[0]
    D = torch.sum(A, dim=1)
    d = torch.sqrt(1.0 / D)
    L = d[:, None] * ((torch.diag(D) - A) * d[None, :])
    threads = torch.get_num_threads()
    try:  # one thread: the same bits on any machine, and far faster on a busy one (torch's LAPACK spins otherwise)
        torch.set_num_threads(1)
        with blas_single_thread():
            _, vecs = torch.linalg.eigh(L, UPLO="L")
    except RuntimeError:
        return None
    finally:
        torch.set_num_threads(threads)
    if vecs.shape[1] < num + 1:
        return None
    h, w = dims
    return vecs[:, 1:num + 1].T.reshape(num, h, w).cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------------ k-means
def _sq_distances(centres: np.ndarray, X: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """scikit-learn's ``_euclidean_distances(centres, X, Y_norm_squared=x_sq, squared=True)``."""
    d = -2 * (centres @ X.T)
    d += np.einsum("ij,ij->i", centres, centres)[:, None]
    d += x_sq.reshape(1, -1)
    return np.maximum(d, 0, out=d)


def _kmeans_plusplus(X: np.ndarray, k: int, x_sq: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    n = X.shape[0]
    weights = np.ones(n, dtype=X.dtype)
    trials = 2 + int(np.log(k))
    centres = np.empty((k, X.shape[1]), dtype=X.dtype)
    centres[0] = X[rng.choice(n, p=weights / weights.sum())]
    closest = _sq_distances(centres[0, None], X, x_sq)
    pot = closest @ weights
    for c in range(1, k):
        rand = rng.uniform(size=trials) * pot
        ids = np.searchsorted(np.cumsum(weights * closest), rand)
        np.clip(ids, None, closest.size - 1, out=ids)
        dist = _sq_distances(X[ids], X, x_sq)
        np.minimum(closest, dist, out=dist)
        pots = dist @ weights.reshape(-1, 1)
        best = np.argmin(pots)
        pot, closest = pots[best], dist[best]
        centres[c] = X[ids[best]]
    return centres


def _assign(X: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = np.einsum("ij,ij->i", centres, centres)[None, :] + -2.0 * (X @ centres.T)
    return np.argmin(d, axis=1).astype(np.int32)   # first minimum, as the Cython loop's strict "<"


def _lloyd(X: np.ndarray, centres: np.ndarray, tol: float) -> tuple[np.ndarray, float]:
    k = centres.shape[0]
    labels_old, strict = np.full(X.shape[0], -1, dtype=np.int32), False
    for _ in range(KMEANS_MAX_ITER):
        labels = _assign(X, centres)
        weight = np.bincount(labels, minlength=k).astype(X.dtype)
        new = np.zeros_like(centres)
        np.add.at(new, labels, X)
        empty = np.flatnonzero(weight == 0)
        if len(empty):                             # scikit-learn's _relocate_empty_clusters_dense
            dist = ((X - centres[labels]) ** 2).sum(axis=1)
            far = np.argpartition(dist, -len(empty))[:-len(empty) - 1:-1]
            if np.max(dist) != 0:
                for j, i in zip(empty, far):
                    new[labels[i]] -= X[i]
                    new[j] = X[i]
                    weight[j] = 1.0
                    weight[labels[i]] -= 1.0
        biggest = int(np.argmax(weight))
        for j in range(k):
            new[j] = new[j] * (1.0 / weight[j]) if weight[j] > 0 else new[biggest]
        shift = np.sqrt(((new - centres) ** 2).sum(axis=1))
        centres = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if (shift ** 2).sum() <= tol:
            break
        labels_old = labels
    if not strict:                                 # labels of the final centres, as scikit-learn
        labels = _assign(X, centres)
    inertia = float(((X - centres[labels]) ** 2).sum())
    return labels, inertia


def _same_clustering(a: np.ndarray, b: np.ndarray, k: int) -> bool:
    mapping = np.full(k, -1)
    for x, y in zip(a, b):
        if mapping[x] == -1:
            mapping[x] = y
        elif mapping[x] != y:
            return False
    return True


def kmeans_labels(values: np.ndarray, k: int, seed: int = KMEANS_SEED, n_init: int = KMEANS_RESTARTS) -> np.ndarray:
    """Labels of ``KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(values.reshape(-1, 1))`` (a port of
    scikit-learn's k-means++ and Lloyd), reshaped as ``values``."""
    X = np.array(values, dtype=np.float64).reshape(-1, 1)
    tol = float(np.mean(np.var(X, axis=0))) * KMEANS_TOL
    X = X - X.mean(axis=0)
    x_sq = np.einsum("ij,ij->i", X, X)
    rng = np.random.RandomState(seed)
    best, best_inertia = None, None
    for _ in range(n_init):
        labels, inertia = _lloyd(X, _kmeans_plusplus(X, k, x_sq, rng), tol)
        if best_inertia is None or (inertia < best_inertia and not _same_clustering(labels, best, k)):
            best, best_inertia = labels, inertia
    return best.reshape(np.shape(values))


# ------------------------------------------------------------------------------------------------ instances
def instance_masks(labellings: Sequence[np.ndarray], min_size: int = 5) -> list[np.ndarray]:
    """The reference's ``instances_from_semantic_labels``: (h, w) bool instance masks in its order."""
    out = []
    for labels in labellings:
        for value in np.unique(labels):
            semantic = labels == value
            if int(semantic[0, 0]) + int(semantic[0, -1]) + int(semantic[-1, 0]) + int(semantic[-1, -1]) >= 2:
                continue
            components, n = scipy.ndimage.label(semantic)
            if n > MAX_COMPONENTS:
                continue
            for c in range(1, n + 1):
                mask = components == c
                ys, xs = np.nonzero(mask)
                if xs.max() - xs.min() + 1 < min_size and ys.max() - ys.min() + 1 < min_size:
                    continue
                out.append(mask)
    return out


def resize_nearest(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A mask resized to ``grid`` as the reference's ``resize_masks`` (torchvision NEAREST)."""
    if tuple(mask.shape) == tuple(grid):
        return mask
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(grid), mode="nearest")[0, 0].numpy() > 0.5


def mask_ious(masks: np.ndarray) -> np.ndarray:
    """(M, M) float32 IoUs of (M, h, w) 0/1 masks, as the reference's ``iou_between_masks``."""
    m = torch.from_numpy(np.ascontiguousarray(masks.reshape(masks.shape[0], -1), dtype=np.float32))
    diff = torch.cdist(m, m, p=1.0)
    inter = m @ m.T
    return (inter / (diff + inter)).numpy()


def cluster_by_iou(masks: np.ndarray, threshold: float = 0.6) -> list[np.ndarray]:
    """The reference's ``cluster_mask_by_iou``: the member indices of each cluster, in the order found."""
    ious = mask_ious(masks)
    indices, counts = np.unique(np.where(ious > np.float32(threshold))[0], return_counts=True)
    todo = indices[np.argsort(counts)[::-1]].tolist()
    clusters, used = [], set()
    while todo:
        pivot = todo.pop(0)
        members = np.array([pivot]).astype(int)
        for _ in range(PIVOT_ITERATIONS):
            before = len(members)
            members = np.unique(np.concatenate((members, np.flatnonzero(ious[pivot] > np.float32(threshold)))))
            if before == len(members):
                break
            pivot = members[np.argmax(np.sum(ious[members][:, members], axis=1))]
        if pivot not in used:
            members = np.array([i for i in members if i not in used])
            clusters.append(members)
        used.update(int(i) for i in members)
        todo = [i for i in todo if i not in used]
    return clusters


# ------------------------------------------------------------------------------------------------ the votes
def vote(instances: Sequence[np.ndarray], tau_m: float = 0.2, iou_threshold: float = 0.6,
         max_objects: int = 10) -> tuple[list[np.ndarray], list[int]]:
    """Voted masks (bool, largest cluster first) and their cluster sizes from same-grid instance masks."""
    if not len(instances):
        return [], []
    masks = np.array(instances, dtype=np.float32)
    objects = []
    for members in cluster_by_iou(masks, iou_threshold)[:max_objects]:
        cluster = masks[members]
        mean = np.sum(cluster, axis=0) / cluster.shape[0]
        objects.append((mean > tau_m, len(members)))
    objects = sorted(objects, key=lambda o: o[1], reverse=True)
    kept = [(m, n) for m, n in objects if m.any()]
    return [m for m, _ in kept], [n for _, n in kept]


def votecut_groups(eigvec_groups: Sequence[np.ndarray], grid: tuple[int, int], ks: Sequence[int] = (2, 3),
                   tau_m: float = 0.2, iou_threshold: float = 0.6, max_objects: int = 10, min_size: int = 5
                   ) -> tuple[list[np.ndarray], list[int], int]:
    """Steps 2-5 over one (num, h, w) eigenvector array per backbone: instances of each group at its own grid,
    resized to ``grid`` (nearest), voted together. Returns the masks, cluster sizes and number of instances."""
    instances = []
    for group in eigvec_groups:
        labellings = [kmeans_labels(v, int(k)) for v in group for k in ks]
        instances += [resize_nearest(m, grid) for m in instance_masks(labellings, min_size)]
    masks, sizes = vote(instances, tau_m, iou_threshold, max_objects)
    return masks, sizes, len(instances)


def check_votecut_params(tau: float, eps: float, num_eigenvectors: int, ks, tau_m: float, iou_threshold: float,
                         max_objects: int, min_size: int) -> None:
    """ValueError naming the first bad parameter."""
    if not -1 < float(tau) < 1:
        raise ValueError(f"votecut: tau must be in (-1, 1) (a cosine similarity threshold), got {tau!r}")
    if not float(eps) > 0:
        raise ValueError(f"votecut: eps must be > 0, got {eps!r}")
    for key, value in (("num_eigenvectors", num_eigenvectors), ("max_objects", max_objects),
                       ("min_size", min_size)):
        check_positive_int("votecut", key, value)
    if isinstance(ks, (str, bytes)) or not len(ks) or any(
            isinstance(k, bool) or int(k) != k or int(k) < 2 for k in ks):
        raise ValueError(f"votecut: ks must be a non-empty list of k-means cluster counts >= 2, e.g. [2, 3]; "
                         f"got {ks!r}")
    if not 0 <= float(tau_m) < 1:
        raise ValueError(f"votecut: tau_m must be in [0, 1) (the share of a cluster's masks that must cover a "
                         f"patch), got {tau_m!r}")
    if not 0 <= float(iou_threshold) < 1:
        raise ValueError(f"votecut: iou_threshold must be in [0, 1), got {iou_threshold!r}")


def votecut(feats: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int], *,
            tau: float = 0.15, eps: float = 1e-5, num_eigenvectors: int = 1, ks: tuple[int, ...] = (2, 3),
            tau_m: float = 0.2, iou_threshold: float = 0.6, max_objects: int = 10, min_size: int = 5
            ) -> VoteCutResult:
    """VoteCut on one backbone's patch features ``feats`` (N, D) of an (h, w) grid; see the module docstring."""
    return votecut_ensemble([(feats, dims)], patch_size, image_size, tau=tau, eps=eps,
                            num_eigenvectors=num_eigenvectors, ks=ks, tau_m=tau_m, iou_threshold=iou_threshold,
                            max_objects=max_objects, min_size=min_size)


def votecut_ensemble(groups: Sequence[tuple[torch.Tensor, tuple[int, int]]], patch_size: int,
                     image_size: tuple[int, int], *, finest: int = 0, tau: float = 0.15, eps: float = 1e-5,
                     num_eigenvectors: int = 1, ks: tuple[int, ...] = (2, 3), tau_m: float = 0.2,
                     iou_threshold: float = 0.6, max_objects: int = 10, min_size: int = 5) -> VoteCutResult:
    """VoteCut over several backbones' features of one image: ``groups[i]`` = (features (N_i, D_i), grid (h_i, w_i))
    of backbone i. Each backbone's instances are resized (nearest) to the grid of ``groups[finest]`` (whose patch is
    ``patch_size``, on the unpadded ``image_size``) and voted together; the boxes, masks and picture are on that
    grid. One group is :func:`votecut`."""
    if not len(groups) or not 0 <= int(finest) < len(groups):
        raise ValueError(f"votecut: need a non-empty list of (feats, dims) groups and finest in [0, {len(groups)}), "
                         f"got {len(groups)} groups and finest={finest!r}")
    check_votecut_params(tau, eps, num_eigenvectors, ks, tau_m, iou_threshold, max_objects, min_size)
    feats = [as_feats(f, "votecut") for f, _ in groups]
    grids = [check_grid(f.shape[0], d, patch_size, image_size, "votecut")[:2] for f, (_, d) in zip(feats, groups)]
    (h, w), (H, W), p = grids[int(finest)], (int(image_size[0]), int(image_size[1])), int(patch_size)
    vecs = [ncut_eigenvectors(f, g, float(tau), float(eps), int(num_eigenvectors)) if g[0] * g[1] > 2 else None
            for f, g in zip(feats, grids)]
    usable = [v for v in vecs if v is not None]
    masks, sizes, n = votecut_groups(usable, (h, w), tuple(int(k) for k in ks), float(tau_m), float(iou_threshold),
                                     int(max_objects), int(min_size)) if usable else ([], [], 0)
    eigvec = vecs[int(finest)][0] if vecs[int(finest)] is not None else np.zeros((h, w))
    seed = int(np.argmax(np.abs(eigvec)))
    if not masks:
        full = np.ones((h, w), dtype=bool)
        return VoteCutResult(boxes=[np.array([0.0, 0.0, float(W), float(H)])], scores=[0.0], masks=[full],
                             cluster_sizes=[0], num_instances=n, eigvec=eigvec, bipartition=full, seed=seed,
                             degenerate=True)
    return VoteCutResult(boxes=[grid_mask_box(m, p, (H, W)) for m in masks],
                         scores=[s / sizes[0] for s in sizes], masks=masks, cluster_sizes=sizes, num_instances=n,
                         eigvec=eigvec, bipartition=np.logical_or.reduce(masks), seed=seed)
