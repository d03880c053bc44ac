"""Build the static HTML report of one experiment (``<output_root>/<dataset>/<backbone>/``).

:func:`build_report` reads whatever the stages wrote there (no stage is rerun, nothing but the report dir
is written), makes PNG plots, copies the stages' pictures, renders ``index.html`` with a Jinja2 template
and writes ``summary.json``: a self-contained folder that opens from disk, offline, without JavaScript.
Every section appears only when its stage has run. Every stage's state is :mod:`pipeline.status`'s, the
one ``make status`` prints (done, partial, failed, stale, missing): the provenance table lists them, and the
section of a stage that is not done carries a mark saying so, why (which input or upstream stage changed),
and the command that brings it up to date. A partial or failed training shows no numbers (it has none).

Worst images: the images the miner did worst on, never the ones it failed on (listed as failures) or images
too small to be pictures (under :data:`MIN_SIDE` px): those would be black or empty pictures, not misses.

Cluster purity/NMI: taken from the cluster stage's ``metrics.json`` key ``cluster_quality`` (the dict of
:func:`pipeline.evaluation.cluster_quality.cluster_quality_for_boxes`) when it is there, else computed here
from ``pseudo_labels.json`` and the GT of the dataset recorded in its ``info.config.dataset``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from typing import Sequence

from pipeline.artifacts import ArtifactError, atomic_path, read_json, write_json, write_text
from pipeline.report import plots
from pipeline.report.published import FULL_SET_IMAGES, published_corloc

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
MIN_SIDE = 2      # px: an image smaller than this on a side is degenerate (never a "worst image")
NOT_A_RESULT = "random weights: smoke test, not a result"


class ReportError(ArtifactError):
    """Nothing to report (no outputs for this dataset/backbone); the message says where and what to run."""


# --------------------------------------------------------------------------- small helpers
def _read(path: Path) -> Any:
    """A JSON file, or None when absent or unreadable (a report shows what exists)."""
    try:
        return read_json(path) if path.is_file() else None
    except ArtifactError:
        return None


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def _pngs(d: Path) -> list[Path]:
    return sorted((p for p in d.glob("*.png") if not p.name.startswith(".")), key=lambda p: _natural(p.name)) \
        if d.is_dir() else []


def _random_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every ``random_init``-like key that is true in a JSON object."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            if k in ("random_init", "detector_random_init", "boxes_random_init") and v is True:
                out.append(p)
            elif isinstance(v, (dict, list)):
                out.extend(_random_keys(v, p))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            out.extend(_random_keys(v, f"{prefix}[{i}]"))
    return out


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


class _Builder:
    def __init__(self, root: Path, work: Path, dataset: dict | None, max_pictures: int, n_worst: int,
                 args: Sequence[str] | None = None, facts: dict | None = None):
        self.root, self.work, self.dataset = root, work, dataset
        self.args, self.facts = args, facts or {}
        self.status: dict[str, dict] = {}   # stage name -> its state row (provenance), filled by provenance()
        self.max_pictures, self.n_worst = max_pictures, n_worst
        self.img = work / "img"
        self.img.mkdir(parents=True)
        self.notes: list[str] = []
        self._records: dict[str, Any] = {}
        self.random_sources: list[str] = []

    def rel(self, p: Path) -> str:
        return p.relative_to(self.work).as_posix()

    def copy(self, src: Path, name: str) -> str:
        dst = self.img / name
        with atomic_path(dst, suffix=".png") as tmp:
            shutil.copyfile(src, tmp)
        return self.rel(dst)

    def mark_random(self, where: str, obj: Any) -> bool:
        keys = _random_keys(obj)
        self.random_sources.extend(f"{where}: {k}" for k in keys)
        return bool(keys)

    # ----------------------------------------------------------------------- GT
    def records(self, recorded: dict | None):
        """GT records of the dataset an artifact recorded (``info.config.dataset``), else of the dataset
        the report was given; None when neither loads (the sections then skip what needs GT)."""
        from pipeline.data import build_dataset

        for d in (recorded, self.dataset):
            if not d or not d.get("kind"):
                continue
            key = json.dumps(d, sort_keys=True, default=str)
            if key not in self._records:
                try:
                    ds = build_dataset(str(d["kind"]), str(d.get("root") or ""),
                                       image_set=d.get("image_set") or "trainval", ann_file=d.get("ann_file"),
                                       image_dir=d.get("image_dir"), list_file=d.get("list_file"),
                                       name=d.get("name"), max_images=d.get("max_images"))
                    self._records[key] = ds if any(r.has_gt for r in ds.records) else None
                except Exception as e:  # noqa: BLE001 - any failure means "no GT to compare with"
                    self.notes.append(f"ground truth of dataset {d.get('kind')} at {d.get('root')} not loaded "
                                      f"({type(e).__name__}: {e}); hits/misses and cluster purity are skipped")
                    self._records[key] = None
            if self._records[key] is not None:
                return self._records[key]
        return None

    # ----------------------------------------------------------------------- provenance
    def provenance(self) -> dict:
        """Every stage's state (:func:`pipeline.status.pipeline_status`, as `make status`), with the command
        that brings it up to date; the manifests' config and code."""
        from pipeline.status import StageState, pipeline_status

        states = pipeline_status(self.root, **self.facts)
        rows, manifests = [], []
        for st in states:
            row = {**st.as_dict(self.args), "path": os.path.relpath(st.path, self.root)}
            rows.append(row)
            self.status[st.stage] = row
            man = _read(Path(st.path) / "manifest.json")
            if man:
                manifests.append(self._manifest_summary(st.stage, man))
        missing = [{"stage": r["stage"], "run": r["command"]} for r in rows if r["state"] == "missing"]
        cad = self.status.get("cad")
        if cad and cad["state"] in ("done", "stale") and not any(r["stage"].startswith("cad/eval_") for r in rows):
            evals = StageState("cad/eval_*", "missing", self.root / "cad" / "eval_*", root=self.root)
            missing.append({"stage": evals.stage, "run": evals.as_dict(self.args)["command"]})
        return {"stages": rows, "manifests": manifests, "missing": missing,
                "stale": [r["stage"] for r in rows if r["state"] == "stale"]}

    def _manifest_summary(self, stage: str, man: dict) -> dict:
        cfg = man.get("config") or {}
        b, d = cfg.get("backbone") or {}, cfg.get("dataset") or {}
        det, sch, cl = cfg.get("detector") or {}, cfg.get("schedule") or {}, cfg.get("cluster") or {}
        parts = [f"dataset {d.get('name')} ({d.get('kind')}, {d.get('image_set')}"
                 + (f", first {d['max_images']} images" if d.get("max_images") else "") + ")" if d else "",
                 f"backbone {b.get('arch')} feature {b.get('feature')} init {b.get('init')}" if b else "",
                 f"miner {cfg['miner'].get('name')}" if isinstance(cfg.get("miner"), dict) else "",
                 f"detector {det.get('preset')} init {det.get('init')}" if det else "",
                 f"schedule {sch.get('name')} ({sch.get('iterations')} it, batch {sch.get('batch_size')}, "
                 f"lr {sch.get('lr')})" if sch else "",
                 f"K={cl.get('k')} source {cl.get('source')}" if cl else ""]
        self.mark_random(f"{stage}/manifest.json", man)
        if str(b.get("init")) == "random" or str(det.get("init")) == "random":
            self.random_sources.append(f"{stage}/manifest.json: config init=random")
        return {"stage": stage, "git_revision": man.get("git_revision"), "weights_sha256": man.get("weights_sha256"),
                "backbone": b.get("arch") or b.get("name"), "backbone_init": b.get("init"),
                "config": "; ".join(p for p in parts if p), "end_time": man.get("end_time"),
                "wall_time_s": man.get("wall_time_s"), "host_versions": {k: v for k, v in (man.get("versions") or {}).items()
                                                                          if k in ("python", "torch", "torchvision")}}

    # ----------------------------------------------------------------------- mining
    def miner_dirs(self) -> list[Path]:
        dirs = [self.root / "mine"] + sorted(p for p in self.root.glob("mine_*") if p.is_dir())
        return [d for d in dirs if (d / "metrics.json").is_file() or (d / "pseudo_boxes.json").is_file()]

    def mining(self, d: Path) -> dict:
        stage = d.name
        metrics = _read(d / "metrics.json") or {}
        coco = _read(d / "pseudo_boxes.json")
        info = (coco or {}).get("info") or {}
        random_init = self.mark_random(f"{stage}/metrics.json", metrics) | self.mark_random(
            f"{stage}/pseudo_boxes.json", {"info": {k: v for k, v in info.items() if k != "config"}})
        dataset_name = str(info.get("dataset") or self.root.parent.name)
        backbone = str(metrics.get("backbone") or (info.get("backbone") or {}).get("arch") or self.root.name)
        method = str(metrics.get("method") or info.get("method") or (stage.split("_", 1)[1] if "_" in stage else "lost"))
        n_images = metrics.get("images") or (len(coco["images"]) if coco else None)
        pub = published_corloc(method, backbone, dataset_name)
        full = FULL_SET_IMAGES.get(dataset_name)
        out = {"stage": stage, "status": self.status.get(stage), "method": method, "backbone": backbone,
               "dataset": dataset_name, "images": n_images, "multi_box": metrics.get("multi_box") or None,
               "boxes": metrics.get("boxes"), "corloc": metrics.get("corloc"),
               "corloc_hits": metrics.get("corloc_hits"), "corloc_total": metrics.get("corloc_total"),
               "published_corloc": pub, "random_init": random_init, "is_result": not random_init,
               "full_set": bool(full and n_images == full), "full_set_images": full,
               "failed_images": metrics.get("failed_images") or [], "failures": metrics.get("failures", 0),
               "seconds": metrics.get("seconds"), "pictures": [], "worst": [], "score_hist": None}
        if coco:
            scores = [a.get("score") for a in coco["annotations"] if a.get("score") is not None]
            out["score_hist"] = self.rel(plots.histogram(
                scores, self.img / f"{stage}_scores.png", title=f"{stage}: box scores ({len(scores)} boxes)",
                xlabel="score", random_init=random_init))
            self._mining_pictures(d, coco, info, out, _unpicturable(coco, out["failed_images"]))
        return out

    def _mining_pictures(self, d: Path, coco: dict, info: dict, out: dict, skip: set[str]) -> None:
        """The first pictures (the stage's viz/) and the worst images, drawn here; ``skip``: dataset ids that
        are never worst images (failed or degenerate, :func:`_unpicturable`)."""
        from pipeline.boxes import xywh_to_xyxy
        from pipeline.evaluation.corloc import corloc

        stage = d.name
        images = coco["images"]
        box_of: dict[int, list[float]] = {}
        score_of: dict[int, float] = {}
        for a in coco["annotations"]:
            box_of[int(a["image_id"])] = xywh_to_xyxy([a["bbox"]])[0].tolist()
            score_of[int(a["image_id"])] = float(a.get("score") or 0.0)
        ds = self.records((info.get("config") or {}).get("dataset"))
        per_image, ious, rec_of = {}, {}, {}
        if ds is not None:
            ids = {int(im["id"]) for im in images}
            recs = [r for r in ds.records if int(r.coco_id) in ids]
            rec_of = {int(r.coco_id): r for r in recs}
            preds = {r.image_id: (np.asarray(box_of[int(r.coco_id)]) if int(r.coco_id) in box_of else None)
                     for r in recs}
            if recs:
                res = corloc(preds, recs)
                per_image, ious = res.per_image, res.ious
                out["corloc_recomputed"] = res.corloc
        by_ds_id = {str(im.get("dataset_id", im["id"])): im for im in images}
        shown = set()
        for p in _pngs(d / "viz")[: self.max_pictures]:
            m = re.match(r"(\d+)_(.*)\.png$", p.name)
            im = images[int(m.group(1))] if m and int(m.group(1)) < len(images) else None
            key = str(im.get("dataset_id", im["id"])) if im else None
            hit = per_image.get(key) if key is not None else None
            out["pictures"].append({"src": self.copy(p, f"{stage}_viz_{p.name}"), "image_id": key, "hit": hit,
                                    "iou": ious.get(key), "score": score_of.get(int(im["id"])) if im else None})
            shown.add(key)
        # the worst images: lowest best-IoU with GT when there is GT, else lowest box score
        if per_image:
            cand = sorted((k for k in per_image if k not in shown and k not in skip),
                          key=lambda k: (ious.get(k, 0.0), k))
        else:
            cand = sorted((k for k in by_ds_id if k not in shown and k not in skip),
                          key=lambda k: (score_of.get(int(by_ds_id[k]["id"]), -1.0), k))
        root = Path(str(info.get("image_root") or ""))
        for k in cand:
            if len(out["worst"]) >= self.n_worst:
                break
            im = by_ds_id[k]
            rec = rec_of.get(int(im["id"]))
            path = Path(rec.path) if rec is not None else root / str(im.get("file_name", ""))
            pic = _draw(path, box_of.get(int(im["id"])), rec.boxes if rec is not None and rec.has_gt else None,
                        f"{k}  IoU {ious.get(k, 0.0):.2f}" if k in ious else f"{k}  score {score_of.get(int(im['id']), 0):.2f}")
            if pic is None:
                continue
            dst = self.img / f"{stage}_worst_{re.sub(r'[^A-Za-z0-9_.-]', '_', k)}.png"
            with atomic_path(dst, suffix=".png") as tmp:
                pic.save(tmp, format="PNG")
            out["worst"].append({"src": self.rel(dst), "image_id": k, "hit": per_image.get(k), "iou": ious.get(k),
                                 "score": score_of.get(int(im["id"]))})

    # ----------------------------------------------------------------------- detectors
    def training(self, stage: str, title: str) -> dict | None:
        """A training stage's section. A partial or failed one (killed, no results) shows its state, how it
        goes on and its training log so far, and no numbers: its metrics.json is not there, or is not its."""
        d = self.root / stage
        status = self.status.get(stage)
        finished = status is None or status["state"] in ("done", "stale")
        metrics = _read(d / "metrics.json") if finished else None
        log = d / "metrics.jsonl"
        if metrics is None and not log.is_file() and (status is None or status["state"] == "missing"):
            return None
        metrics = metrics or {}
        rows = []
        if log.is_file():
            for line in log.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        random_init = self.mark_random(f"{stage}/metrics.json", metrics)
        ev = metrics.get("eval") or {}
        out = {"stage": stage, "title": title, "status": status, "finished": finished,
               "iterations": metrics.get("iterations"),
               "final_loss": metrics.get("final_loss"), "detector": metrics.get("detector"),
               "num_classes": metrics.get("num_classes"), "corloc": ev.get("corloc"), "AP50": ev.get("AP50"),
               "AP": ev.get("AP"), "AP75": ev.get("AP75"), "eval_images": ev.get("images"),
               "random_init": random_init, "is_result": not random_init, "curves": None, "pictures": [],
               "log_rows": len(rows), "evaluations": []}
        if rows:
            out["curves"] = self.rel(plots.training_curves(rows, self.img / f"{stage}_curves.png", title=title,
                                                           random_init=random_init))
        for p in _pngs(d / "viz")[: min(6, self.max_pictures)] if finished else []:
            out["pictures"].append({"src": self.copy(p, f"{stage}_viz_{p.name}"), "image_id": p.stem})
        if stage == "cag":  # evaluate-cag runs: cag/eval_<set>/metrics.json
            for e in sorted(p for p in d.glob("eval_*") if (p / "metrics.json").is_file()):
                m = _read(e / "metrics.json") or {}
                rnd = self.mark_random(f"{stage}/{e.name}/metrics.json", m)
                mm = m.get("eval", m)
                out["evaluations"].append({"name": e.name, "status": self.status.get(f"{stage}/{e.name}"),
                                           "corloc": mm.get("corloc"), "AP50": mm.get("AP50"),
                                           "AP": mm.get("AP"), "images": mm.get("images"), "random_init": rnd})
        return out

    # ----------------------------------------------------------------------- clusters
    def cluster_runs(self) -> list[Path]:
        d = self.root / "cluster"
        if not d.is_dir():
            return []
        runs = {p.parent for p in d.rglob("metrics.json")} | {p.parent for p in d.rglob("pseudo_labels.json")}
        runs = {r for r in runs if not any(part.startswith(".") for part in r.relative_to(d).parts)}  # .k20.new: work
        return sorted(runs, key=lambda p: _natural(p.relative_to(d).as_posix()))

    def cluster(self, d: Path) -> dict:
        from pipeline.evaluation.cluster_quality import cluster_quality_for_boxes

        name = d.relative_to(self.root / "cluster").as_posix()
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name)
        metrics = _read(d / "metrics.json") or {}
        labels = _read(d / "pseudo_labels.json")
        info = (labels or {}).get("info") or {}
        random_init = self.mark_random(f"cluster/{name}/metrics.json", metrics) | self.mark_random(
            f"cluster/{name}/pseudo_labels.json", {"clustering": info.get("clustering"),
                                                   "random_init": info.get("random_init")})
        sizes = metrics.get("sizes") or info.get("sizes") or []
        out = {"run": name, "status": self.status.get(f"cluster/{name}"), "k": metrics.get("k", info.get("k")),
               "boxes": metrics.get("boxes"),
               "inertia": metrics.get("inertia"), "sizes": sizes, "empty_clusters": metrics.get("empty_clusters"),
               "random_init": random_init, "is_result": not random_init, "sizes_plot": None, "galleries": [],
               "quality": None, "quality_from": None, "heatmap": None}
        if sizes:
            out["sizes_plot"] = self.rel(plots.bars([f"cluster_{i}" for i in range(len(sizes))], sizes,
                                                    self.img / f"cluster_{slug}_sizes.png",
                                                    title=f"cluster/{name}: boxes per cluster", ylabel="boxes",
                                                    random_init=random_init))
        for p in _pngs(d / "galleries"):
            m = re.search(r"(\d+)", p.stem)
            k = int(m.group(1)) if m else None
            out["galleries"].append({"src": self.copy(p, f"cluster_{slug}_{p.name}"), "name": p.stem,
                                     "size": sizes[k] if k is not None and k < len(sizes) else None})
        q = metrics.get("cluster_quality")
        if q:
            out["quality_from"] = "metrics.json"
        elif labels is not None:
            ds = self.records((info.get("config") or {}).get("dataset"))
            if ds is not None:
                q = cluster_quality_for_boxes(labels, ds.records)
                out["quality_from"] = "computed by the report"
        if q:
            out["quality"] = {k: q.get(k) for k in ("purity", "nmi", "boxes", "matched", "matched_fraction",
                                                     "iou_threshold", "convention", "clusters", "classes",
                                                     "confusion", "unmatched_per_cluster", "majority")}
            conf = np.asarray(q["confusion"], dtype=np.float64).reshape(len(q["clusters"]), len(q["classes"]))
            un = np.asarray(q.get("unmatched_per_cluster") or [0] * len(q["clusters"]), dtype=np.float64)
            out["heatmap"] = self.rel(plots.heatmap(np.concatenate([conf, un[:, None]], axis=1), q["clusters"],
                                                    [*map(str, q["classes"]), "(no class)"],
                                                    self.img / f"cluster_{slug}_heatmap.png",
                                                    title=f"cluster/{name}: boxes per cluster x GT class",
                                                    random_init=random_init))
        return out

    # ----------------------------------------------------------------------- evaluate-cad
    def evaluation(self, d: Path) -> dict:
        m = _read(d / "metrics.json") or {}
        rnd = self.mark_random(f"cad/{d.name}/metrics.json", m)
        rows = [{"class": c, "cluster": v.get("cluster"), "AP50": v.get("AP50"), "AP75": v.get("AP75"),
                 "AP50:95": v.get("AP50:95")} for c, v in (m.get("per_class") or {}).items()]
        return {"name": d.name, "status": self.status.get(f"cad/{d.name}"), "gt": m.get("gt"),
                "images": m.get("n_images"), "detections": m.get("n_detections"),
                "per_class": rows, "mean": m.get("mean") or {}, "matching": m.get("matching") or {},
                "unmatched_clusters": m.get("unmatched_clusters") or [],
                "unmatched_classes": m.get("unmatched_classes") or [],
                "classes_without_gt": m.get("classes_without_gt") or [], "random_init": rnd, "is_result": not rnd}


