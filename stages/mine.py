"""Stage 1, mine: DINO features -> a miner (LOST, DINO-seg, ...) -> ranked pseudo-boxes, with CorLoc.

    python -m stages.mine dataset=voc07 backbone=dino_vits16 miner=lost
    python -m stages.mine -m mine.shard=0,1,2 mine.num_shards=3       # sharded; merged when all are done
    python -m stages.mine mine.merge_only=true                          # merge finished shards (make merge)

Writes to ``${dirs.mine}``: results/ (per-shard JSON-lines journals, resumable), pseudo_boxes.json,
metrics.json, manifest.json, viz/ (pictures) and contact_sheet.png. A rerun with only ``viz.*`` changed
redraws the pictures and leaves the boxes untouched (pipeline/rerun.py); a grown image set mines only
the new images; failed images are retried.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from omegaconf import DictConfig

from pipeline.artifacts import (begin_replacement, commit_replacement, read_json, recover_replacement,
                                remove_stale_temps, replacement_dir, write_json)
from pipeline.data.paths import records_root
from pipeline.journal import JournalMismatch
from pipeline.mining import MiningRun, all_boxes, first_boxes, mine_images, shard_indices
from pipeline.provenance import random_init
from pipeline.rerun import plan_rerun
from stages.common import (StageError, Timer, build_backbone_from_cfg, build_dataset_from_cfg, dataset_identity,
                           resolve_device, run_guarded, to_container)
from stages.config import stage_main

OUTPUTS = ("pseudo_boxes.json", "metrics.json")


def _backbone_cfg(cfg: DictConfig, backbone) -> dict:
    """The backbone settings with ``init`` as built: ``backbone.init=auto`` (``make demo``) is the pretrained
    or the random model it resolved to, so a plain ``make mine`` (pretrained) of the same model is the same
    configuration."""
    return {**to_container(cfg.backbone), "init": backbone.init}


def _found_weights_now(cfg: DictConfig, stage_dir: Path, backbone) -> bool:
    """``backbone.init=auto`` fell back to random weights last time and found the real ones now: the demo
    redoes its boxes with them (as if forced) instead of refusing the changed init."""
    if cfg.backbone.init != "auto" or backbone.init != "pretrained" or not (stage_dir / "metrics.json").is_file():
        return False
    return bool(read_json(stage_dir / "metrics.json").get("random_init"))


def _artifact(cfg: DictConfig, backbone_cfg: dict) -> dict:
    """What decides the boxes (the image list is per image: a grown set is not a new configuration);
    ``backbone_cfg``: :func:`_backbone_cfg`."""
    return {"dataset": dataset_identity(cfg), "backbone": backbone_cfg,
            "miner": to_container(cfg.miner), "num_shards": int(cfg.mine.num_shards)}


def _report(cfg: DictConfig) -> dict:
    return {"viz": {"num_images": int(cfg.viz.num_images), "contact_sheet": int(cfg.viz.contact_sheet)}}


def _info(cfg: DictConfig, backbone, root: str) -> dict:
    """What produced the boxes; identical for every shard of a run (it goes into pseudo_boxes.json)."""
    miner, backbone_desc = to_container(cfg.miner), backbone.describe()
    return {
        "description": f"{cfg.miner.name} pseudo-boxes",
        "method": str(cfg.miner.name),
        "miner_params": {k: v for k, v in miner.items() if k != "name"},
        "backbone": backbone_desc,
        "feature": str(cfg.backbone.feature),
        "random_init": random_init(backbone=backbone_desc),
        "weights_sha256": backbone_desc.get("weights_sha256"),
        "dataset": str(cfg.dataset.name),
        "image_root": root,
        "config": {"dataset": dataset_identity(cfg), "backbone": _backbone_cfg(cfg, backbone), "miner": miner},
    }


def _hit(rec, row) -> bool | None:
    """Whether the image's first box hits its GT (the running CorLoc of the progress bar)."""
    from pipeline.evaluation.corloc import corloc

    if not rec.has_gt:
        return None
    res = corloc(first_boxes([row]), [rec])
    return None if res.total == 0 else res.hits == 1


