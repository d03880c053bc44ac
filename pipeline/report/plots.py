"""The report's pictures: matplotlib figures rendered to PNG with the Agg canvas (no pyplot, no global
backend switch), each written atomically. A figure made from random weights carries a watermark."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.artifacts import atomic_path

RANDOM_MARK = "RANDOM WEIGHTS - smoke test, not a result"


def _figure(w: float, h: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: str | os.PathLike, random_init: bool) -> Path:
    if random_init:
        size = max(6.0, min(13.0, 2.2 * fig.get_figwidth()))  # fits the narrow figures too
        fig.text(0.5, 0.5, RANDOM_MARK, ha="center", va="center", fontsize=size, color="#c00000", alpha=0.35,
                 rotation=20, weight="bold")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def histogram(values: Sequence[float], path, *, title: str, xlabel: str, bins: int = 20,
              random_init: bool = False) -> Path:
    fig, (ax,) = _figure(5.5, 3.2)
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size:
        ax.hist(v, bins=bins, color="#4472c4", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save(fig, path, random_init)


def training_curves(rows: Sequence[dict], path, *, title: str, random_init: bool = False) -> Path:
    """Loss terms (every ``loss*`` key) and the learning rate against the iteration (metrics.jsonl rows)."""
    fig, (ax_loss, ax_lr) = _figure(9, 3.2, ncols=2)
    rows = [r for r in rows if "iteration" in r]
    it = [r["iteration"] for r in rows]
    keys = sorted({k for r in rows for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    for k in keys:
        ax_loss.plot(it, [r.get(k, np.nan) for r in rows], marker="." if len(rows) < 30 else None,
                     lw=2 if k == "loss" else 1, label=k)
    if keys:
        ax_loss.legend(fontsize=7)
    ax_loss.set_title(f"{title}: loss", fontsize=10)
    ax_loss.set_xlabel("iteration")
    ax_lr.plot(it, [r.get("lr", np.nan) for r in rows], color="#ed7d31", marker="." if len(rows) < 30 else None)
    ax_lr.set_title(f"{title}: learning rate", fontsize=10)
    ax_lr.set_xlabel("iteration")
    return _save(fig, path, random_init)


def bars(labels: Sequence[str], values: Sequence[float], path, *, title: str, ylabel: str,
         random_init: bool = False) -> Path:
    fig, (ax,) = _figure(max(4.0, 0.35 * len(labels) + 2), 3.2)
    ax.bar(range(len(values)), values, color="#4472c4")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 8 else 0, fontsize=7 if len(labels) > 20 else 9)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    return _save(fig, path, random_init)


def heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], path, *, title: str,
            random_init: bool = False) -> Path:
    """Counts of a rows x columns table, each cell annotated when the table is small."""
    m = np.asarray(matrix, dtype=np.float64).reshape(len(row_labels), len(col_labels))
    fig, (ax,) = _figure(min(16, 2.5 + 0.45 * len(col_labels)), min(16, 1.8 + 0.35 * len(row_labels)))
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=8)
    if m.size <= 400:
        hi = m.max() if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > 0.6 * hi else "white")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=10)
    return _save(fig, path, random_init)


def rounds(rows: Sequence[dict], path, *, random_init: bool = False) -> Path:
    """CorLoc and AP (box AP50 / AP, mask AP where scored) against the self-training round (round 0: the detector
    the rounds start from); a score not measured is left out."""
    fig, (ax,) = _figure(5.5, 3.2)
    x = [r["round"] for r in rows]
    for key, label in (("corloc", "CorLoc top-1 %"), ("AP50", "AP50"), ("AP", "AP"), ("mask_AP", "mask AP")):
        y = [np.nan if r.get(key) is None else float(r[key]) for r in rows]
        if not all(np.isnan(y)):
            ax.plot(x, y, marker="o", label=label)
    ax.set_xticks(x)
    ax.set_xlabel("self-training round")
    ax.set_title("scores on the training images, per round", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path, random_init)
