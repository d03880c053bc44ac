"""One self-training prediction pass: a detector predicts on the training images and the round's pseudo-labels are
merged (:func:`pipeline.detection.self_training.next_round`, what `make self-train` does before each round's
training). Times the whole pass (decode, detector, masks to RLE, merge) on real images of the repository's
fixtures, and reports images/s and peak memory. Random weights: speed does not depend on them (a random detector's
scores are low, so the merge keeps few predictions: the detector's own cost dominates either way). Examples::

    python benchmarks/self_train_pass.py                                   # CUDA if present
    python benchmarks/self_train_pass.py --device cpu --preset cascade_mask_mobilenet_fpn --images 8
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.artifacts import coco_boxes_dataset  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.detection.builders import PRESETS, build_detector  # noqa: E402
from pipeline.detection.self_training import next_round  # noqa: E402


def previous_labels(records, root: Path) -> dict:
    """A pseudo-label file of one box per image (the centre half), as a mine stage would write one."""
    images, anns = [], []
    for r in records:
        from PIL import Image

        w, h = Image.open(r.path).size
        images.append({"id": int(r.coco_id), "file_name": str(Path(r.path).relative_to(root)), "width": w, "height": h})
        anns.append({"image_id": int(r.coco_id), "bbox_xyxy": [w / 4, h / 4, 3 * w / 4, 3 * h / 4], "category_id": 1})
    return coco_boxes_dataset(images, anns, info={"image_root": str(root)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cascade_mask_r50_fpn", choices=PRESETS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=None, help="images of the COCO fixture (default 16 on CUDA, 6 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per detector call (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--size", type=int, default=800, help="the detector's test shorter side")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    n, batch = a.images or (16 if cuda else 6), a.batch or (8 if cuda else 2)
    ds = build_dataset("coco", str(ROOT / "tests" / "data" / "coco-tiny"), max_images=n)
    root = Path(ds.records[0].path).parent
    model = build_detector(a.preset, 1, init="random", min_size=a.size, test_min_size=a.size)
    previous = previous_labels(ds.records, root)
    next_round(model, previous, root, score_threshold=0.7, device=a.device, batch_size=batch)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = next_round(model, previous, root, score_threshold=0.7, device=a.device, batch_size=batch)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    st = out["info"]["self_training"]
    print(f"device: {name}; {a.preset}, {len(ds)} COCO images at shorter side {a.size}, batch {batch}")
    print(f"self-training pass: {len(ds) / dt:.2f} images/s ({dt:.2f} s), peak {peak / 2**30:.2f} GiB "
          f"({'GPU allocated' if cuda else 'process max RSS'}); kept {st['prediction']} predictions, "
          f"{st['previous']} previous objects")


if __name__ == "__main__":
    main()