def _draw(path: Path, box, gt_boxes, title: str):
    """The image with the predicted box (red) and GT boxes (green), shrunk to 512 px, then its title and a
    legend line (drawn after shrinking, so they stay legible); None if unreadable. Any box and image size
    (see :mod:`pipeline.viz.boxes`)."""
    from PIL import Image

    from pipeline.viz.boxes import as_boxes
    from pipeline.viz.mining import draw_box_and_gt, line_width
    from pipeline.viz.style import GT, PRED, Key, finish_picture

    try:
        with Image.open(path) as im:
            pil = im.convert("RGB")
    except (OSError, ValueError):
        return None
    skipped = draw_box_and_gt(pil, box, gt_boxes, line_width(pil.height, pil.width))
    pil.thumbnail((512, 512))
    keys = [Key(PRED, "box", 2)] + ([Key(GT, "GT", 2)] if len(as_boxes(gt_boxes)) else [])
    return finish_picture(pil, title, keys, skipped)


def _unpicturable(coco: dict, failed: list) -> set[str]:
    """Dataset ids of the images never shown as worst images: those the miner failed on (metrics.json's
    ``failed_images``) and those without a size or under :data:`MIN_SIDE` px on a side (a 1x1 image)."""
    out = {str(f["image_id"]) for f in failed if isinstance(f, dict) and f.get("image_id") is not None}
    for im in coco.get("images") or []:
        w, h = im.get("width"), im.get("height")
        if w is None or h is None or min(w, h) < MIN_SIDE:
            out.add(str(im.get("dataset_id", im["id"])))
    return out


