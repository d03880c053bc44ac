"""Cluster galleries: a grid of box crops per cluster, so a person can see what a cluster is."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.artifacts import atomic_path

_TITLE_H = 18
_PAD = 2
_BG = (40, 40, 40)


def thumbnail(crop: np.ndarray, size: int) -> Image.Image:
    """Fit a (h, w, 3) uint8 crop in a ``size`` x ``size`` tile, aspect kept, centred on grey."""
    img = Image.fromarray(np.ascontiguousarray(np.asarray(crop, dtype=np.uint8)))
    scale = size / max(img.width, img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    tile = Image.new("RGB", (size, size), (128, 128, 128))
    tile.paste(img.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return tile


def cluster_gallery(crops: Sequence[np.ndarray], out_path: str | Path, title: str = "", n: int = 16,
                    thumb: int = 96, cols: int = 8) -> Path:
    """Write a PNG grid of the first ``n`` crops under a one-line ``title`` (PIL default font)."""
    crops = list(crops)[:n]
    cols = max(1, min(cols, len(crops) or 1))
    rows = max(1, -(-len(crops) // cols))
    width = cols * (thumb + _PAD) + _PAD
    height = _TITLE_H + rows * (thumb + _PAD) + _PAD
    canvas = Image.new("RGB", (width, height), _BG)
    ImageDraw.Draw(canvas).text((_PAD + 2, 3), title, fill=(255, 255, 255))
    for i, crop in enumerate(crops):
        r, c = divmod(i, cols)
        canvas.paste(thumbnail(crop, thumb), (_PAD + c * (thumb + _PAD), _TITLE_H + _PAD + r * (thumb + _PAD)))
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return out_path


def write_cluster_galleries(crops_by_cluster: Mapping[int, Sequence[np.ndarray]], out_dir: str | Path,
                            sizes: Mapping[int, int] | None = None, n: int = 16, thumb: int = 96,
                            note: str = "") -> list[Path]:
    """One ``cluster_<k>.png`` per cluster in ``out_dir``; titles give the cluster size when known,
    then ``note`` (e.g. a random-weights warning)."""
    paths = []
    for k in sorted(crops_by_cluster):
        size = f" ({sizes[k]} boxes)" if sizes is not None and k in sizes else ""
        paths.append(cluster_gallery(crops_by_cluster[k], Path(out_dir) / f"cluster_{k}.png",
                                     f"cluster {k}{size}{'  ' + note if note else ''}", n=n, thumb=thumb))
    return paths
