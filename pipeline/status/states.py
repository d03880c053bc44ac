"""The state of each stage of a dataset/backbone: the one answer that `make status` and `make report` give.

:func:`stage_state` decides one stage directory, :func:`pipeline_status` every one under a base dir; both
commands print what these return, so they cannot disagree. States:

- *done*: finished (``manifest.json``, which a stage writes last, is there) and nothing it read changed. A
  mining run whose miner failed on some images is done with failures, ``done (5 failed)``: those images are
  listed in its metrics.json and retried by the next run, but the run finished.
- *partial*: stopped before it finished, and can go on: a mining run with journalled images but no merged
  ``pseudo_boxes.json`` (``partial 8/13``: images mined of the run); a training killed after a checkpoint
  (``partial 5/30``: iterations, resumed with ``<section>.resume=true``); a training that reached its last
  iteration but was stopped before it wrote its results (a rerun evaluates the model).
- *failed*: a training that died before its first checkpoint, or whose ``model.pt`` does not load.
- *stale*: finished, but since then an input file changed or went away, the dataset's annotations changed, or
  a stage it read from is itself stale, partial or failed (this propagates downstream: cad is stale when its
  clusters are).
- *missing*: nothing there.

Where the stages are comes from the caller's :class:`pipeline.layout.Layout` (the config's ``dirs`` map, every
chain); what they recorded is read through :mod:`pipeline.summaries`. :mod:`pipeline.status.commands` turns a
state into the command to run, :mod:`pipeline.status.tree` finds a copied tree's own inputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.artifacts import sha256_file
from pipeline.layout import KINDS, Layout
from pipeline.status.commands import next_command
from pipeline.status.tree import inside, reroot, shown, tree_map, visible
from pipeline.summaries import ROUND_DIR, Manifest, MiningSummary, journal_counts, round_dirs

STAGES = KINDS
# make target of a stage kind; evaluation runs (eval_* below cag/ or cad/) are below
TARGETS = {"mine": "mine", "cag": "train-cag", "cluster": "cluster", "cad": "train-cad"}
EVAL_TARGETS = {"cag": "evaluate-cag", "cad": "evaluate-cad"}
TRAIN_SECTIONS = {"cag": "train_cag", "cad": "train_cad"}
ROUND = ("self-train", "self_train")   # a self-training round below cag/ (round<r>/): its target and section
UNFINISHED = ("stale", "partial", "failed")


@dataclass
class StageState:
    stage: str                       # its dir under the base dir: mine_maskcut, cluster/lost/k20, cad/eval_test...
    state: str                       # done | partial | failed | stale | missing
    path: Path
    changed: list[str] = field(default_factory=list)     # why it is stale
    wall_time_s: float | None = None
    end_time: str | None = None
    progress: tuple[int, int] | None = None   # partial: (images mined, images of the run) or (iteration, of)
    inputs: list[Path] = field(default_factory=list)     # the input files, where they are in this tree
    failures: int = 0                # images the miner failed on (a finished mining run)
    detail: str = ""                 # partial / failed: what is there and how it goes on
    force: bool = False              # its next run replaces finished (or unreadable) results: FORCE=1
    extra_args: tuple[str, ...] = ()                     # what its next run needs (train_cag.resume=true)
    selectors: dict[str, str] = field(default_factory=dict)   # the keys that pick this run (miner, cluster.k)
    root: Path | None = None         # the base dir it was checked under
    kind: str = ""                   # mine | cag | cluster | cad (default: from the name's first part)
    evaluation: bool = False         # an evaluation run below cag/ or cad/ (default: from the name)

    def __post_init__(self) -> None:
        if not self.kind:
            parts = self.stage.split("/")
            self.kind = parts[0].split("_")[0]
            self.evaluation = len(parts) > 1 and self.kind in EVAL_TARGETS and parts[-1].startswith("eval_")

    @property
    def is_round(self) -> bool:
        """A self-training round (``cag/round2``)."""
        parts = self.stage.split("/")
        return self.kind == "cag" and len(parts) > 1 and ROUND_DIR.match(parts[-1]) is not None

    @property
    def label(self) -> str:
        """The state in a few characters, as both commands print it: ``done (5 failed)``, ``partial 5/30``,
        ``STALE``, ``missing``, ``failed``."""
        if self.state == "done" and self.failures:
            return f"done ({self.failures} failed)"
        if self.state == "partial" and self.progress:
            done, total = self.progress
            return f"partial {done}/{total}" if total else f"partial {done}"
        return "STALE" if self.state == "stale" else self.state

    @property
    def target(self) -> str:
        """The make target that (re)runs this stage."""
        if self.is_round:
            return ROUND[0]
        return EVAL_TARGETS[self.kind] if self.evaluation else TARGETS.get(self.kind, self.kind)

    def as_dict(self, args: Sequence[str] | None = None) -> dict:
        """A JSON-able summary (what the report shows and writes to summary.json)."""
        return {"stage": self.stage, "state": self.state, "label": self.label, "path": str(self.path),
                "changed": list(self.changed), "detail": self.detail, "failures": self.failures,
                "progress": list(self.progress) if self.progress else None, "end_time": self.end_time,
                "wall_time_s": self.wall_time_s, "command": next_command(self, args)}


# ----------------------------------------------------------------------------- reading a stage dir
def _unfinished(name: str, stage_dir: Path, n_images: int | None, kind: str, evaluation: bool) -> StageState:
    """A stage dir without a manifest: a mining run's journals (partial), a training's checkpoint (partial
    or failed), anything else of a training (failed), or nothing (missing)."""
    if kind == "mine":
        counts = journal_counts(stage_dir)
        if counts is None:
            return StageState(name, "missing", stage_dir)
        ok, bad = counts
        total = n_images or 0
        detail = f"{ok} of {total} images mined" if total else f"{ok} images mined, not merged"
        if bad:
            detail += f", {bad} failed (retried by the next run)"
        return StageState(name, "partial", stage_dir, progress=(ok, total), detail=detail)
    if kind in TRAIN_SECTIONS and not evaluation:
        return _training(name, stage_dir, kind)
    if kind == "cag" and ROUND_DIR.match(stage_dir.name):
        return _training(name, stage_dir, kind, section=ROUND[1])
    return StageState(name, "missing", stage_dir)


def _training(name: str, stage_dir: Path, kind: str, section: str = "") -> StageState:
    """A training stage without its results: read the iteration and the schedule's length from model.pt
    (memory-mapped: the weights are not read)."""
    section = section or TRAIN_SECTIONS[kind]
    ckpt_path = stage_dir / "model.pt"
    if not ckpt_path.is_file():
        if stage_dir.is_dir() and any(stage_dir.iterdir()):
            return StageState(name, "failed", stage_dir, detail="it stopped before its first checkpoint "
                              "(no model.pt): a rerun starts it again")
        return StageState(name, "missing", stage_dir)
    from pipeline.artifacts import ArtifactError
    from pipeline.detection.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(ckpt_path, mmap=True)
        done, target = int(ckpt.get("iteration", 0)), (ckpt.get("schedule") or {}).get("iterations")
        del ckpt
    except (ArtifactError, TypeError, ValueError):
        return StageState(name, "failed", stage_dir, force=True, detail="its model.pt does not load (damaged, or "
                          "not a checkpoint of this pipeline): FORCE=1 trains again")
    if target is not None and done < int(target):
        return StageState(name, "partial", stage_dir, progress=(done, int(target)),
                          detail=f"resume with {section}.resume=true (model.pt at iteration {done} of {target})",
                          extra_args=(f"{section}.resume=true",))
    return StageState(name, "partial", stage_dir, progress=(done, int(target or done)),
                      detail="trained to the end but not evaluated (stopped before it wrote its results): "
                             "a rerun evaluates model.pt")


def _selectors(st: StageState, man: Manifest, chain: Mapping[str, str] | None) -> dict[str, str]:
    """The keys that make a stage's command run this stage dir and not the one the ARGS name: its chain's
    (miner and feature: ``chain``, else what the manifest recorded), cluster source/K/run name, train-cad's
    cluster run, an evaluation's image set."""
    out: dict[str, str] = {}
    if chain:
        out.update(chain)
    elif st.kind in ("cag", "cluster"):
        miner, feature = man.section("miner").get("name"), man.section("backbone").get("feature")
        out.update({k: str(v) for k, v in (("miner", miner), ("backbone.feature", feature)) if v is not None})
    parts = st.stage.split("/")
    if st.evaluation:
        image_set = man.section("dataset").get("image_set") or parts[-1][len("eval_"):]
        out["dataset.image_set"] = str(image_set)
    elif st.kind == "cluster" and len(parts) >= 3:
        recorded = man.section("cluster")
        source, run = parts[-2], parts[-1]
        k = recorded.get("k")
        if k is None and run[:1] == "k" and run[1:].isdigit():
            k = run[1:]
        out["cluster.source"] = source
        if k is not None:
            out["cluster.k"] = str(k)
        if run != f"k{k}":
            out["cluster.run_name"] = run
    elif st.is_round:
        out["self_train.rounds"] = str(ROUND_DIR.match(parts[-1]).group(1))
    elif st.kind == "cad":
        run = man.section("train_cad").get("cluster_run")
        if run:
            out["train_cad.cluster_run"] = str(run)
    return out