def _has_outputs(root: Path) -> bool:
    return root.is_dir() and any((root / s).is_dir() for s in ("mine", "cag", "cluster", "cad")) or \
        any(p.is_dir() for p in root.glob("mine_*"))


def build_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 dataset: dict | None = None, max_pictures: int = 12, n_worst: int = 4,
                 title: str | None = None, args: Sequence[str] | None = None,
                 annotations_digest: str | None = None, n_images: int | None = None) -> dict:
    """Write ``out_dir`` (default ``root/report``): ``index.html``, ``summary.json`` and ``img/``.

    ``root``: ``<output_root>/<dataset>/<backbone>``. ``dataset``: the dataset config (``kind``, ``root``,
    ``image_set``, ``ann_file``, ``image_dir``, ``list_file``, ``max_images``) whose GT scores the pictures
    and clusters when the config recorded in an artifact no longer loads. ``max_pictures``: the first N
    mining pictures; ``n_worst``: how many of the worst images are drawn besides. ``args``: the experiment's
    ARGS (Hydra overrides), repeated in the commands the report suggests (None: ARGS naming the dataset,
    backbone and output root); ``annotations_digest`` / ``n_images``: the dataset facts that decide the
    stages' states (:func:`pipeline.status.dataset_facts`, as `make status`). Returns the summary.
    The folder is replaced as a whole (built next to it, then swapped in)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    if not _has_outputs(root):
        raise ReportError(f"no pipeline outputs under {root} (no mine/, cag/, cluster/ or cad/ there): run "
                          f"`make mine ARGS=\"dataset={root.parent.name} backbone={root.name} ...\"` first, or point "
                          "paths.output_root / dataset / backbone at an experiment that ran")
    work = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        facts = {"annotations_digest": annotations_digest, "n_images": n_images}
        b = _Builder(root, work, dataset, max_pictures, n_worst, args, facts)
        prov = b.provenance()
        mining = [b.mining(d) for d in b.miner_dirs()]
        cag = b.training("cag", "train-cag (class-agnostic detector)")
        clusters = [b.cluster(d) for d in b.cluster_runs()]
        cad = b.training("cad", "train-cad (class-aware detector)")
        evals = [b.evaluation(d) for d in sorted(p for p in (root / "cad").glob("eval_*")
                                                 if (p / "metrics.json").is_file())]
        sections = ["provenance"] + (["mining"] if mining else []) + (["train-cag"] if cag else []) + \
            (["cluster"] if clusters else []) + (["train-cad"] if cad else []) + (["evaluate-cad"] if evals else [])
        random_sources = list(dict.fromkeys(b.random_sources))  # discovery order: mine first
        summary = {
            "title": title or f"{root.parent.name} / {root.name}", "dataset": root.parent.name,
            "backbone": root.name, "root": str(root), "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "random_init": bool(random_sources), "random_sources": random_sources,
            "numbers_are_results": not random_sources, "sections": sections, "provenance": prov,
            "mining": mining, "train_cag": cag, "cluster": clusters, "train_cad": cad, "evaluate_cad": evals,
            "notes": sorted(set(b.notes)),
        }
        env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=select_autoescape(["html", "j2"]),
                          trim_blocks=True, lstrip_blocks=True)
        env.filters["num"] = _fmt
        html = env.get_template("report.html.j2").render(s=summary, not_a_result=NOT_A_RESULT)
        write_text(work / "index.html", html)
        write_json(work / "summary.json", summary)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["index"] = str(out_dir / "index.html")
    return summary
