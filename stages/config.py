"""The config schema: dataclasses registered in Hydra's ConfigStore, one per config group entry and one for
the shared top level (``conf/pipeline.yaml``), so that every key is typed and a misspelled key is an error.

The YAML files under ``conf/`` hold the values; each starts from its schema here (``defaults:
[/schema/<group>@_here_]``). The schemas live in their own ``schema`` group, so they are never offered as a
choice (``dataset=...`` lists datasets, not schemas).
``stage_main`` is the entry point every stage uses instead of ``hydra.main``: before Hydra composes the
config it checks the command-line keys and answers a misspelled one with a single ``error:`` line that
names the nearest valid key (Hydra alone would say "Key 'k_patch' is not in struct").
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.clustering.settings import ClusteringSettings
from pipeline.detection.schedule import Schedule
from pipeline.detection.settings import DetectorSettings

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("paths", "dataset", "backbone", "miner", "detector", "schedule")


# ---------------------------------------------------------------------------------------------- groups
@dataclass
class PathsConf:
    data_root: str = MISSING
    weights_dir: str = MISSING
    output_root: str = MISSING


@dataclass
class DatasetConf:
    name: str = MISSING
    kind: str = MISSING
    root: str = ""
    image_set: Optional[str] = None
    ann_file: Optional[str] = None
    image_dir: Optional[str] = None
    list_file: Optional[str] = None
    max_images: Optional[int] = None
    max_side: Optional[int] = None      # mining: shrink images whose longer side exceeds this (null: never)


@dataclass
class BackboneConf:
    name: str = MISSING
    arch: str = MISSING
    init: str = "pretrained"
    weights: Optional[str] = None
    seed: int = 0
    feature: str = "k"
    precision: str = "fp32"          # fp32 (exact) | bf16 | fp16 (GPU autocast, opt-in)
    force_precision: bool = False    # run bf16 on a CPU without bf16 units anyway (slow)
    compile: bool = False            # torch.compile the blocks (agreement reported like bf16)


def miner_schemas() -> dict[str, type]:
    """Each miner's schema is generated from the library (its algorithm's keyword arguments and defaults:
    ``Miner.params_dataclass``), never written here a second time."""
    from pipeline.discovery import MINERS

    return {name: miner.params_dataclass() for name, miner in MINERS.items()}


MINER_SCHEMAS = miner_schemas()


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class MineConf:
    shard: int = 0
    num_shards: int = 1
    batch_size: Optional[int] = None     # images per backbone batch; null: 1 on a CPU, 16 on a GPU
    procs: Optional[int] = None          # CPU worker processes (one thread each); null: one per core
    merge: bool = True
    merge_only: bool = False


@dataclass
class ClusterConf(ClusteringSettings):
    """The library's clustering settings (k, seed, restarts, crops...: ``pipeline.clustering.settings``) and
    where the boxes come from."""
    source: str = "lost"                  # lost: the mine stage's pseudo-boxes | cag: the CAG detector's detections
    boxes: Optional[str] = None           # an explicit input file (COCO dataset for lost, results for cag)
    score_threshold: float = 0.5          # source=cag: keep detections with score >= this
    run_name: str = "k${cluster.k}"       # output subdir; change it to keep runs that differ in more than K


@dataclass
class TrainConf:
    """What both detector-training stages take (their inputs differ: see the two below)."""
    image_root: Optional[str] = None
    min_box_size: float = 1.0
    resume: bool = False
    stop_after: Optional[int] = None


@dataclass
class TrainCagConf(TrainConf):
    boxes: Optional[str] = None


@dataclass
class TrainCadConf(TrainConf):
    cluster_run: str = MISSING
    labels: Optional[str] = None


@dataclass
class EvalConf:
    enabled: bool = True
    batch_size: int = 2
    voc_difficult: str = "remove"


@dataclass
class EvaluateCagConf:
    model: str = MISSING
    name: str = MISSING


@dataclass
class EvaluateCadConf:
    model: str = MISSING
    detections: Optional[str] = None
    gt: Optional[str] = None
    num_clusters: Optional[int] = None
    voc_difficult: str = "ignore"
    gt_crowd_is_difficult: bool = False
    iou_thresholds: List[float] = field(default_factory=list)


@dataclass
class VizConf:
    num_images: int = 12
    contact_sheet: int = 12
    min_score: float = 0.3
    gallery_size: int = 16
    thumb: int = 96


@dataclass
class ReportConf:
    max_pictures: int = 12
    worst: int = 4


@dataclass
class PipelineConf:
    """The shared top level (conf/pipeline.yaml); every stage composes all of it, so one ARGS serves a chain."""
    paths: Any = MISSING
    dataset: Any = MISSING
    backbone: Any = MISSING
    miner: Any = MISSING
    detector: Any = MISSING
    schedule: Any = MISSING
    device: str = "auto"
    num_workers: int = 2
    progress: bool = True
    force: bool = False
    seed: int = 0
    mine: MineConf = field(default_factory=MineConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    train_cag: TrainCagConf = field(default_factory=TrainCagConf)
    train_cad: TrainCadConf = field(default_factory=TrainCadConf)
    evaluate_cag: EvaluateCagConf = field(default_factory=EvaluateCagConf)
    evaluate_cad: EvaluateCadConf = field(default_factory=EvaluateCadConf)
    eval: EvalConf = field(default_factory=EvalConf)
    viz: VizConf = field(default_factory=VizConf)
    report: ReportConf = field(default_factory=ReportConf)
    base_dir: str = MISSING
    dirs: Any = MISSING
    inputs: Any = MISSING
    stage_dir: Optional[str] = None


def chain_dir(stage: str, miner: str, feature: str = "k") -> str:
    """The directory name of a stage of a chain (``mine``, ``cag``, ``cluster``, ``cad``): the stage's name
    for LOST on keys (the paper's setting), else ``<stage>_<miner>`` and ``_<feature>`` for a feature other
    than keys (``mine_tokencut``, ``cag_tokencut``, ``cluster_tokencut``, ``cad_lost_q`` is ``cad_q``). So
    settings that change the boxes never share (and overwrite) a folder, and every stage downstream of a
    mine folder has its own: a TokenCut and a LOST chain of one dataset write separate detectors and
    clusters. The only place that decides it (``${dirs.*}`` in conf/pipeline.yaml)."""
    name = stage if miner == "lost" else f"{stage}_{miner}"
    return name if feature == "k" else f"{name}_{feature}"


def mine_dir(miner: str, feature: str = "k") -> str:
    """The mine stage's directory name (:func:`chain_dir` of ``mine``): ``mine`` for LOST on keys, else
    ``mine_<miner>[_<feature>]``."""
    return chain_dir("mine", miner, feature)


def eval_dir_of(detections: str | None, default: str) -> str:
    """Where evaluate-cad writes: ``eval_<name>/`` beside a given detections file (its own folder, never
    under a dataset's outputs), else ``default``."""
    if not detections:
        return default
    p = Path(str(detections))
    return str(p.parent / f"eval_{p.stem}")


_GROUP_SCHEMAS = {"paths": PathsConf, "dataset": DatasetConf, "backbone": BackboneConf, "detector": DetectorSettings,
                  "schedule": Schedule}


def register() -> None:
    """Put the schemas into Hydra's ConfigStore and the ``chain_dir``/``mine_dir`` resolvers into OmegaConf
    (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConf)
    for group, node in _GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=node)
    for name, node in MINER_SCHEMAS.items():
        cs.store(group="schema", name=f"miner_{name}", node=node)
    for name, fn in (("chain_dir", chain_dir), ("mine_dir", mine_dir), ("eval_dir_of", eval_dir_of)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()


# ---------------------------------------------------------------------------------------------- CLI keys
def _plain_overrides(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(group choices for composing, dotted ``key=value`` overrides to check) of a command line; sweeps
    keep their first value, Hydra's own flags and keys are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cand = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(cand)
    except Exception:  # noqa: BLE001 - malformed: Hydra will say so itself
        return [], []
    groups, keys = [], []
    for ov, raw in zip(parsed, cand):
        key = ov.key_or_group
        if key.startswith("hydra") or ov.is_delete() or ov.is_add() or ov.package:
            if ov.is_add() and "experiment" in key:
                groups.append(raw.split(",")[0])
            continue
        value = raw.split("=", 1)[1]
        if key in GROUPS or "/" in key:
            groups.append(f"{key}={value.split(',')[0]}")
        else:
            keys.append((key, raw))
    return groups, keys


def nearest_key(cfg: DictConfig, dotted: str) -> str | None:
    """The valid key closest to a misspelled ``dotted`` key (same parent), or None."""
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    keys = [str(k) for k in node.keys()]
    match = difflib.get_close_matches(leaf, keys, n=1, cutoff=0.5)
    return f"{parent + '.' if parent else ''}{match[0]}" if match else None


def schema_has(key: str, groups: list[str]) -> bool:
    """True when the schemas alone show that every composition has the dotted ``key`` (a field of
    :class:`PipelineConf`, of its sections or of a group's schema, the chosen miner's included). False
    means "not sure" (``dirs.*``, another miner's key...): :func:`unknown_keys` then composes to know."""
    head, _, rest = key.partition(".")
    if head == "miner":
        if any("experiment" in g for g in groups):  # an experiment may choose the miner
            return False
        obj = MINER_SCHEMAS.get(next((g.split("=", 1)[1] for g in groups if g.startswith("miner=")), "lost"))
    elif head in _GROUP_SCHEMAS:
        obj = _GROUP_SCHEMAS[head]
    else:
        obj, rest = PipelineConf, key
    if obj is None or not rest:
        return False
    obj = obj()
    for part in rest.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def unknown_keys(config_name: str, args: list[str]) -> list[str]:
    """One message per command-line key that the composed config does not have. Composing costs about a
    third of a second (Hydra composes twice more itself), so keys the schemas vouch for skip it."""
    from hydra import compose, initialize_config_dir

    groups, keys = _plain_overrides(args)
    if all(schema_has(key, groups) for key, _ in keys):
        return []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:  # noqa: BLE001 - a bad group choice: Hydra's own message lists the options
        return []
    out = []
    for key, raw in keys:
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if parent and not isinstance(node, DictConfig):
            out.append(f"unknown config key {key!r} in {raw!r}: {parent!r} is not a section")
            continue
        if isinstance(node, DictConfig) and key.rpartition(".")[2] in node:
            continue
        near = nearest_key(cfg, key)
        hint = f"did you mean {near!r}?" if near else f"valid keys of {parent or 'the top level'}: " + \
            ", ".join(str(k) for k in (node.keys() if isinstance(node, DictConfig) else []))
        out.append(f"unknown config key {key!r} in {raw!r}; {hint} (`+{raw}` adds a new key on purpose)")
    return out


def _printing(args: list[str]) -> bool:
    """Only printing the config (``--cfg``/``--info``): nothing runs or is submitted."""
    return any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in args)


def launcher_errors(args: list[str]) -> list[str]:
    """``hydra/launcher=slurm*`` submits with SLURM's ``sbatch``: without it (and not just printing the config
    with ``--cfg``/``--info``) say so in one line instead of submitit's traceback."""
    import shutil

    launcher = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")), None)
    if launcher and launcher.startswith("slurm") and not _printing(args) and shutil.which("sbatch") is None:
        return [f"hydra/launcher={launcher} submits jobs with SLURM, but this machine has no `sbatch`: run the "
                "command on a SLURM login node, or use hydra/launcher=local (local processes) or no launcher"]
    return []


def choice_errors(args: list[str]) -> list[str]:
    """A group choice with no file behind it (``dataset=voc99``, a schema name) as one line listing the choices,
    instead of Hydra's search-path dump."""
    out = []
    for choice in _plain_overrides(args)[0]:
        group, _, value = choice.lstrip("+").partition("=")
        folder = CONF_DIR / group
        if folder.is_dir() and not (folder / f"{value}.yaml").is_file():
            options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            out.append(f"{group}={value}: no such {group}; choose one of {options} (the files in conf/{group}/)")
    return out


def multirun_errors(args: list[str]) -> list[str]:
    """A launcher (``hydra/launcher=slurm``, ``local``...) acts only on a multirun: without ``-m`` Hydra runs the
    job here, silently. Refuse that instead."""
    launcher = next((a.split("=", 1)[1] for a in args if a.startswith(("hydra/launcher=", "+hydra/launcher="))), None)
    if launcher and not any(a in ("-m", "--multirun") for a in args) and not _printing(args):
        return [f"hydra/launcher={launcher} takes effect only with -m (--multirun): without it the job would run "
                "here, on this machine. Add -m (make ... ARGS=\"-m hydra/launcher=...\")"]
    return []


def stage_main(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """``@stage_main("mine")`` = ``@hydra.main(config_path="../conf", config_name="mine")`` plus the check of
    command-line keys (a misspelled key is one ``error:`` line naming the nearest valid key, exit 2) and, once
    Hydra has composed the config, of every value the stage uses (:func:`stages.checks.config_errors`)."""
    import functools

    import hydra

    def wrap(fn: Callable[[DictConfig], Any]) -> Callable[[], None]:
        @functools.wraps(fn)
        def checked(cfg: DictConfig) -> Any:
            from stages.checks import config_errors

            errors = config_errors(cfg, config_name)
            if errors:
                for e in errors:
                    print(f"error: {e}", file=sys.stderr, flush=True)
                raise SystemExit(2)
            return fn(cfg)

        hydra_fn = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(checked)

        def main() -> None:
            args = sys.argv[1:]
            errors = choice_errors(args) or unknown_keys(config_name, args)
            errors += multirun_errors(args) + launcher_errors(args)
            if errors:
                for e in errors:
                    print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2)
            hydra_fn()

        main.__doc__ = fn.__doc__
        return main

    return wrap
