"""DINO CLS features of box crops, cached on disk, and the reference's post-processing.

For every annotation of a COCO dataset (``pseudo_boxes.json`` or thresholded detections), the box is
cropped from the original image, resized (shorter side 256, bicubic) and trimmed to whole patches
(see :mod:`pipeline.clustering.crops`), normalised with the backbone's ``preprocess_image`` and
embedded (final CLS token). Crops of equal shape are batched together, which gives the same
features as the reference's one-crop-at-a-time loop.

Cache: ``features.npy`` (raw CLS tokens, float32, one row per kept annotation, in annotation order)
and ``features_index.json`` (key, ``[annotation id, image id]`` rows, skipped boxes, features
sha256). The key hashes the boxes, image file names, backbone ``describe()`` and crop parameters;
when it matches, nothing is recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_path, read_json, sha256_file, sha256_json, write_json
from pipeline.boxes import xywh_to_xyxy
from pipeline.clustering.crops import batches_by_shape, crop_box, resize_shorter, trim_to_patch

FEATURES_FILE = "features.npy"
INDEX_FILE = "features_index.json"


@dataclass
class BoxFeatures:
    """Features of the kept boxes; ``index[i] = (annotation id, image id)`` of ``features[i]``."""

    features: np.ndarray
    index: list[tuple[int, int]]
    skipped: list[dict] = field(default_factory=list)
    from_cache: bool = False
    key: str = ""


@dataclass
class _Box:
    ann_id: int
    image_id: int
    file_name: str
    xyxy: list[float]


def _boxes_of(coco: dict) -> list[_Box]:
    images = {int(im["id"]): im for im in coco.get("images", [])}
    out = []
    for a in coco.get("annotations", []):
        im = images.get(int(a["image_id"]))
        if im is None:
            raise ValueError(f"annotation {a.get('id')} refers to image id {a['image_id']} that is not in "
                             "'images': the box file is inconsistent; rerun the stage that wrote it.")
        if "file_name" not in im:
            raise ValueError(f"image id {im['id']} has no 'file_name': cannot find the image to crop.")
        xyxy = [float(v) for v in xywh_to_xyxy([a["bbox"]])[0]]
        out.append(_Box(int(a["id"]), int(a["image_id"]), str(im["file_name"]), xyxy))
    return out


def cache_key(boxes: list[_Box], backbone_desc: dict, crop_params: dict) -> str:
    return sha256_json({"boxes": [[b.ann_id, b.image_id, b.file_name, b.xyxy] for b in boxes],
                        "backbone": backbone_desc, "crop": crop_params})


def _load_cache(cache_dir: Path, key: str) -> BoxFeatures | None:
    idx_path, feat_path = cache_dir / INDEX_FILE, cache_dir / FEATURES_FILE
    if not (idx_path.is_file() and feat_path.is_file()):
        return None
    try:
        meta = read_json(idx_path, "feature index")
    except Exception:  # a corrupt cache is recomputed, not fatal
        return None
    if meta.get("key") != key or meta.get("features_sha256") != sha256_file(feat_path):
        return None
    feats = np.load(feat_path)
    index = [(int(a), int(i)) for a, i in meta["index"]]
    if feats.shape[0] != len(index):
        return None
    return BoxFeatures(feats.astype(np.float32, copy=False), index, meta.get("skipped", []), True, key)


def _save_cache(cache_dir: Path, result: BoxFeatures) -> None:
    feat_path = cache_dir / FEATURES_FILE
    with atomic_path(feat_path, suffix=".npy") as tmp:
        np.save(tmp, result.features)
    write_json(cache_dir / INDEX_FILE, {
        "key": result.key,
        "features_sha256": sha256_file(feat_path),
        "shape": list(result.features.shape),
        "index": [list(t) for t in result.index],
        "skipped": result.skipped,
    }, indent=None)


def _backbone_device(backbone):
    import torch

    dev = getattr(backbone, "device", None)
    if dev is not None:
        return torch.device(dev)
    params = getattr(backbone, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def extract_box_features(
    coco: dict,
    image_root: str | Path,
    backbone,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    short_side: int = 256,
    max_size: int | None = None,
) -> BoxFeatures:
    """CLS features (n, D) float32 of every box of the COCO dataset ``coco``.

    Images are ``image_root / file_name`` (absolute file names are used as is). A missing or
    unreadable image skips its boxes; they are listed in ``.skipped`` with the reason. With
    ``cache_dir``, a matching cache is returned (``.from_cache = True``) and a new result is saved.
    """
    import torch

    from pipeline.data.preprocess import preprocess_image
    from pipeline.data import ImageLoadError, load_image

    boxes = _boxes_of(coco)
    patch = int(backbone.patch_size)
    crop_params = {"short_side": short_side, "max_size": max_size, "interpolation": "bicubic-pil",
                   "rounding": "half-even", "trim_to_patch": patch}
    key = cache_key(boxes, backbone.describe(), crop_params)
    if cache_dir is not None:
        cached = _load_cache(Path(cache_dir), key)
        if cached is not None:
            return cached

    by_image: dict[int, list[int]] = {}
    for pos, b in enumerate(boxes):
        by_image.setdefault(b.image_id, []).append(pos)
    skipped: list[dict] = []
    root = Path(image_root)

    def crops():
        for image_id, positions in by_image.items():
            fname = boxes[positions[0]].file_name
            path = Path(fname) if Path(fname).is_absolute() else root / fname
            try:
                img = load_image(path)
            except ImageLoadError as e:  # missing, unreadable or corrupt: skip its boxes, report them
                skipped.extend({"annotation_id": boxes[p].ann_id, "image_id": image_id,
                                "reason": str(e)} for p in positions)
                continue
            for p in positions:
                crop = resize_shorter(crop_box(img, boxes[p].xyxy), short_side, max_size)
                if min(crop.shape[:2]) < patch:  # a sliver: max_size capped its longer side below one patch across
                    skipped.append({"annotation_id": boxes[p].ann_id, "image_id": image_id, "reason": (
                        f"box {boxes[p].xyxy} of {fname} resized to {crop.shape[1]}x{crop.shape[0]} px (max_size="
                        f"{max_size}) is thinner than one {patch} px patch; raise max_size to embed it")})
                    continue
                yield p, trim_to_patch(crop, patch)

    device = _backbone_device(backbone)
    rows: dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(boxes), desc="box features", unit="box")
    with torch.no_grad():
        for positions, arrays in batches_by_shape(crops(), batch_size):
            x = torch.stack([preprocess_image(a, patch)[0] for a in arrays]).to(device)
            out = backbone.embed(x).detach().float().cpu().numpy()
            if out.ndim != 2 or out.shape[0] != len(positions):
                raise RuntimeError(f"backbone.embed returned shape {out.shape} for a batch of {len(positions)}")
            rows.update(zip(positions, out))
            if bar is not None:
                bar.update(len(positions))
    if bar is not None:
        bar.close()

    kept = sorted(rows)
    dim = next(iter(rows.values())).shape[0] if rows else 0
    feats = np.stack([rows[p] for p in kept]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    result = BoxFeatures(feats, [(boxes[p].ann_id, boxes[p].image_id) for p in kept], skipped, False, key)
    if cache_dir is not None:
        _save_cache(Path(cache_dir), result)
    return result


# --------------------------------------------------------------------------- post-processing
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def whiten(x: np.ndarray) -> np.ndarray:
    """Each dimension divided by its standard deviation over the rows (``scipy.cluster.vq.whiten``:
    population std, no centring; a constant dimension is left unscaled)."""
    x = np.asarray(x, dtype=np.float32)
    std = x.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return (x / std).astype(np.float32)


def prepare_features(x: np.ndarray, whiten_features: bool = True, normalize: bool = True) -> np.ndarray:
    """The reference's chain: L2-normalise the CLS tokens, whiten, L2-normalise again.

    ``normalize=False`` drops both normalisations; ``whiten_features=False`` drops the whitening
    (leaving one L2 normalisation).
    """
    x = np.asarray(x, dtype=np.float32)
    if normalize:
        x = l2_normalize(x)
    if whiten_features:
        x = whiten(x)
    if normalize:
        x = l2_normalize(x)
    return x


def load_box_crops(coco: dict, image_root: str | Path, ann_ids) -> dict[int, np.ndarray]:
    """Raw crops (``crop_box`` geometry, no resize) of the annotations ``ann_ids``, for galleries.

    Annotations whose image cannot be read are left out.
    """
    from pipeline.data import ImageLoadError, load_image

    wanted = {int(a) for a in ann_ids}
    by_image: dict[str, list[_Box]] = {}
    for b in _boxes_of(coco):
        if b.ann_id in wanted:
            by_image.setdefault(b.file_name, []).append(b)
    out = {}
    for fname, bs in by_image.items():
        path = Path(fname) if Path(fname).is_absolute() else Path(image_root) / fname
        try:
            img = load_image(path)
        except ImageLoadError:
            continue
        for b in bs:
            out[b.ann_id] = crop_box(img, b.xyxy)
    return out