class Pictures:
    """Mining pictures of the first ``viz.num_images`` images and their contact sheet."""

    def __init__(self, cfg: DictConfig, stage_dir: Path, backbone, random_init: bool) -> None:
        self.n = int(cfg.viz.num_images)
        self.n_sheet = int(cfg.viz.contact_sheet)
        self.dir = stage_dir / "viz"
        self.sheet = stage_dir / "contact_sheet.png"
        self.patch = backbone.patch_size
        self.tag = f"  {cfg.miner.name}" + ("  RANDOM WEIGHTS" if random_init else "")

    def __call__(self, index, rec, result, row, size) -> None:
        """Drawn on the image as the miner saw it (resized when dataset.max_side or the miner's size say so)."""
        from pipeline.data import load_image
        from pipeline.data.loader import resize_to
        from pipeline.viz import draw_result, save_png

        if index >= self.n:
            return
        img = load_image(rec.path)
        gt = rec.boxes if rec.has_gt else None
        if img.shape[:2] != tuple(size):
            fy, fx = size[0] / img.shape[0], size[1] / img.shape[1]
            img = resize_to(img, size)
            gt = None if gt is None else np.asarray(gt, dtype=np.float64) * [fx, fy, fx, fy]
        pic = draw_result(img, result, self.patch, gt, f"{rec.image_id}{self.tag}")
        save_png(pic, self.dir / f"{index:06d}_{Path(rec.image_id).stem}.png")

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.sheet.unlink(missing_ok=True)

    def write_sheet(self) -> list[str]:
        from pipeline.viz.mining import contact_sheet

        pics = sorted(p for p in self.dir.glob("*.png") if not p.name.startswith("."))
        made = ["viz/"] if pics else []
        if self.n_sheet > 0 and pics and contact_sheet(pics[: self.n_sheet], self.sheet):
            made.append("contact_sheet.png")
        return made


def _batch_size(cfg: DictConfig, device: str) -> int:
    """``mine.batch_size``, or the device's default: 1 on a CPU (where a batched forward is not exact and
    not faster), 16 on a GPU."""
    return int(cfg.mine.batch_size or (16 if device.startswith("cuda") else 1))


def _procs(cfg: DictConfig, device: str, n_todo: int) -> int:
    """Worker processes for this run: on a CPU, ``mine.procs``; by default one per core (each with >= 8
    images) where workers can be forked (Linux: they start at once, sharing the built model), and where
    they must be spawned (each imports torch and builds the model: ~6-10 s) only on machines with at least
    4 cores. Elsewhere (GPU, a sharded run) one. Measured in README "Performance"."""
    from pipeline.parallel import available_cores, choose_cpu_workers, fork_available

    if device != "cpu" or int(cfg.mine.num_shards) > 1 or n_todo == 0:
        return 1
    if cfg.mine.procs is not None:
        return max(1, min(int(cfg.mine.procs), n_todo))
    return choose_cpu_workers(n_todo) if fork_available() or available_cores() >= 4 else 1


def mine_worker(shard: int, num_shards: int, emit, cfg: dict, indices: list[int], work_dir: str) -> int:
    """A spawned CPU worker (one thread; platforms without ``fork``): builds dataset, backbone, miner and
    pictures from the resolved config, as the stage does, then mines its share (:func:`_mine_share`)."""
    from omegaconf import OmegaConf

    from pipeline.discovery import build_miner

    cfg = OmegaConf.create(cfg)
    dataset = build_dataset_from_cfg(cfg, quiet=True)
    backbone = build_backbone_from_cfg(cfg, "cpu", quiet=True)
    miner = build_miner(str(cfg.miner.name), backbone.patch_size, **to_container(cfg.miner))
    pictures = Pictures(cfg, Path(work_dir), backbone, random_init(backbone=backbone.describe()))
    return _mine_share(shard, num_shards, emit, dataset=dataset, backbone=backbone, miner=miner,
                       pictures=pictures, indices=indices, feature=str(cfg.backbone.feature),
                       max_side=cfg.dataset.max_side)


