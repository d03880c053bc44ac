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

:func:`next_command` turns a state into what to run: the stage's make target, ``FORCE=1`` when the stage
has finished results to replace, the keys that pick the stage's own run (its miner, cluster K...) and the
experiment's ARGS.

Copied trees. A manifest records each input by the path it had when the stage ran, and records where its
tree was (the resolved config's ``stage_dir``, ``base_dir`` and ``paths.output_root``). An input recorded
inside that tree is looked up at the same place in the tree being checked, so ``cp -a outputs /tmp/o2`` gives
a copy whose stages are checked against the copy's own files, not the original's (manifests are read as
written: absolute or relative paths, nothing to migrate).
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

from pipeline.artifacts import sha256_file

STAGES = ("mine", "cag", "cluster", "cad")
# make target of a stage kind (kind = first part of the stage name before "_"); evaluation runs are below
TARGETS = {"mine": "mine", "cag": "train-cag", "cluster": "cluster", "cad": "train-cad"}
EVAL_TARGETS = {"cag": "evaluate-cag", "cad": "evaluate-cad"}
TRAIN_SECTIONS = {"cag": "train_cag", "cad": "train_cad"}
FEATURES = ("k", "q", "v", "tokens")          # backbone.feature values, the last part of a mine_* dir name
# values the config has when a key is not given: a selector equal to its default is left out of a command
SELECTOR_DEFAULTS = {"miner": "lost", "backbone.feature": "k", "cluster.source": "lost",
                     "dataset.image_set": "trainval"}
# keys of the experiment's ARGS that a suggested command must not carry over
NOT_CARRIED = ("force", "stage_dir", "train_cag.resume", "train_cad.resume", "train_cag.stop_after",
               "train_cad.stop_after")
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
        kind = _kind(self.stage)
        return EVAL_TARGETS[kind] if _is_eval(self.stage) else TARGETS.get(kind, kind)

    def as_dict(self, args: Sequence[str] | None = None) -> dict:
        """A JSON-able summary (what the report shows and writes to summary.json)."""
        return {"stage": self.stage, "state": self.state, "label": self.label, "path": str(self.path),
                "changed": list(self.changed), "detail": self.detail, "failures": self.failures,
                "progress": list(self.progress) if self.progress else None, "end_time": self.end_time,
                "wall_time_s": self.wall_time_s, "command": next_command(self, args)}


def _kind(stage: str) -> str:
    return stage.split("/")[0].split("_")[0]


def _is_eval(stage: str) -> bool:
    parts = stage.split("/")
    return len(parts) > 1 and _kind(stage) in EVAL_TARGETS and parts[-1].startswith("eval_")


# ----------------------------------------------------------------------------- reading a stage dir
def _journal_counts(stage_dir: Path) -> tuple[int, int] | None:
    """(images with a result, images whose last row is a failure) over a mining run's shard journals (the
    last row of an image wins, as when the journals are merged); None without journals."""
    results = stage_dir / "results"
    journals = sorted(results.glob("shard-*.jsonl")) if results.is_dir() else []
    if not journals:
        return None
    last: dict = {}
    for j in journals:
        with open(j) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line: the journal cuts it on reopen
                    continue
                last[row.get("image_id", row.get("index"))] = row.get("error") is None
    ok = sum(last.values())
    return ok, len(last) - ok


def _unfinished(name: str, stage_dir: Path, n_images: int | None) -> StageState:
    """A stage dir without a manifest: a mining run's journals (partial), a training's checkpoint (partial
    or failed), anything else of a training (failed), or nothing (missing)."""
    kind = _kind(name)
    if kind == "mine":
        counts = _journal_counts(stage_dir)
        if counts is None:
            return StageState(name, "missing", stage_dir)
        ok, bad = counts
        total = n_images or 0
        detail = f"{ok} of {total} images mined" if total else f"{ok} images mined, not merged"
        if bad:
            detail += f", {bad} failed (retried by the next run)"
        return StageState(name, "partial", stage_dir, progress=(ok, total), detail=detail)
    if kind in TRAIN_SECTIONS and not _is_eval(name):
        return _training(name, stage_dir)
    return StageState(name, "missing", stage_dir)


def _training(name: str, stage_dir: Path) -> StageState:
    """A training stage without its results: read the iteration and the schedule's length from model.pt
    (memory-mapped: the weights are not read)."""
    section = TRAIN_SECTIONS[_kind(name)]
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


def _lexical_relative(path: str | os.PathLike, base: str | os.PathLike) -> PurePath | None:
    """``path`` relative to ``base`` when it lies inside it (compared as written; a relative and an absolute
    one through the current directory), else None."""
    p, b = os.path.normpath(path), os.path.normpath(base)
    if os.path.isabs(p) != os.path.isabs(b):
        p, b = os.path.abspath(p), os.path.abspath(b)
    try:
        return PurePath(p).relative_to(b)
    except ValueError:
        return None


def _tree_map(config: dict, stage_dir: Path) -> list[tuple[str, Path]]:
    """(a directory of the tree the stage ran in, the same directory in the tree being checked), the stage's
    own dir first: the manifest's config recorded ``stage_dir``, ``base_dir`` and ``paths.output_root``, and
    ``stage_dir`` is where that manifest is now. A recorded dir is mapped only when the layout below it is
    the same here (a stage written elsewhere with ``stage_dir=...`` maps only its own dir)."""
    recorded_stage = config.get("stage_dir")
    if not isinstance(recorded_stage, str) or not recorded_stage:
        return []
    here = Path(os.path.abspath(stage_dir))
    pairs = [(recorded_stage, here)]
    for recorded in (config.get("base_dir"), (config.get("paths") or {}).get("output_root")):
        if not isinstance(recorded, str) or not recorded:
            continue
        rel = _lexical_relative(recorded_stage, recorded)
        n = len(rel.parts) if rel is not None else 0
        if rel is None or len(here.parts) <= n or tuple(here.parts[len(here.parts) - n:]) != rel.parts:
            continue
        pairs.append((recorded, here.parents[n - 1] if n else here))
    return pairs


def _reroot(recorded: str, tree: list[tuple[str, Path]]) -> Path:
    """Where a recorded input is in the tree being checked (see :func:`_tree_map`); an input outside the
    recorded tree stays as recorded."""
    for old, new in tree:
        rel = _lexical_relative(recorded, old)
        if rel is not None:
            return new / rel
    return Path(recorded)


def _shown(path: Path, root: Path | None) -> str:
    """A path as a message shows it: relative to the base dir when inside it (``mine/pseudo_boxes.json``)."""
    if root is not None:
        rel = _lexical_relative(path, root)
        if rel is not None:
            return rel.as_posix()
    return str(path)


def _mine_dir_keys(name: str) -> dict[str, str]:
    """The miner and feature that a mine dir's name says (``stages.config.mine_dir``: ``mine`` is LOST on
    keys, ``mine_<miner>[_<feature>]``, ``mine_<feature>`` for LOST on another feature)."""
    parts = name.split("_")[1:]
    feature = parts.pop() if parts and parts[-1] in FEATURES else "k"
    return {"miner": "_".join(parts) or "lost", "backbone.feature": feature}


def _selectors(name: str, config: dict) -> dict[str, str]:
    """The keys that make a stage's command run this stage dir and not the one the ARGS name: the miner and
    feature (a mine dir, and what cag and cluster read), cluster source/K/run name, train-cad's cluster run,
    an evaluation's image set. From the dir's name and, when recorded, the manifest's config."""
    kind, parts = _kind(name), name.split("/")
    out: dict[str, str] = {}
    if kind == "mine":
        return _mine_dir_keys(parts[0])
    if _is_eval(name):
        return {"dataset.image_set": parts[-1][len("eval_"):]}
    if kind in ("cag", "cluster"):
        miner, feature = (config.get("miner") or {}).get("name"), (config.get("backbone") or {}).get("feature")
        out.update({k: str(v) for k, v in (("miner", miner), ("backbone.feature", feature)) if v is not None})
    if kind == "cluster" and len(parts) == 3:
        recorded = config.get("cluster") or {}
        source, run = parts[1], parts[2]
        k = recorded.get("k")
        if k is None and re.fullmatch(r"k\d+", run):
            k = run[1:]
        out["cluster.source"] = source
        if k is not None:
            out["cluster.k"] = str(k)
        if run != f"k{k}":
            out["cluster.run_name"] = run
    if kind == "cad":
        run = (config.get("train_cad") or {}).get("cluster_run")
        if run:
            out["train_cad.cluster_run"] = str(run)
    return out


def stage_state(stage_dir: str | os.PathLike, stage: str | None = None, *, root: str | os.PathLike | None = None,
                annotations_digest: str | None = None, n_images: int | None = None) -> StageState:
    """The state of one stage dir (module docstring). ``stage``: its name under the base dir (default: the
    dir's name); ``root``: the base dir (names inputs relative to it in messages); ``annotations_digest``:
    the current digest of the dataset's annotations (:func:`annotations_digest`), compared with the one the
    manifest recorded, if it recorded one; ``n_images``: the dataset's image count (the total of a partial
    mining run)."""
    stage_dir = Path(stage_dir)
    name = stage or stage_dir.name
    root_path = Path(root) if root is not None else None
    st = _stage_state(stage_dir, name, root_path, annotations_digest, n_images)
    st.root = root_path if root_path is not None else _root_of(stage_dir, name)
    replacement = stage_dir.parent / f".{stage_dir.name}.new"   # where a forced rerun works until it swaps in
    if replacement.is_dir():
        st.detail = "; ".join(d for d in (st.detail, f"an unfinished forced rerun is in {replacement.name}/") if d)
    return st


def _stage_state(stage_dir: Path, name: str, root: Path | None, digest: str | None,
                 n_images: int | None) -> StageState:
    man_path = stage_dir / "manifest.json"
    if not man_path.is_file():
        return _unfinished(name, stage_dir, n_images)
    try:
        man = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError):
        return StageState(name, "stale", stage_dir, ["manifest.json (unreadable)"], force=True)
    config = man.get("config") if isinstance(man.get("config"), dict) else {}
    tree = _tree_map(config, stage_dir)
    shown_root = root if root is not None else (tree[1][1] if len(tree) > 1 else None)
    changed, inputs = [], []
    for key, rec in (man.get("inputs") or {}).items():
        p = _reroot(str(rec.get("path", "")), tree)
        inputs.append(p)
        if not p.is_file():
            changed.append(f"{key} ({_shown(p, shown_root)}) no longer exists")
        elif rec.get("sha256") and sha256_file(p) != rec["sha256"]:
            changed.append(f"{key} ({_shown(p, shown_root)}) changed since it ran")
    recorded = man.get("annotations_digest")
    if digest and recorded and recorded != digest:
        changed.append("the dataset's annotations changed since it ran")
    selectors = _selectors(name, config)
    times = {"wall_time_s": man.get("wall_time_s"), "end_time": man.get("end_time")}
    if _kind(name) == "mine" and not (stage_dir / "pseudo_boxes.json").is_file() and not changed:
        return StageState(name, "partial", stage_dir, inputs=inputs, selectors=selectors,
                          detail="pseudo_boxes.json is not there: a rerun writes it from the journal")
    failures = 0
    if _kind(name) == "mine":
        try:
            failures = int(json.loads((stage_dir / "metrics.json").read_text()).get("failures") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            failures = 0
    return StageState(name, "stale" if changed else "done", stage_dir, changed, inputs=inputs, failures=failures,
                      force=True, selectors=selectors, **times)


def _root_of(stage_dir: Path, name: str) -> Path:
    """The base dir of a stage dir named ``name`` under it (``cluster/lost/k2`` is three levels down)."""
    n = len(name.split("/"))
    return stage_dir.parents[n - 1] if len(stage_dir.parts) > n else stage_dir.parent


def _visible(path: Path, root: Path) -> bool:
    """Not under a hidden dir (``.cag.new``: a forced rerun's work in progress, ``.report.tmp-*``)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def pipeline_status(root: str | os.PathLike, stages=STAGES, *, annotations_digest: str | None = None,
                    n_images: int | None = None) -> list[StageState]:
    """The states of every stage under ``root`` (= output_root/dataset/backbone): ``root/<stage>`` (always
    listed, missing or not) and its variants (``mine_dinoseg``), the runs below them that have a manifest
    (``cluster/lost/k20``, ``cad/eval_test``); ``cluster/`` itself only while it holds no run. A stage that
    read a file of a stale, partial or failed stage is stale too."""
    root = Path(root)
    kw = {"root": root, "annotations_digest": annotations_digest, "n_images": n_images}
    out = []
    for s in stages:
        dirs = [root / s] + sorted(p for p in root.glob(f"{s}_*") if p.is_dir())
        for d in dirs:
            nested = sorted(m.parent for m in d.rglob("manifest.json")
                            if m.parent != d and _visible(m.parent, root)) if d.is_dir() else []
            if s != "cluster" or not nested:   # cluster/ holds runs; every other dir is a stage itself
                if d.exists() or d == root / s:
                    out.append(stage_state(d, d.relative_to(root).as_posix(), **kw))
            out.extend(stage_state(n, n.relative_to(root).as_posix(), **kw) for n in nested)
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
                if any(_inside(p, b.path) for p in st.inputs):
                    st.state = "stale"
                    st.changed.append(f"upstream {b.stage} is {b.state}")
                    changed = True
                    break


def _inside(path: Path, directory: Path) -> bool:
    return _lexical_relative(os.path.abspath(path), os.path.abspath(directory)) is not None


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


# ----------------------------------------------------------------------------- what to run
def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _carried(arg: str) -> bool:
    """Whether an override of the experiment goes into a suggested command (not a flag such as ``-m``, not
    Hydra's own keys, not :data:`NOT_CARRIED`)."""
    key = _key(arg)
    return "=" in arg and not arg.startswith("-") and key not in NOT_CARRIED and \
        re.split(r"[./]", key)[0] != "hydra"


def default_args(root: Path) -> list[str]:
    """ARGS that find the experiment at ``root`` (= output_root/dataset/backbone) when the experiment's own
    ARGS are not known."""
    return [f"dataset={root.parent.name}", f"backbone={root.name}", f"paths.output_root={root.parent.parent}"]


def next_command(st: StageState, args: Sequence[str] | None) -> str | None:
    """The command that brings a stage up to date (None when it is done): its make target, ``FORCE=1`` when
    it has finished results to replace, and ARGS = the experiment's ``args`` (the overrides it runs with;
    ``force``, ``stage_dir``, resume/stop keys and Hydra's own left out; None: :func:`default_args`) with
    the keys that pick this stage's run (:func:`_selectors`: they replace the same keys of ``args``, and are
    added when they differ from the config's default) and what the run needs (``train_cag.resume=true``)."""
    if st.state == "done":
        return None
    if args is None:
        args = default_args(st.root) if st.root is not None else []
    out = [a for a in args if _carried(a)]
    for extra in [f"{k}={v}" for k, v in st.selectors.items()] + list(st.extra_args):
        k, v = extra.split("=", 1)
        at = [i for i, a in enumerate(out) if _key(a) == k]
        if at:
            out[at[0]] = extra
        elif extra in st.extra_args or SELECTOR_DEFAULTS.get(k) != v:
            out.append(extra)
    force = " FORCE=1" if st.force and st.state != "missing" else ""
    quoted = " ".join(shlex.quote(a) for a in out)
    return f"make {st.target}{force}" + (f' ARGS="{quoted}"' if quoted else "")


def format_status(states: list[StageState], args: Sequence[str] | None = None) -> str:
    """One line per stage (``<stage> <label> <dir>  <finished / why / how it goes on>``), and under every stage
    that is not done the command that brings it up to date (:func:`next_command` with ``args``)."""
    lines = []
    for st in states:
        extra = ""
        if st.state == "done" and st.end_time and st.wall_time_s is not None:
            extra = f"  finished {st.end_time[:19]}Z in {st.wall_time_s:.0f} s"
        if st.detail:
            extra = f"  {st.detail}"
        if st.changed:
            extra = "  changed: " + ", ".join(st.changed)
        lines.append(f"{st.stage:<16} {st.label:<16} {st.path}{extra}")
        command = next_command(st, args)
        if command:
            lines.append(f"{'':<17}run: {command}")
    return "\n".join(lines)