def stage_state(stage_dir: str | os.PathLike, stage: str | None = None, *, root: str | os.PathLike | None = None,
                annotations_digest: str | None = None, n_images: int | None = None, kind: str = "",
                evaluation: bool = False, selectors: Mapping[str, str] | None = None) -> StageState:
    """The state of one stage dir (module docstring). ``stage``: its name under the base dir (default: the
    dir's name); ``root``: the base dir (names inputs relative to it in messages); ``annotations_digest``:
    the current digest of the dataset's annotations (:func:`annotations_digest`), compared with the one the
    manifest recorded, if it recorded one; ``n_images``: the dataset's image count (the total of a partial
    mining run); ``kind``/``evaluation``: what the stage is (default: from its name); ``selectors``: the
    keys that select its chain (:class:`pipeline.layout.Chain`)."""
    stage_dir = Path(stage_dir)
    name = stage or stage_dir.name
    root_path = Path(root) if root is not None else None
    st = _stage_state(stage_dir, StageState(name, "missing", stage_dir, kind=kind, evaluation=evaluation),
                      root_path, annotations_digest, n_images, selectors)
    st.root = root_path if root_path is not None else _root_of(stage_dir, name)
    replacement = stage_dir.parent / f".{stage_dir.name}.new"   # where a forced rerun works until it swaps in
    if replacement.is_dir():
        st.detail = "; ".join(d for d in (st.detail, f"an unfinished forced rerun is in {replacement.name}/") if d)
    return st