def _mine_share(shard: int, num_shards: int, emit, *, dataset, backbone, miner, pictures, indices: list[int],
                feature: str, max_side) -> int:
    """Mine ``indices[shard::num_shards]`` in this (worker) process and send each row to the parent (which
    journals it), after drawing its picture. A forked worker gets the parent's built objects as they are."""
    stats = mine_images(dataset, backbone, miner, indices[shard::num_shards], record=emit, feature=feature,
                        num_workers=0, device="cpu", progress=False, max_side=max_side, on_result=pictures)
    return stats.computed


def _mine_in_processes(cfg: DictConfig, run: MiningRun, dataset, todo: list[int], procs: int, *, backbone,
                       miner, pictures):
    """Mine ``todo`` in ``procs`` one-thread worker processes; this process journals their rows as they come
    (one journal, as a single process writes it: a killed run resumes the same way). On Linux the workers
    are forked after the backbone is built, so they start at once with the parent's model (shared
    copy-on-write); elsewhere they are spawned and build their own (seconds each)."""
    from tqdm import tqdm

    from pipeline.mining import MineStats
    from pipeline.parallel import fork_available, run_parallel

    by_id = {r.image_id: r for r in dataset.records}
    stats, hits, total = MineStats(), 0, 0
    bar = tqdm(total=len(todo), disable=not cfg.progress, desc=f"mine {dataset.name} ({procs} processes)",
               unit="img", dynamic_ncols=True)
    start = time.time()

    def on_row(shard: int, row: dict) -> None:
        nonlocal hits, total
        run.record(row)
        stats.computed += 1
        bar.update(1)
        if row["error"] is not None:
            stats.failures.append({"image_id": row["image_id"], "path": row["path"], "error": row["error"]})
            bar.write(f"skipped {row['path']}: {row['error']}")
        hit = _hit(by_id[row["image_id"]], row)
        if hit is not None:
            hits, total = hits + int(hit), total + 1
            bar.set_postfix(corloc=f"{100.0 * hits / total:.1f}%", failed=len(stats.failures))

    if fork_available():
        run_parallel(_mine_share, procs, start_method="fork", on_message=on_row,
                     kwargs={"dataset": dataset, "backbone": backbone, "miner": miner, "pictures": pictures,
                             "indices": list(todo), "feature": str(cfg.backbone.feature),
                             "max_side": cfg.dataset.max_side})
    else:
        run_parallel("stages.mine:mine_worker", procs, on_message=on_row,
                     kwargs={"cfg": to_container(cfg), "indices": list(todo), "work_dir": str(run.stage_dir)})
    bar.close()
    stats.seconds = time.time() - start
    return stats


def finalize(cfg: DictConfig, run: MiningRun, dataset, rows: list[dict], timer: Timer, run_stats: dict,
             made: list[str]) -> dict:
    """Every image has a row: write pseudo_boxes.json, metrics.json and the manifest; a forced run, written
    beside the finished results (``run.stage_dir`` is then the replacement folder), swaps them in only now."""
    from pipeline.evaluation.corloc import corloc
    from pipeline.evaluation.multi import multi_box_scores

    info, stage_dir = run.info, run.stage_dir
    write_json(stage_dir / "pseudo_boxes.json", run.to_coco(rows))
    failures = [{"image_id": r["image_id"], "path": r["path"], "error": r["error"]} for r in rows if r["error"]]
    n_boxes = sum(len(r["boxes"]) for r in rows)
    metrics = {"images": len(rows), "boxes": n_boxes, "images_with_boxes": sum(bool(r["boxes"]) for r in rows),
               "failures": len(failures), "failed_images": failures, "method": info["method"],
               "backbone": info["backbone"]["arch"], "feature": info["feature"], "random_init": info["random_init"],
               "corloc": None, "corloc_hits": None, "corloc_total": None, "multi_box": None, **run_stats}
    if dataset.has_gt:
        res = corloc(first_boxes(rows), dataset.records)
        metrics.update(corloc=res.corloc, corloc_hits=res.hits, corloc_total=res.total)
        if any(len(r["boxes"]) > 1 for r in rows):
            metrics["multi_box"] = multi_box_scores(all_boxes(rows), dataset.records).as_dict()
    write_json(stage_dir / "metrics.json", metrics)
    _write_manifest(cfg, stage_dir, timer, info, len(rows), dataset)
    final = Path(cfg.stage_dir)
    if stage_dir != final:
        commit_replacement(final, stage_dir)
    _print_summary(final, metrics, ["pseudo_boxes.json", "metrics.json", "manifest.json", *made])
    return metrics


