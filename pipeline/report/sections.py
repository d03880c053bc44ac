"""The report's sections of the detectors (train-cag, train-cad and their evaluations) and of the cluster
runs (every chain's cluster folder).

Cluster purity/NMI: taken from the cluster stage's ``metrics.json`` key ``cluster_quality`` (the dict of
:func:`pipeline.evaluation.cluster_quality.cluster_quality_for_boxes`) when it is there, else computed here
from ``pseudo_labels.json`` and the GT of the dataset recorded in its ``info.config.dataset``."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.report import plots
from pipeline.summaries import natural_key, pngs, read_json_or_none, rounds_table

if TYPE_CHECKING:
    from pipeline.layout import Chain
    from pipeline.report.build import Builder


def training(b: "Builder", kind: str, title: str, chain: "Chain | None" = None) -> dict | None:
    """The section of a chain's detector of ``kind`` (``cag``, ``cad``; default: the configured chain's). A
    partial or failed one (killed, no results) shows its state, how it goes on and its training log so far,
    and no numbers: its metrics.json is not there, or is not its."""
    d = (chain or b.layout.chains[0]).dirs[kind]
    stage = b.layout.name(d)
    status = b.status.get(stage)
    finished = status is None or status["state"] in ("done", "stale")
    metrics = read_json_or_none(d / "metrics.json") if finished else None
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
    random_init = b.mark_random(f"{stage}/metrics.json", metrics)
    ev = metrics.get("eval") or {}
    out = {"stage": stage, "title": title, "status": status, "finished": finished,
           "iterations": metrics.get("iterations"),
           "final_loss": metrics.get("final_loss"), "detector": metrics.get("detector"),
           "num_classes": metrics.get("num_classes"), "corloc": ev.get("corloc"), "AP50": ev.get("AP50"),
           "AP": ev.get("AP"), "AP75": ev.get("AP75"), "mask": ev.get("mask"), "eval_images": ev.get("images"),
           "random_init": random_init, "is_result": not random_init, "curves": None, "pictures": [],
           "log_rows": len(rows), "evaluations": [], "rounds": [], "rounds_plot": None}
    if rows:
        out["curves"] = b.rel(plots.training_curves(rows, b.img / f"{stage.replace('/', '_')}_curves.png", title=title,
                                                       random_init=random_init))
    for p in pngs(d / "viz")[: min(6, b.max_pictures)] if finished else []:
        out["pictures"].append({"src": b.copy(p, f"{stage}_viz_{p.name}"), "image_id": p.stem})
    if kind == "cag" and len(rounds := rounds_table(d)) > 1:  # self-training rounds: cag/round<r>/
        for r in rounds:
            r["status"] = b.status.get(stage if r["round"] == 0 else f"{stage}/round{r['round']}")
            r["random_init"] = b.mark_random(f"{stage}/round{r['round']}/metrics.json", r) if r["round"] else random_init
        out["rounds"] = rounds
        out["rounds_plot"] = b.rel(plots.rounds(rounds, b.img / f"{stage.replace('/', '_')}_rounds.png",
                                                random_init=any(r["random_init"] for r in rounds)))
    if kind == "cag":  # evaluate-cag runs: cag/eval_<set>/metrics.json
        for e in sorted(p for p in d.glob("eval_*") if (p / "metrics.json").is_file()):
            m = read_json_or_none(e / "metrics.json") or {}
            rnd = b.mark_random(f"{stage}/{e.name}/metrics.json", m)
            mm = m.get("eval", m)
            out["evaluations"].append({"name": e.name, "status": b.status.get(f"{stage}/{e.name}"),
                                       "corloc": mm.get("corloc"), "AP50": mm.get("AP50"),
                                       "AP": mm.get("AP"), "mask": mm.get("mask"), "images": mm.get("images"),
                                       "random_init": rnd})
    return out


def other_detectors(b: "Builder") -> list[dict]:
    """The detectors of the chains the config does not name (``cag_tokencut/`` beside a LOST report) that
    exist, each with its own section."""
    out = []
    for chain in b.layout.chains[1:]:
        for kind, what in (("cag", "class-agnostic"), ("cad", "class-aware")):
            if chain.dirs[kind].is_dir():
                name = b.layout.name(chain.dirs[kind])
                t = training(b, kind, f"{name} (train-{kind}, {what} detector)", chain)
                out += [t] if t else []
    return out


def cluster_runs(b: "Builder") -> list[tuple[Path, Path]]:
    """(cluster folder, run) of every cluster run of every chain: the folders below a chain's cluster folder
    that hold a run's results (``lost/k20``; hidden work folders of forced reruns left out)."""
    out = []
    for kind, d, _ in b.layout.folders():
        if kind != "cluster" or not d.is_dir():
            continue
        runs = {p.parent for p in d.rglob("metrics.json")} | {p.parent for p in d.rglob("pseudo_labels.json")}
        runs = {r for r in runs if not any(part.startswith(".") for part in r.relative_to(d).parts)}  # .k20.new
        out += [(d, r) for r in sorted(runs, key=lambda p: natural_key(p.relative_to(d).as_posix()))]
    return out