def _stage_state(stage_dir: Path, st: StageState, root: Path | None, digest: str | None, n_images: int | None,
                 chain: Mapping[str, str] | None) -> StageState:
    name = st.stage
    try:
        man = Manifest.read(stage_dir)
    except ValueError:
        return StageState(name, "stale", stage_dir, ["manifest.json (unreadable)"], force=True, kind=st.kind,
                          evaluation=st.evaluation)
    if man is None:
        out = _unfinished(name, stage_dir, n_images, st.kind, st.evaluation)
        out.kind, out.evaluation = st.kind, st.evaluation
        out.selectors = dict(chain or {})
        return out
    tree = tree_map(man.config, stage_dir)
    shown_root = root if root is not None else (tree[1][1] if len(tree) > 1 else None)
    changed, inputs = [], []
    for key, rec in man.inputs.items():
        p = reroot(rec.path, tree)
        inputs.append(p)
        if not p.is_file():
            changed.append(f"{key} ({shown(p, shown_root)}) no longer exists")
        elif rec.sha256 and sha256_file(p) != rec.sha256:
            changed.append(f"{key} ({shown(p, shown_root)}) changed since it ran")
    if digest and man.annotations_digest and man.annotations_digest != digest:
        changed.append("the dataset's annotations changed since it ran")
    common = {"inputs": inputs, "selectors": _selectors(st, man, chain), "kind": st.kind, "evaluation": st.evaluation}
    if st.kind == "mine" and not (stage_dir / "pseudo_boxes.json").is_file() and not changed:
        return StageState(name, "partial", stage_dir, detail="pseudo_boxes.json is not there: a rerun writes it "
                          "from the journal", **common)
    failures = MiningSummary.read(stage_dir).failures if st.kind == "mine" else 0
    return StageState(name, "stale" if changed else "done", stage_dir, changed, failures=failures, force=True,
                      wall_time_s=man.wall_time_s, end_time=man.end_time, **common)