def _write_manifest(cfg: DictConfig, stage_dir: Path, timer: Timer, info: dict, n_images: int, dataset) -> None:
    from pipeline.artifacts import write_manifest
    from pipeline.status import annotations_digest

    write_manifest(stage_dir, stage="mine", config=to_container(cfg), start_time=timer.start, end_time=time.time(),
                   weights_sha256=info.get("weights_sha256"),
                   extra={"num_shards": int(cfg.mine.num_shards), "images": n_images, "artifact": _artifact(cfg, info["config"]["backbone"]),
                          "report": _report(cfg), "random_init": info["random_init"],
                          "annotations_digest": annotations_digest(dataset.records) if dataset.has_gt else None})


def _print_summary(stage_dir: Path, metrics: dict, made: list[str] | None) -> None:
    """The stored metrics; ``made`` lists the files this run wrote (None: nothing was written)."""
    lines = [f"mine: {metrics['images']} images, {metrics['boxes']} boxes, {metrics['failures']} failed"]
    if made is not None and metrics.get("computed_this_run"):
        lines[0] += (f"; this run mined {metrics['computed_this_run']} in {metrics['seconds']:.1f} s "
                     f"({metrics['images_per_s']:.2f} images/s)")
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if metrics["random_init"] else ""
    if metrics["corloc"] is not None:
        lines.append(f"CorLoc (first box): {metrics['corloc']:.2f} % ({metrics['corloc_hits']}/"
                     f"{metrics['corloc_total']}){tag}")
    mb = metrics.get("multi_box")
    if mb and mb.get("object_recall") is not None:
        lines.append(f"object recall @0.5: {mb['object_recall']:.2f} % ({mb['objects_covered']}/{mb['objects_total']}), "
                     f"{mb['boxes_per_image']:.2f} boxes/image, any-box CorLoc (MOST's protocol, not CorLoc): "
                     f"{mb['any_box_corloc']:.2f} %{tag}")
    for f in metrics["failed_images"][:10]:
        lines.append(f"  failed: {f['path']}: {f['error']}")
    if made is None:
        lines.append(f"artifacts: {stage_dir}/ (unchanged)")
    else:
        lines.append(f"artifacts: {stage_dir}/ ({', '.join(made)})")
    print("\n".join(lines), flush=True)


def _merge_only(cfg: DictConfig, dataset, timer: Timer) -> dict:
    """Merge finished shards (``make merge``); with ``force`` those of a forced run, in its replacement folder."""
    src = replacement_dir(cfg.stage_dir) if cfg.force else Path(cfg.stage_dir)
    run = MiningRun.from_results(src, int(cfg.mine.num_shards))
    rows = run.collect(dataset.records)
    if rows is None:
        raise StageError(f"not every shard of {run.results_dir} is complete yet; run the missing shards "
                         f"(mine.shard=I mine.num_shards={run.num_shards}) and merge again.")
    return finalize(cfg, run, dataset, rows, timer, {}, [])