def cluster(b: "Builder", folder: Path, d: Path) -> dict:
    """A cluster run's section: sizes, galleries, purity/NMI and the cluster x class heat map."""
    from pipeline.evaluation.cluster_quality import cluster_quality_for_boxes

    name, stage = d.relative_to(folder).as_posix(), b.layout.name(d)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", stage)
    metrics = read_json_or_none(d / "metrics.json") or {}
    labels = read_json_or_none(d / "pseudo_labels.json")
    info = (labels or {}).get("info") or {}
    random_init = b.mark_random(f"{stage}/metrics.json", metrics) | b.mark_random(
        f"{stage}/pseudo_labels.json", {"clustering": info.get("clustering"),
                                               "random_init": info.get("random_init")})
    sizes = metrics.get("sizes") or info.get("sizes") or []
    out = {"run": name, "stage": stage, "status": b.status.get(stage), "k": metrics.get("k", info.get("k")),
           "boxes": metrics.get("boxes"),
           "inertia": metrics.get("inertia"), "sizes": sizes, "empty_clusters": metrics.get("empty_clusters"),
           "random_init": random_init, "is_result": not random_init, "sizes_plot": None, "galleries": [],
           "quality": None, "quality_from": None, "heatmap": None}
    if sizes:
        out["sizes_plot"] = b.rel(plots.bars([f"cluster_{i}" for i in range(len(sizes))], sizes,
                                                b.img / f"{slug}_sizes.png",
                                                title=f"{stage}: boxes per cluster", ylabel="boxes",
                                                random_init=random_init))
    for p in pngs(d / "galleries"):
        m = re.search(r"(\d+)", p.stem)
        k = int(m.group(1)) if m else None
        out["galleries"].append({"src": b.copy(p, f"{slug}_{p.name}"), "name": p.stem,
                                 "size": sizes[k] if k is not None and k < len(sizes) else None})
    q = metrics.get("cluster_quality")
    if q:
        out["quality_from"] = "metrics.json"
    elif labels is not None:
        ds = b.records((info.get("config") or {}).get("dataset"))
        if ds is not None:
            q = cluster_quality_for_boxes(labels, ds.records)
            out["quality_from"] = "computed by the report"
    if q:
        out["quality"] = {k: q.get(k) for k in ("purity", "nmi", "boxes", "matched", "matched_fraction",
                                                 "iou_threshold", "convention", "clusters", "classes",
                                                 "confusion", "unmatched_per_cluster", "majority")}
        conf = np.asarray(q["confusion"], dtype=np.float64).reshape(len(q["clusters"]), len(q["classes"]))
        un = np.asarray(q.get("unmatched_per_cluster") or [0] * len(q["clusters"]), dtype=np.float64)
        out["heatmap"] = b.rel(plots.heatmap(np.concatenate([conf, un[:, None]], axis=1), q["clusters"],
                                                [*map(str, q["classes"]), "(no class)"],
                                                b.img / f"{slug}_heatmap.png",
                                                title=f"{stage}: boxes per cluster x GT class",
                                                random_init=random_init))
    return out


def evaluations(b: "Builder") -> list[Path]:
    """The evaluate-cad runs of the configured chain's class-aware detector (``cad/eval_<set>/``)."""
    d = b.layout.chains[0].dirs["cad"]
    return sorted(p for p in d.glob("eval_*") if (p / "metrics.json").is_file())


def evaluation(b: "Builder", d: Path) -> dict:
    """An evaluate-cad run's section: AP per class through the Hungarian matching."""
    stage = b.layout.name(d)
    m = read_json_or_none(d / "metrics.json") or {}
    rnd = b.mark_random(f"{stage}/metrics.json", m)
    rows = [{"class": c, "cluster": v.get("cluster"), "AP50": v.get("AP50"), "AP75": v.get("AP75"),
             "AP50:95": v.get("AP50:95")} for c, v in (m.get("per_class") or {}).items()]
    return {"name": d.name, "status": b.status.get(stage), "gt": m.get("gt"),
            "images": m.get("n_images"), "detections": m.get("n_detections"),
            "per_class": rows, "mean": m.get("mean") or {}, "matching": m.get("matching") or {},
            "unmatched_clusters": m.get("unmatched_clusters") or [],
            "unmatched_classes": m.get("unmatched_classes") or [],
            "classes_without_gt": m.get("classes_without_gt") or [], "random_init": rnd, "is_result": not rnd}
