"""Stage 1, mine: DINO features -> LOST (or DINO-seg) -> one pseudo-box per image, with CorLoc.

    python -m stages.mine dataset=voc07 backbone=dino_vits16 miner=lost
    python -m stages.mine -m mine.shard=0,1,2 mine.num_shards=3       # sharded; merged when all are done
    python -m stages.mine mine.merge_only=true                          # merge finished shards (make merge)

Writes to ``${stage_dir}``: results/ (per-shard JSON-lines journals, resumable), pseudo_boxes.json,
metrics.json, manifest.json, viz/ (pictures) and contact_sheet.png.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.artifacts import read_json, remove_stale_temps, write_json
from pipeline.journal import Journal, canonical_json, discard_journal, meta_path_of
from pipeline.mining import (collect_shards, image_root, mine_images, predictions_from_rows, rows_to_coco,
                             shard_journal_path)
from stages.common import (Timer, build_backbone_from_cfg, build_dataset_from_cfg, config_fingerprint,
                           resolve_device, run_guarded, to_container, up_to_date)


def _miner_params(cfg: DictConfig) -> dict:
    return {k: v for k, v in to_container(cfg.miner).items() if k not in ("name", "stage")}


def _info(cfg: DictConfig, backbone_desc: dict, root: str) -> dict:
    """What produced the boxes; identical for every shard of a run (it goes into pseudo_boxes.json)."""
    return {
        "description": f"{cfg.miner.name} pseudo-boxes",
        "method": str(cfg.miner.name),
        "miner_params": _miner_params(cfg),
        "backbone": backbone_desc,
        "feature": str(cfg.backbone.feature),
        "random_init": backbone_desc.get("init") == "random",
        "weights_sha256": backbone_desc.get("weights_sha256"),
        "dataset": str(cfg.dataset.name),
        "image_root": root,
        "config": {"dataset": to_container(cfg.dataset), "backbone": to_container(cfg.backbone),
                   "miner": to_container(cfg.miner)},
    }


def _fingerprint(cfg: DictConfig) -> str:
    return config_fingerprint(cfg, "dataset", "backbone", "miner", "mine.num_shards")


def _journal_meta(info: dict, n_images: int, num_shards: int) -> dict:
    """Canonical (sorted-key) form, the same whether built here or read back from a journal's meta file,
    so a merge from the journals writes byte-identical artifacts."""
    return canonical_json({"info": info, "n_images": n_images, "num_shards": num_shards})


def _hit_fn(corloc):
    def hit(rec, row):
        if not rec.has_gt:
            return None
        res = corloc({rec.image_id: row["box"]}, [rec])
        return None if res.total == 0 else res.hits == 1
    return hit


def finalize(cfg: DictConfig, stage_dir: Path, dataset, rows: list[dict], meta: dict, timer: Timer,
             run_stats: dict) -> dict:
    """Every shard is done: write pseudo_boxes.json, metrics.json, the contact sheet and the manifest."""
    from pipeline.artifacts import write_manifest
    from pipeline.evaluation.corloc import corloc
    from pipeline.viz.mining import contact_sheet

    info = meta["info"]
    write_json(stage_dir / "pseudo_boxes.json", rows_to_coco(rows, info))
    failures = [{"image_id": r["image_id"], "path": r["path"], "error": r["error"]} for r in rows if r["error"]]
    metrics = {"images": len(rows), "boxes": sum(r["box"] is not None for r in rows),
               "failures": len(failures), "failed_images": failures, "method": info["method"],
               "backbone": info["backbone"]["arch"], "random_init": info["random_init"],
               "corloc": None, "corloc_hits": None, "corloc_total": None, **run_stats}
    if dataset.has_gt:
        res = corloc(predictions_from_rows(rows), dataset.records)
        metrics.update(corloc=res.corloc, corloc_hits=res.hits, corloc_total=res.total)
    write_json(stage_dir / "metrics.json", metrics)
    n_sheet = int(cfg.viz.contact_sheet)
    if n_sheet > 0:
        pics = sorted(p for p in (stage_dir / "viz").glob("*.png") if not p.name.startswith("."))[:n_sheet]
        contact_sheet(pics, stage_dir / "contact_sheet.png")
    write_manifest(stage_dir, stage="mine", config=to_container(cfg), start_time=timer.start,
                   end_time=time.time(), weights_sha256=info.get("weights_sha256"),
                   extra={"num_shards": meta["num_shards"], "images": len(rows),
                          "fingerprint": _fingerprint(cfg)})
    return metrics


def _print_summary(stage_dir: Path, metrics: dict) -> None:
    lines = [f"mine: {metrics['images']} images, {metrics['boxes']} boxes, {metrics['failures']} failed"]
    if metrics.get("seconds"):
        lines[0] += f", {metrics['seconds']:.1f} s ({metrics['images_per_s']:.2f} images/s this run)"
    if metrics["corloc"] is not None:
        tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if metrics["random_init"] else ""
        lines.append(f"CorLoc: {metrics['corloc']:.2f} % ({metrics['corloc_hits']}/{metrics['corloc_total']}){tag}")
    for f in metrics["failed_images"][:10]:
        lines.append(f"  failed: {f['path']}: {f['error']}")
    lines.append(f"artifacts: {stage_dir}/ (pseudo_boxes.json, metrics.json, manifest.json, viz/, contact_sheet.png)")
    print("\n".join(lines), flush=True)


def merge_only(cfg: DictConfig) -> dict | None:
    timer = Timer()
    stage_dir = Path(cfg.stage_dir)
    n = int(cfg.mine.num_shards)
    meta = read_json(meta_path_of(shard_journal_path(stage_dir / "results", 0, n)), "shard journal meta",
                     hint=f"Run the {n} mining shards first (mine.num_shards={n}).")
    dataset = build_dataset_from_cfg(cfg)
    rows = collect_shards(stage_dir / "results", len(dataset), n, meta)
    if rows is None:
        raise SystemExit(f"not every shard of {stage_dir}/results is complete yet; run the missing shards "
                         f"(mine.shard=I mine.num_shards={n}) and merge again.")
    metrics = finalize(cfg, stage_dir, dataset, rows, meta, timer, {})
    _print_summary(stage_dir, metrics)
    return metrics


def run(cfg: DictConfig) -> dict | None:
    if cfg.mine.get("merge_only", False):
        return merge_only(cfg)
    from pipeline.data import load_image
    from pipeline.evaluation.corloc import corloc
    from pipeline.viz.mining import draw_mining, save_png

    timer = Timer()
    device = resolve_device(cfg.device)
    stage_dir = Path(cfg.stage_dir)
    shard, n_shards = int(cfg.mine.shard), int(cfg.mine.num_shards)
    fingerprint = _fingerprint(cfg)
    if not cfg.mine.force and up_to_date(stage_dir, fingerprint, ("pseudo_boxes.json", "metrics.json")):
        metrics = read_json(stage_dir / "metrics.json")
        # backbone.init=auto that fell back to random weights: look for the weights again
        if not (cfg.backbone.init == "auto" and metrics.get("random_init")):
            print(f"mine: {stage_dir} is up to date (same config, complete); FORCE=1 (mine.force=true) redoes it.")
            _print_summary(stage_dir, metrics)
            return metrics
    dataset = build_dataset_from_cfg(cfg)
    if len(dataset) == 0:
        raise SystemExit(f"dataset {cfg.dataset.name} at {cfg.dataset.root} has no images.")
    backbone = build_backbone_from_cfg(cfg, device)
    meta = _journal_meta(_info(cfg, backbone.describe(), image_root(dataset.records)), len(dataset), n_shards)
    journal_path = shard_journal_path(stage_dir / "results", shard, n_shards)
    if cfg.mine.force:
        discard_journal(journal_path)
        for name in ("pseudo_boxes.json", "metrics.json", "manifest.json"):
            (stage_dir / name).unlink(missing_ok=True)
        shutil.rmtree(stage_dir / "viz", ignore_errors=True)
    journal = Journal(journal_path, meta)
    if n_shards == 1:  # a killed run may have left half-written temp files (shards may be writing theirs)
        for d in (stage_dir, stage_dir / "viz"):
            remove_stale_temps(d)

    n_viz = int(cfg.viz.num_images)

    def picture(index, rec, result, row):
        if index >= n_viz:
            return
        img = load_image(rec.path)
        title = f"{rec.image_id}  {cfg.miner.name}" + ("  RANDOM WEIGHTS" if meta["info"]["random_init"] else "")
        pic = draw_mining(img, result, backbone.patch_size, rec.boxes if rec.has_gt else None, title)
        save_png(pic, stage_dir / "viz" / f"{index:06d}_{Path(rec.image_id).stem}.png")

    stats = mine_images(dataset, backbone, miner=str(cfg.miner.name), miner_params=_miner_params(cfg),
                        feature=str(cfg.backbone.feature), journal=journal, shard=shard, num_shards=n_shards,
                        num_workers=int(cfg.num_workers), device=device, progress=bool(cfg.progress),
                        on_result=picture, hit_fn=_hit_fn(corloc))
    run_stats = {"seconds": round(stats.seconds, 3), "images_per_s": round(stats.images_per_s, 3),
                 "computed_this_run": stats.computed, "resumed": stats.resumed}
    if stats.resumed:
        print(f"resumed: {stats.resumed} images already mined in {journal_path}, {stats.computed} computed now")
    rows = collect_shards(stage_dir / "results", len(dataset), n_shards, meta)
    if rows is None:
        print(f"shard {shard}/{n_shards} done ({stats.computed} images mined). Waiting for the other shards; "
              f"`make merge` merges them when all are done.", flush=True)
        return None
    if not cfg.mine.merge:
        return None
    metrics = finalize(cfg, stage_dir, dataset, rows, meta, timer, run_stats)
    _print_summary(stage_dir, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="mine")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
