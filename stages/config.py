"""The config tree's types, registered in Hydra's ConfigStore (group ``schema``, so never offered as a choice):
the library's settings dataclasses, where every default lives, and the few sections only a stage has. Every
YAML file starts from its schema (``defaults: [/schema/<group>@_here_]``), so a misspelled key is an error.
``stage_main`` is the entry point every stage uses instead of ``hydra.main``: it first answers a misspelled
command-line key with one ``error:`` line naming the nearest valid key (Hydra: "Key 'k_patch' is not in struct").
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

from pipeline.backbones.settings import BackboneSettings
from pipeline.clustering.settings import ClusteringSettings
from pipeline.data.settings import DatasetSettings
from pipeline.detection.recipe import TrainRecipe
from pipeline.detection.schedule import Schedule
from pipeline.detection.self_training import SelfTrainSettings
from pipeline.detection.settings import DetectorSettings
from pipeline.discovery import MINERS
from pipeline.evaluation.hungarian import IOU_THRESHOLDS
from pipeline.evaluation.settings import EvalSettings
from pipeline.mining_settings import MineSettings
from pipeline.report.settings import ReportSettings
from pipeline.run_settings import RunSettings
from pipeline.viz.settings import VizSettings

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("paths", "dataset", "backbone", "miner", "detector", "schedule")
# each miner's schema: its algorithm's keyword arguments and their defaults (``Miner.params_dataclass``)
MINER_SCHEMAS = {name: miner.params_dataclass() for name, miner in MINERS.items()}


@dataclass
class PathsConf:
    """Where data, weights and outputs live (``conf/paths/default.yaml``: environment variables, else ./)."""
    data_root: str = MISSING
    weights_dir: str = MISSING
    output_root: str = MISSING


# ---------------------------------------------------------------------------------------------- stage sections
@dataclass
class ClusterConf(ClusteringSettings):
    """The library's clustering settings (k, seed, restarts, crops...: ``pipeline.clustering.settings``) and
    where the boxes come from."""
    source: str = "lost"                  # lost: the mine stage's pseudo-boxes | cag: the CAG detector's detections
    boxes: Optional[str] = None           # an explicit input file (COCO dataset for lost, results for cag)
    score_threshold: float = 0.5          # source=cag: keep detections with score >= this
    run_name: str = "k${cluster.k}"       # output subdir; change it to keep runs that differ in more than K

    def rules(self) -> list[tuple[str, bool, str]]:
        return [("source", self.source in ("lost", "cag"), "choose lost (the mine stage's boxes) or cag (the "
                 "class-agnostic detector's detections)"), *super().rules(),
                ("score_threshold", 0 <= self.score_threshold <= 1, "must be in [0, 1]")]


@dataclass
class TrainConf(TrainRecipe):
    """What both detector-training stages take (their inputs differ: see the two below), with the library's
    training recipe (``pipeline.detection.recipe.TrainRecipe``: DropLoss, copy-paste)."""
    image_root: Optional[str] = None      # where the boxes' file_names live; null: its info.image_root, else its dir
    min_box_size: float = 1.0             # boxes narrower/shorter than this (px) are dropped and counted
    resume: bool = False                  # true: continue from model.pt exactly where it stopped (same config)
    stop_after: Optional[int] = None      # stop (checkpointed) after this many iterations, as if killed (tests)


@dataclass
class TrainCagConf(TrainConf):
    boxes: Optional[str] = None           # a COCO json to train on instead of ${inputs.pseudo_boxes}


@dataclass
class TrainCadConf(TrainConf):
    cluster_run: str = MISSING            # which cluster run: <source>/<run_name> under the chain's cluster dir
    labels: Optional[str] = None          # a COCO json (category = cluster) instead of ${inputs.pseudo_labels}


@dataclass
class EvaluateCagConf:
    model: str = MISSING                  # a train-cag (or train-cad: scored class-agnostic) checkpoint
    name: str = MISSING                   # output subdir of the cag dir


@dataclass
class EvaluateCadConf:
    model: str = MISSING                  # the train-cad detector (used when detections=null)
    detections: Optional[str] = None      # a COCO results json; null: run the model on the evaluated images first
    gt: Optional[str] = None              # a COCO instances json (images not needed); null: the dataset's GT
    # K: clusters 1..K (or 0..K-1: detected from the ids) even without detections; null: the labels present
    num_clusters: Optional[int] = None
    voc_difficult: str = "ignore"         # difficult GT objects: ignore (VOC devkit: neither hit nor miss) | remove
    gt_crowd_is_difficult: bool = False   # gt: treat iscrowd=1 boxes as difficult (VOC converted to COCO marks them so)
    iou_thresholds: List[float] = field(default_factory=lambda: list(IOU_THRESHOLDS))


@dataclass
class _Groups:
    paths: Any = MISSING
    dataset: Any = MISSING
    backbone: Any = MISSING
    miner: Any = MISSING
    detector: Any = MISSING
    schedule: Any = MISSING


@dataclass
class PipelineConf(RunSettings, _Groups):
    """The shared top level (conf/pipeline.yaml); every stage composes all of it, so one ARGS serves a chain.
    Its fields: the groups, the run settings (``device``...), then the sections (dataclass fields are
    collected from the last base first)."""
    mine: MineSettings = field(default_factory=MineSettings)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    train_cag: TrainCagConf = field(default_factory=TrainCagConf)
    train_cad: TrainCadConf = field(default_factory=TrainCadConf)
    self_train: SelfTrainSettings = field(default_factory=SelfTrainSettings)
    evaluate_cag: EvaluateCagConf = field(default_factory=EvaluateCagConf)
    evaluate_cad: EvaluateCadConf = field(default_factory=EvaluateCadConf)
    eval: EvalSettings = field(default_factory=EvalSettings)
    viz: VizSettings = field(default_factory=VizSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    base_dir: str = MISSING
    dirs: Any = MISSING
    inputs: Any = MISSING
    stage_dir: Optional[str] = None       # set by each stage's config: the directory it writes


def chain_dir(stage: str, miner: str, feature: str = "k") -> str:
    """The folder of a stage of a chain (``mine``, ``cag``, ``cluster``, ``cad``): the stage's name for LOST on
    keys (the paper's setting), else ``<stage>_<miner>``, plus ``_<feature>`` for a feature other than keys
    (``mine_tokencut``; LOST on q: ``cad_q``), so two chains of a dataset never share (overwrite) a folder.
    The only place that decides it (``${dirs.*}`` in conf/pipeline.yaml)."""
    name = stage if miner == "lost" else f"{stage}_{miner}"
    return name if feature == "k" else f"{name}_{feature}"


def eval_dir_of(detections: str | None, default: str) -> str:
    """Where evaluate-cad writes: ``eval_<name>/`` beside a given detections file (its own folder, never
    under a dataset's outputs), else ``default``."""
    if not detections:
        return default
    p = Path(str(detections))
    return str(p.parent / f"eval_{p.stem}")


_GROUP_SCHEMAS = {"paths": PathsConf, "dataset": DatasetSettings, "backbone": BackboneSettings,
                  "detector": DetectorSettings, "schedule": Schedule}


def register() -> None:
    """Put the schemas into Hydra's ConfigStore and the ``chain_dir``/``eval_dir_of`` resolvers into OmegaConf
    (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConf)
    for name, node in [*_GROUP_SCHEMAS.items(), *((f"miner_{m}", n) for m, n in MINER_SCHEMAS.items())]:
        cs.store(group="schema", name=name, node=node)
    for name, fn in (("chain_dir", chain_dir), ("eval_dir_of", eval_dir_of)):
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
            groups += [raw.split(",")[0]] if ov.is_add() and "experiment" in key else []
        elif key in GROUPS or "/" in key:
            groups.append(f"{key}={raw.split('=', 1)[1].split(',')[0]}")
        else:
            keys.append((key, raw))
    return groups, keys


def schema_has(key: str, groups: list[str]) -> bool:
    """True when the schemas alone show that every composition has the dotted ``key`` (a field of
    :class:`PipelineConf`, of its sections or of a group's schema, the chosen miner's included). False
    means "not sure" (``dirs.*``, another miner's key...): :func:`unknown_keys` then composes to know."""
    head, _, rest = key.partition(".")
    if head == "miner":
        if any("experiment" in g for g in groups):  # an experiment may choose the miner
            return False
        schema = MINER_SCHEMAS.get(next((g.split("=", 1)[1] for g in groups if g.startswith("miner=")), "lost"))
    else:
        schema, rest = (_GROUP_SCHEMAS[head], rest) if head in _GROUP_SCHEMAS else (PipelineConf, key)
    for part in rest.split("."):  # a section's schema is its field's default_factory
        found = [f for f in dataclasses.fields(schema) if f.name == part] if dataclasses.is_dataclass(schema) else []
        if not found:
            return False
        schema = found[0].default_factory
    return True


def unknown_keys(config_name: str, args: list[str]) -> list[str]:
    """One message per command-line key that the composed config does not have, naming the nearest valid key
    (same parent). Composing costs about a third of a second (Hydra composes twice more itself), so keys the
    schemas vouch for skip it."""
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
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig):
            out.append(f"unknown config key {key!r} in {raw!r}: {parent!r} is not a section")
        elif leaf not in node:
            near = difflib.get_close_matches(leaf, [str(k) for k in node], n=1, cutoff=0.5)
            hint = f"did you mean {(parent + '.' if parent else '') + near[0]!r}?" if near else \
                f"valid keys of {parent or 'the top level'}: {', '.join(str(k) for k in node)}"
            out.append(f"unknown config key {key!r} in {raw!r}; {hint} (`+{raw}` adds a new key on purpose)")
    return out


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


def launcher_errors(args: list[str]) -> list[str]:
    """A launcher (``hydra/launcher=slurm``, ``local``...) acts only on a multirun: without ``-m`` Hydra would run
    the job here, silently; ``slurm*`` submits with SLURM's ``sbatch``: without it, one line instead of
    submitit's traceback. Only printing the config (``--cfg``/``--info``) runs and submits nothing."""
    import shutil

    if any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in args):
        return []
    value = lambda *p: next((a.split("=", 1)[1] for a in args if a.startswith(p)), None)  # noqa: E731
    launcher, slurm, out = value("hydra/launcher=", "+hydra/launcher="), value("hydra/launcher="), []
    if launcher and not any(a in ("-m", "--multirun") for a in args):
        out.append(f"hydra/launcher={launcher} takes effect only with -m (--multirun): without it the job would "
                   "run here, on this machine. Add -m (make ... ARGS=\"-m hydra/launcher=...\")")
    if slurm and slurm.startswith("slurm") and shutil.which("sbatch") is None:
        out.append(f"hydra/launcher={slurm} submits jobs with SLURM, but this machine has no `sbatch`: run the "
                   "command on a SLURM login node, or use hydra/launcher=local (local processes) or no launcher")
    return out


def _refuse(errors: list[str]) -> None:
    """Each error as one ``error:`` line on stderr, then exit 2 (nothing ran)."""
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)


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

            _refuse(config_errors(cfg, config_name))
            return fn(cfg)

        hydra_fn = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(checked)

        def main() -> None:
            args = sys.argv[1:]
            _refuse((choice_errors(args) or unknown_keys(config_name, args)) + launcher_errors(args))
            hydra_fn()

        main.__doc__ = fn.__doc__
        return main

    return wrap
