"""Cluster galleries: a grid of box crops per cluster, so a person can see what a cluster is.

Naming, the same everywhere: a cluster is a COCO category of ``pseudo_labels.json`` (K-means label
``c`` -> category id ``c + 1``, name ``cluster_<c>``, :func:`pipeline.clustering.labels.cluster_categories`).
Its gallery is ``<name>.png`` (``cluster_9.png``) and is captioned ``cluster_9 (id 10)``
(:func:`pipeline.names.cluster_caption`), as the Hungarian table (:func:`pipeline.evaluation.hungarian.to_markdown`)
shows the clusters; the title is also stored in the PNG's ``Title`` text chunk."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.names import cluster_caption  # noqa: F401 - the one caption of a cluster (re-exported)
from pipeline.viz.style import font_for, save_png

_TITLE_H = 18
_PAD = 2
_BG = (40, 40, 40)


def thumbnail(crop: np.ndarray, size: int) -> Image.Image:
    """Fit a (h, w, 3) uint8 crop in a ``size`` x ``size`` tile, aspect kept, centred on grey. A crop of
    any size: a 1 x 1 crop fills the tile, an empty one (0 pixels wide or high, e.g. of a box outside its
    image) leaves the tile grey."""
    size = max(1, int(size))
    tile = Image.new("RGB", (size, size), (128, 128, 128))
    arr = np.ascontiguousarray(np.asarray(crop, dtype=np.uint8))
    if arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        return tile
    img = Image.fromarray(arr).convert("RGB")
    scale = size / max(img.width, img.height)
    w, h = min(size, max(1, round(img.width * scale))), min(size, max(1, round(img.height * scale)))
    tile.paste(img.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return tile


def cluster_gallery(crops: Sequence[np.ndarray], out_path: str | Path, title: str = "", n: int = 16,
                    thumb: int = 96, cols: int = 8) -> Path:
    """Write a PNG grid of the first ``n`` crops under a one-line ``title`` (PIL default font)."""
    crops = list(crops)[:n]
    thumb = max(1, int(thumb))
    cols = max(1, min(cols, len(crops) or 1))
    rows = max(1, -(-len(crops) // cols))
    font = font_for(title, 13)
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 2 * _PAD + 4 if title else 0
    width = max(cols * (thumb + _PAD) + _PAD, title_w)  # the title is never cut off
    height = _TITLE_H + rows * (thumb + _PAD) + _PAD
    canvas = Image.new("RGB", (width, height), _BG)
    ImageDraw.Draw(canvas).text((_PAD + 2, 3), title, fill=(255, 255, 255), font=font)
    for i, crop in enumerate(crops):
        r, c = divmod(i, cols)
        canvas.paste(thumbnail(crop, thumb), (_PAD + c * (thumb + _PAD), _TITLE_H + _PAD + r * (thumb + _PAD)))
    return save_png(canvas, out_path, title=title)


def _file_stem(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "cluster"


def write_cluster_galleries(crops_by_cluster: Mapping[int, Sequence[np.ndarray]], out_dir: str | Path,
                            sizes: Mapping[int, int] | None = None, n: int = 16, thumb: int = 96,
                            note: str = "", categories: Mapping[int, dict] | Sequence[dict] | None = None
                            ) -> list[Path]:
    """One ``<category name>.png`` per cluster in ``out_dir``, keyed by K-means label ``k``.

    ``categories`` gives each label's COCO category (``{"id", "name"}``): a mapping label -> category,
    or the ``categories`` list of ``pseudo_labels.json`` (label ``k`` = category id ``k + 1``); by default
    :func:`pipeline.clustering.labels.cluster_categories`' naming (id ``k + 1``, name ``cluster_<k>``).
    Titles: :func:`cluster_caption`, the cluster size when known, then ``note`` (e.g. a random-weights
    warning)."""
    if categories is None:
        cats = {int(k): {"id": int(k) + 1, "name": f"cluster_{int(k)}"} for k in crops_by_cluster}
    elif isinstance(categories, Mapping):
        cats = {int(k): dict(v) for k, v in categories.items()}
    else:
        by_id = {int(c["id"]): c for c in categories}
        cats = {int(k): by_id.get(int(k) + 1, {"id": int(k) + 1, "name": f"cluster_{int(k)}"})
                for k in crops_by_cluster}
    paths = []
    for k in sorted(crops_by_cluster):
        cat = cats.get(int(k), {"id": int(k) + 1, "name": f"cluster_{int(k)}"})
        size = f" ({sizes[k]} boxes)" if sizes is not None and k in sizes else ""
        title = f"{cluster_caption(cat['id'], cat['name'])}{size}{'  ' + note if note else ''}"
        paths.append(cluster_gallery(crops_by_cluster[k], Path(out_dir) / f"{_file_stem(cat['name'])}.png",
                                     title, n=n, thumb=thumb))
    return paths
