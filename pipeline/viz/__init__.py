"""Pictures: what a miner did (seed, expansion, cuts, FOUND's background), detections, galleries. Drawing only."""
from __future__ import annotations

from pipeline.viz.cut import draw_cut
from pipeline.viz.found import draw_found
from pipeline.viz.mining import contact_sheet, draw_mining, save_png

__all__ = ["draw_result", "draw_mining", "draw_cut", "draw_found", "contact_sheet", "save_png"]


def draw_result(image, result, patch_size: int, gt_boxes=None, title: str = ""):
    """The picture of any miner's result: the cut panels (eigenvector, bipartition) for normalized-cut miners,
    FOUND's panels (its map, the background) for FOUND, else the LOST/DINO-seg overlay."""
    if getattr(result, "bkg_mask", None) is not None:
        return draw_found(image, result, patch_size, gt_boxes=gt_boxes, title=title)
    if getattr(result, "eigvec", None) is not None:
        return draw_cut(image, result, patch_size, gt_boxes=gt_boxes, title=title)
    return draw_mining(image, result, patch_size, gt_boxes=gt_boxes, title=title)
