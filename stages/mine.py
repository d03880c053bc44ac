"""Stage 1, mine: DINO features -> a miner (LOST, DINO-seg, ...) -> ranked pseudo-boxes, with CorLoc.

    python -m stages.mine dataset=voc07 backbone=dino_vits16 miner=lost
    python -m stages.mine -m mine.shard=0,1,2 mine.num_shards=3       # sharded; merged when all are done
    python -m stages.mine mine.merge_only=true                          # merge finished shards (make merge)

Writes ``${dirs.mine}``: results/ (per-shard journals), pseudo_boxes.json, metrics.json, manifest.json, viz/,
contact_sheet.png. Config in, library calls out: ``run_stage``'s life cycle (``keep``: a killed forced run
continues from its journal); ``pipeline.mining``'s loop, sinks and ``pipeline.parallel.mine_in_processes``.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import ArtifactError, read_json, recover_replacement, remove_stale_temps, replacement_dir
from pipeline.backbones.ensemble import build_ensemble
from pipeline.data.paths import records_root
from pipeline.journal import canonical_json
from pipeline.discovery import Miner, build_miner
from pipeline.mining import MiningRun, format_mining_summary, mine_images, mining_info, shard_indices
from pipeline.mining_sinks import Pictures, Progress, Timing
from pipeline.parallel import mine_in_processes, mining_processes
from stages.common import (Produced, StageError, build_backbone_from_cfg, build_dataset_from_cfg, dataset_identity,
                           resolve_device, run_guarded, run_stage, to_container)
from stages.config import stage_main

OUTPUTS = ("pseudo_boxes.json", "metrics.json")
def _info(cfg: DictConfig, backbone, root: str) -> dict:
    """``mining_info`` (as the journal's meta reads back) with the ``init`` the backbone was built with in its
    config (``backbone.init=auto`` that found the weights is a plain ``make mine`` of the same model)."""
    miner = Miner.recorded(to_container(cfg.miner))
    config = {"dataset": dataset_identity(cfg), "backbone": {**to_container(cfg.backbone), "init": backbone.init},
              "miner": miner}
    return canonical_json(mining_info(str(cfg.miner.name), miner, backbone, feature=str(cfg.backbone.feature),
                                      dataset=str(cfg.dataset.name), image_root=root, config=config))


def _model(cfg: DictConfig, device: str, quiet: bool = False) -> tuple:
    specs, build = cfg.miner.get("backbones"), lambda arch=None: build_backbone_from_cfg(cfg, device, quiet, arch)
    backbone = build_ensemble(list(specs), int(cfg.miner.image_size), build) if specs else build()  # VoteCut's
    return backbone, build_miner(str(cfg.miner.name), backbone.patch_size, **to_container(cfg.miner))


def worker_parts(cfg: dict) -> tuple:
    """A spawned worker's dataset, backbone and miner, built from the resolved config as :func:`run` builds them."""
    cfg = OmegaConf.create(cfg)
    return (build_dataset_from_cfg(cfg, quiet=True), *_model(cfg, "cpu", quiet=True))


def _pictures(cfg: DictConfig, folder: Path, patch_size: int, is_random: bool) -> Pictures:
    return Pictures(folder / "viz", int(cfg.viz.num_images), patch_size, sheet=folder / "contact_sheet.png",
                    sheet_images=int(cfg.viz.contact_sheet),
                    tag=f"  {cfg.miner.name}" + ("  RANDOM WEIGHTS" if is_random else ""))


def _produce(cfg: DictConfig, dataset, backbone, miner, info: dict, out: Path, force: bool) -> Produced | None:
    """Mine what this shard has left, in ``out``; once every shard is done, the merged pseudo_boxes.json."""
    c, device = cfg.mine, str(backbone.device)
    run = MiningRun(out, info, shard=int(c.shard), num_shards=int(c.num_shards))
    todo, timing = run.pending(dataset.records, discard_other=force), Timing()
    pictures = _pictures(cfg, out, backbone.patch_size, info["random_init"])
    if run.num_shards == 1:  # a killed run may have left half-written temp files (shards may be writing theirs)
        for d in (out, pictures.folder):
            remove_stale_temps(d)
    # worker processes on a CPU only (not in a sharded run); batch: null is 1 on a CPU (exact), 16 on a GPU
    procs = 1 if device != "cpu" or run.num_shards > 1 else mining_processes(len(todo), c.procs)
    batch = int(c.batch_size or (16 if device.startswith("cuda") else 1))
    progress = Progress(len(todo), f"mine {dataset.name}" + (f" ({procs} processes)" if procs > 1 else ""),
                        enabled=bool(cfg.progress), slow_hint="dataset.max_side=1024 shrinks big images")
    sinks = [pictures, run, progress, timing]  # the picture before the journal line: a journaled image has one
    kw = {"feature": str(cfg.backbone.feature), "max_side": cfg.dataset.max_side}
    if procs > 1:
        mine_in_processes(dataset, backbone, miner, todo, sinks, procs=procs, **kw,
                          build=("stages.mine:worker_parts", {"cfg": to_container(cfg)}))
    else:
        mine_images(dataset, backbone, miner, todo, sinks, num_workers=int(cfg.num_workers), batch_size=batch, **kw)
    resumed = len(shard_indices(len(dataset), run.shard, run.num_shards)) - len(todo)
    if resumed:
        print(f"resumed: {resumed} images already mined in {run.journal_path}, {timing.images} computed now")
    rows, done = run.collect(dataset.records), f"shard {run.shard}/{run.num_shards} done"
    if rows is None or not c.merge:  # nothing to finalise yet
        print(f"{done} ({timing.images} images mined). Waiting for the other shards; `make merge` merges them when "
              "all are done." if rows is None else f"{done}: every shard of {run.results_dir} is complete; "
              f"mine.merge=false, so `make merge{' FORCE=1' if cfg.force else ''}` writes pseudo_boxes.json.",
              flush=True)
        return None
    stats = {"seconds": round(timing.seconds, 3), "images_per_s": round(timing.images_per_s, 3),
             "computed_this_run": timing.images, "resumed": resumed, "processes": procs, "batch_size": batch}
    return _produced(cfg, info, dataset, {**run.write_merged(rows, dataset), **stats},
                     ["pseudo_boxes.json", *pictures.write_sheet()])


def _redraw(cfg: DictConfig, dataset, backbone, miner, info: dict, stage_dir: Path) -> Produced:
    """Only the pictures' settings changed: redraw them from a new pass over the first images (not journaled)."""
    pictures = _pictures(cfg, stage_dir, backbone.patch_size, info["random_init"])
    pictures.clear()
    mine_images(dataset, backbone, miner, list(range(min(pictures.n, len(dataset)))), [pictures],
                feature=str(cfg.backbone.feature), max_side=cfg.dataset.max_side)
    return _produced(cfg, info, dataset, read_json(stage_dir / "metrics.json"), pictures.write_sheet())


def _produced(cfg: DictConfig, info: dict, dataset, metrics: dict, made: list[str]) -> Produced:
    from pipeline.status import annotations_digest

    return Produced(metrics, made, weights_sha256=info.get("weights_sha256"), extra={
        "num_shards": int(cfg.mine.num_shards), "images": len(dataset), "random_init": info["random_init"],
        "annotations_digest": annotations_digest(dataset.records) if dataset.has_gt else None})


def _run(cfg: DictConfig, info: dict, produce, redraw=None, force: bool = False, complete: bool = True):
    """``run_stage`` with mining's artifact (what decides the boxes; the image list is per image) and report."""
    artifact = {"dataset": dataset_identity(cfg), "backbone": info["config"]["backbone"],
                "miner": Miner.recorded(to_container(cfg.miner)), "num_shards": int(cfg.mine.num_shards)}
    return run_stage(cfg, stage="mine", artifact=artifact, outputs=OUTPUTS, complete=complete,
                     report={"viz": {"num_images": int(cfg.viz.num_images),
                                     "contact_sheet": int(cfg.viz.contact_sheet)}},
                     produce=produce, redo_report=redraw, keep=True, force=force,
                     summary=lambda d, m, made: print(format_mining_summary(m, d, made), flush=True),
                     redo_says="redrawing the pictures; the boxes are unchanged")


def _merge_only(cfg: DictConfig, dataset) -> dict | None:
    """Merge finished shards (``make merge``); with ``force`` those of a forced run, in its replacement folder."""
    n, force, hint = int(cfg.mine.num_shards), bool(cfg.force), f"(mine.shard=I mine.num_shards={cfg.mine.num_shards})"
    try:
        info = MiningRun.from_results(replacement_dir(cfg.stage_dir) if force else cfg.stage_dir, n).info
    except ArtifactError as e:
        raise StageError(f"{e} {hint}") from None

    def merge(out: Path) -> Produced:
        run = MiningRun(out, info, num_shards=n)
        if (rows := run.collect(dataset.records)) is None:
            raise StageError(f"not every shard of {run.results_dir} is complete yet; run the missing shards {hint} "
                             "and merge again.")
        return _produced(cfg, info, dataset, run.write_merged(rows, dataset), ["pseudo_boxes.json"])
    return _run(cfg, info, merge, force=force)


def run(cfg: DictConfig) -> dict | None:
    recover_replacement(stage_dir := Path(cfg.stage_dir))
    dataset = build_dataset_from_cfg(cfg)
    if len(dataset) == 0:
        raise StageError(f"dataset {cfg.dataset.name} at {cfg.dataset.root} has no images.")
    if cfg.mine.merge_only:
        return _merge_only(cfg, dataset)
    backbone, miner = _model(cfg, resolve_device(cfg.device))  # first: the boxes depend on the init it resolved to
    info = _info(cfg, backbone, records_root(dataset.records))
    # backbone.init=auto fell back to random weights last time and found the real ones now: redo, as if forced
    force = bool(cfg.force) or (cfg.backbone.init == "auto" and backbone.init == "pretrained" and (
        stage_dir / "metrics.json").is_file() and bool(read_json(stage_dir / "metrics.json").get("random_init")))
    parts = (cfg, dataset, backbone, miner, info)
    # not up to date: a grown image set, or a demo still without weights (it looked for them: it says so, resumes)
    complete = force or (backbone.init != "random" or cfg.backbone.init != "auto") and MiningRun(
        stage_dir, info, shard=int(cfg.mine.shard), num_shards=int(cfg.mine.num_shards)).mined_all(dataset.records)
    return _run(cfg, info, lambda out: _produce(*parts, out, force), lambda d, _: _redraw(*parts, d), force=force,
                complete=complete)


@stage_main("mine")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