def _root_of(stage_dir: Path, name: str) -> Path:
    """The base dir of a stage dir named ``name`` under it (``cluster/lost/k2`` is three levels down)."""
    n = len(name.split("/"))
    return stage_dir.parents[n - 1] if len(stage_dir.parts) > n else stage_dir.parent


def pipeline_status(root: str | os.PathLike, layout: Layout | None = None, *, annotations_digest: str | None = None,
                    n_images: int | None = None) -> list[StageState]:
    """The states of every stage of ``layout`` (default: the default chain's folders under ``root`` =
    output_root/dataset/backbone, :meth:`Layout.single`): the configured chain's folders (always listed,
    missing or not) and the other chains' that exist, grouped by kind, and the runs below them that have a
    manifest (``cluster/lost/k20``, ``cad/eval_test``); a cluster folder itself only while it holds no run.
    A stage that read a file of a stale, partial or failed stage is stale too."""
    root = Path(root)
    layout = layout or Layout.single(root)
    kw = {"root": root, "annotations_digest": annotations_digest, "n_images": n_images}
    out = []
    for kind, d, chain in layout.folders():
        nested = sorted({m.parent for m in d.rglob("manifest.json") if m.parent != d and visible(m.parent, root)} |
                        ({r for _, r in round_dirs(d)} if kind == "cag" else set())) if d.is_dir() else []
        if kind != "cluster" or not nested:   # a cluster folder holds runs; every other folder is a stage itself
            out.append(stage_state(d, layout.name(d), kind=kind, selectors=chain.selectors, **kw))
        out.extend(stage_state(n, layout.name(n), kind=kind, evaluation=kind in EVAL_TARGETS and
                               n.name.startswith("eval_"), selectors=chain.selectors, **kw) for n in nested)
    _propagate(out)
    return out


def _propagate(states: list[StageState]) -> None:
    """Mark stale every finished stage that read a file inside a stale, partial or failed stage's dir (to a
    fixed point)."""
    changed = True
    while changed:
        changed = False
        bad = [s for s in states if s.state in UNFINISHED]
        for st in states:
            if st.state != "done":
                continue
            for b in bad:
                if any(inside(p, b.path) for p in st.inputs):
                    st.state = "stale"
                    st.changed.append(f"upstream {b.stage} is {b.state}")
                    changed = True
                    break


def annotations_digest(records) -> str:
    """A digest of what a dataset's annotations say (ids, boxes, classes, difficult and crowd flags): a stage
    that scored against them is stale when it changes."""
    import numpy as np

    from pipeline.artifacts import sha256_json

    return sha256_json([[r.image_id, int(r.coco_id), np.asarray(r.boxes).round(3).tolist(), list(r.classes),
                         np.asarray(r.difficult).tolist(), np.asarray(r.crowd).tolist()]
                        for r in records if r.has_gt])


def dataset_facts(build: Callable[[], Any]) -> tuple[dict, str | None]:
    """What the states need from the dataset, for :func:`pipeline_status`: ``({"annotations_digest": ...,
    "n_images": ...}, None)``; ``({}, why)`` when ``build()`` (which builds the dataset) fails: the states
    are then decided without it (annotations and image counts not checked). Both commands call this, so
    they decide with the same facts."""
    try:
        ds = build()
    except Exception as e:  # noqa: BLE001 - status and report still say what they can without the data
        return {}, f"dataset not readable here, annotations and image counts not checked: {e}"
    return {"annotations_digest": annotations_digest(ds.records) if ds.has_gt else None, "n_images": len(ds)}, None
