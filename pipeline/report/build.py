"""Build the static HTML report of one experiment (``<output_root>/<dataset>/<backbone>/``).

:func:`build_report` reads whatever the stages wrote there (no stage is rerun, nothing but the report dir
is written), makes PNG plots, copies the stages' pictures, renders ``index.html`` with a Jinja2 template
and writes ``summary.json``: a self-contained folder that opens from disk, offline, without JavaScript.
Every section appears only when its stage has run. Every stage's state is :mod:`pipeline.status`'s, the
one ``make status`` prints (done, partial, failed, stale, missing): the provenance table lists them, and the
section of a stage that is not done carries a mark saying so, why (which input or upstream stage changed),
and the command that brings it up to date. A partial or failed training shows no numbers (it has none).

Where the stages are is the caller's :class:`pipeline.layout.Layout` (the config's ``dirs`` map, every
chain); the sections are built by :mod:`pipeline.report.mining` (mining runs, worst images) and
:mod:`pipeline.report.sections` (detectors, cluster runs, evaluations).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from pipeline.artifacts import ArtifactError, atomic_path, write_json, write_text
from pipeline.layout import Layout
from pipeline.report import sections
from pipeline.report.mining import MIN_SIDE, mining, mining_dirs  # noqa: F401 - MIN_SIDE: the report's rule
from pipeline.report.mining import draw as _draw  # noqa: F401 - tests draw pictures as the report does
from pipeline.summaries import Manifest

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
NOT_A_RESULT = "random weights: smoke test, not a result"


class ReportError(ArtifactError):
    """Nothing to report (no outputs for this dataset/backbone); the message says where and what to run."""


# --------------------------------------------------------------------------- small helpers
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


class Builder:
    """What every section shares: where the stages are (``layout``), the report's work dir and pictures, the
    stages' states, the GT of the datasets, the notes and what used random weights."""

    def __init__(self, layout: Layout, work: Path, dataset: dict | None, max_pictures: int, n_worst: int,
                 args: Sequence[str] | None = None, facts: dict | None = None):
        self.layout, self.root, self.work, self.dataset = layout, layout.root, work, dataset
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

        states = pipeline_status(self.root, self.layout, **self.facts)
        rows, manifests = [], []
        for st in states:
            row = {**st.as_dict(self.args), "path": os.path.relpath(st.path, self.root)}
            rows.append(row)
            self.status[st.stage] = row
            try:
                man = Manifest.read(Path(st.path))
            except ValueError:      # unreadable: its state (stale) says so
                man = None
            if man is not None:
                manifests.append(self._manifest_summary(st.stage, man))
        missing = [{"stage": r["stage"], "run": r["command"]} for r in rows if r["state"] == "missing"]
        cad_dir = self.layout.chains[0].dirs["cad"]
        cad_name = self.layout.name(cad_dir)
        cad = self.status.get(cad_name)
        if cad and cad["state"] in ("done", "stale") and not any(r["stage"].startswith(f"{cad_name}/eval_")
                                                                 for r in rows):
            evals = StageState(f"{cad_name}/eval_*", "missing", cad_dir / "eval_*", root=self.root, kind="cad",
                               evaluation=True, selectors=self.layout.chains[0].selectors)
            missing.append({"stage": evals.stage, "run": evals.as_dict(self.args)["command"]})
        return {"stages": rows, "manifests": manifests, "missing": missing,
                "stale": [r["stage"] for r in rows if r["state"] == "stale"]}

    def _manifest_summary(self, stage: str, manifest: Manifest) -> dict:
        cfg, man = manifest.config, manifest.raw
        b, d = manifest.section("backbone"), manifest.section("dataset")
        det, sch, cl = manifest.section("detector"), manifest.section("schedule"), manifest.section("cluster")
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
                "config": "; ".join(p for p in parts if p), "end_time": manifest.end_time,
                "wall_time_s": manifest.wall_time_s, "host_versions": {k: v for k, v in (man.get("versions") or {}).items()
                                                                          if k in ("python", "torch", "torchvision")}}