def run(cfg: DictConfig) -> dict | None:
    from pipeline.discovery import build_miner

    timer = Timer()
    stage_dir = Path(cfg.stage_dir)
    recover_replacement(stage_dir)
    dataset = build_dataset_from_cfg(cfg)
    if len(dataset) == 0:
        raise StageError(f"dataset {cfg.dataset.name} at {cfg.dataset.root} has no images.")
    if cfg.mine.merge_only:
        return _merge_only(cfg, dataset, timer)
    device = resolve_device(cfg.device)
    backbone = build_backbone_from_cfg(cfg, device)  # first: the results depend on the init it resolved to
    force = bool(cfg.force) or _found_weights_now(cfg, stage_dir, backbone)
    plan = plan_rerun(stage_dir, stage="mine", artifact=_artifact(cfg, _backbone_cfg(cfg, backbone)), report=_report(cfg),
                      outputs=OUTPUTS, force=force)
    metrics = read_json(stage_dir / "metrics.json") if plan.action != "run" else None
    info = _info(cfg, backbone, records_root(dataset.records))
    miner = build_miner(str(cfg.miner.name), backbone.patch_size, **to_container(cfg.miner))
    # FORCE mines beside the finished results and swaps them in when complete (finalize): a forced run that
    # fails or is killed leaves them whole, and the same command continues what it had mined.
    work = begin_replacement(stage_dir, keep=True) if force else stage_dir
    run = MiningRun(work, info, shard=int(cfg.mine.shard), num_shards=int(cfg.mine.num_shards))
    if force:
        try:
            run.journal  # noqa: B018 - what a killed forced run of this configuration mined is continued
        except JournalMismatch:
            run.discard()
    todo = run.pending(dataset.records)
    pictures = Pictures(cfg, work, backbone, info["random_init"])

    if plan.action != "run" and not todo:
        if plan.action == "skip":
            print(f"mine: {stage_dir} is up to date (same config, every image mined); FORCE=1 redoes it.")
            _print_summary(stage_dir, metrics, None)
            return metrics
        print(f"mine: only report settings changed ({'; '.join(plan.report_changes)}): redrawing the pictures; "
              "the boxes are unchanged.", flush=True)
        pictures.clear()
        first = list(range(min(pictures.n, len(dataset))))
        mine_images(dataset, backbone, miner, first, record=None, feature=str(cfg.backbone.feature),
                    num_workers=0, device=device, progress=False, max_side=cfg.dataset.max_side, on_result=pictures)
        made = pictures.write_sheet()
        _write_manifest(cfg, stage_dir, timer, info, len(dataset), dataset)
        _print_summary(stage_dir, {**metrics, "computed_this_run": 0}, ["manifest.json", *made])  # nothing mined now
        return metrics

    run.journal  # noqa: B018 - opening it checks that earlier results came from this configuration
    if run.num_shards == 1:  # a killed run may have left half-written temp files (shards may be writing theirs)
        for d in (work, pictures.dir):
            remove_stale_temps(d)
    procs = _procs(cfg, device, len(todo))
    if procs > 1:
        stats = _mine_in_processes(cfg, run, dataset, todo, procs, backbone=backbone, miner=miner,
                                   pictures=pictures)
    else:
        stats = mine_images(dataset, backbone, miner, todo, record=run.record, feature=str(cfg.backbone.feature),
                            num_workers=int(cfg.num_workers), device=device, progress=bool(cfg.progress),
                            max_side=cfg.dataset.max_side, batch_size=_batch_size(cfg, device),
                            on_result=pictures, hit_fn=_hit)
    resumed = len(shard_indices(len(dataset), run.shard, run.num_shards)) - len(todo)
    run_stats = {"seconds": round(stats.seconds, 3), "images_per_s": round(stats.images_per_s, 3),
                 "computed_this_run": stats.computed, "resumed": resumed, "processes": procs,
                 "batch_size": _batch_size(cfg, device)}
    if resumed:
        print(f"resumed: {resumed} images already mined in {run.journal_path}, {stats.computed} computed now")
    rows = run.collect(dataset.records)
    if rows is None:
        print(f"shard {run.shard}/{run.num_shards} done ({stats.computed} images mined). Waiting for the other "
              f"shards; `make merge` merges them when all are done.", flush=True)
        return None
    if not cfg.mine.merge:
        print(f"shard {run.shard}/{run.num_shards} done: every shard of {run.results_dir} is complete; mine.merge=false, "
              f"so `make merge{' FORCE=1' if cfg.force else ''}` writes pseudo_boxes.json.", flush=True)
        return None
    return finalize(cfg, run, dataset, rows, timer, run_stats, pictures.write_sheet())


@stage_main("mine")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