def _has_outputs(layout: Layout) -> bool:
    return any(d.is_dir() for _, d, _ in layout.folders())


def build_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 dataset: dict | None = None, max_pictures: int = 12, n_worst: int = 4,
                 title: str | None = None, args: Sequence[str] | None = None,
                 annotations_digest: str | None = None, n_images: int | None = None,
                 layout: Layout | None = None) -> dict:
    """Write ``out_dir`` (default ``root/report``): ``index.html``, ``summary.json`` and ``img/``.

    ``root``: ``<output_root>/<dataset>/<backbone>``. ``dataset``: the dataset config (``kind``, ``root``,
    ``image_set``, ``ann_file``, ``image_dir``, ``list_file``, ``max_images``) whose GT scores the pictures
    and clusters when the config recorded in an artifact no longer loads. ``max_pictures``: the first N
    mining pictures; ``n_worst``: how many of the worst images are drawn besides. ``args``: the experiment's
    ARGS (Hydra overrides), repeated in the commands the report suggests (None: ARGS naming the dataset,
    backbone and output root); ``annotations_digest`` / ``n_images``: the dataset facts that decide the
    stages' states (:func:`pipeline.status.dataset_facts`, as `make status`); ``layout``: where the stages
    are (every chain, from the config's ``dirs`` map; None: the default chain under ``root``). Returns the
    summary.
    The folder is replaced as a whole (built next to it, then swapped in)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    layout = layout or Layout.single(root)
    if not _has_outputs(layout):
        raise ReportError(f"no pipeline outputs under {root} (no mine/, cag/, cluster/ or cad/ there): run "
                          f"the mine stage for dataset {root.parent.name} and backbone {root.name} first, or point the "
                          "output root, dataset and backbone at an experiment that ran")
    work = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        facts = {"annotations_digest": annotations_digest, "n_images": n_images}
        b = Builder(layout, work, dataset, max_pictures, n_worst, args, facts)
        prov = b.provenance()
        mines = [mining(b, d) for d in mining_dirs(b)]
        cag = sections.training(b, "cag", "train-cag (class-agnostic detector)")
        clusters = [sections.cluster(b, folder, d) for folder, d in sections.cluster_runs(b)]
        cad = sections.training(b, "cad", "train-cad (class-aware detector)")
        evals = [sections.evaluation(b, d) for d in sections.evaluations(b)]
        others = sections.other_detectors(b)
        names = ["provenance"] + (["mining"] if mines else []) + (["train-cag"] if cag else []) + \
            (["cluster"] if clusters else []) + (["train-cad"] if cad else []) + (["evaluate-cad"] if evals else []) + \
            (["other-detectors"] if others else [])
        random_sources = list(dict.fromkeys(b.random_sources))  # discovery order: mine first
        summary = {
            "title": title or f"{root.parent.name} / {root.name}", "dataset": root.parent.name,
            "backbone": root.name, "root": str(root), "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "random_init": bool(random_sources), "random_sources": random_sources,
            "numbers_are_results": not random_sources, "sections": names, "provenance": prov,
            "mining": mines, "train_cag": cag, "cluster": clusters, "train_cad": cad, "evaluate_cad": evals,
            "other_detectors": others,
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


def format_report_summary(summary: dict) -> str:
    """What `make report` prints of the summary :func:`build_report` returns: where the page is, its sections, the
    stages that are missing or not up to date (with the command that brings each up to date)."""
    prov = summary["provenance"]
    lines = [f"report: {summary['index']}", f"sections: {', '.join(summary['sections'])}"]
    if prov["missing"]:
        lines.append("missing stages: " + ", ".join(f"{m['stage']} ({m['run']})" for m in prov["missing"]))
    lines += [f"{row['label']} {row['stage']}: {'; '.join(row['changed']) or row['detail']}; run: {row['command']}"
              for row in prov["stages"] if row["state"] in ("stale", "partial", "failed")]
    if summary["random_init"]:
        lines.append("[RANDOM WEIGHTS: the report shows a smoke test, not results]")
    return "\n".join(lines)
