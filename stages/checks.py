"""Every configured value a stage uses, checked once right after Hydra composes the config.

A bad value is one ``error:`` line naming its key (``miner.k_patches=0: must be a positive integer``) before
the stage reads an image, builds a model or touches its results: ``FORCE=1`` with a typo never costs a
finished run. The rules themselves live in the library, beside what they guard (``Miner.validate`` and
``Miner.check_backbone``, ``Schedule.check``, ``builders.check_settings``, ``shard_indices``); this module only
turns their parameter names into config keys. Inputs on disk (weights, boxes, images) are opened by the
stages themselves, still before anything is replaced (``pipeline.artifacts.begin_replacement``).
"""
from __future__ import annotations

import re
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

# which sections each stage uses (every stage composes the whole tree: one ARGS serves a chain, and a stage
# judges only the values it reads)
STAGE_CHECKS = {
    "mine": ("device", "backbone", "miner", "mine"),
    "cluster": ("device", "backbone", "cluster"),
    "train_cag": ("device", "detector", "schedule", "eval"),
    "train_cad": ("device", "detector", "schedule", "eval"),
    "evaluate_cag": ("device", "eval"),
    "evaluate_cad": ("device", "eval"),
}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def keyed(section: str, values: dict, message: str) -> str:
    """The library's ``message`` led by the config key it is about: of ``values``' names, the one the message
    mentions first as a word (the library names its parameters), else the section."""
    message = re.sub(r"^\w+( \w+)?: ", "", message, count=1)  # "lost: ", "schedule smoke: " (the key says it)
    found = [(m.start(), str(name)) for name in values
             for m in [re.search(rf"\b{re.escape(str(name))}\b", message)] if m is not None]
    if found:
        name = min(found)[1]  # the parameter the message is about comes first
        return f"{section}.{name}={_show(values[name])}: {message}"
    return f"{section}: {message}"


def _show(v: Any) -> str:
    return "null" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))


def _try(errors: list[str], section: str, values: dict, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (ValueError, TypeError) as e:
        errors.append(keyed(section, values, str(e)))


def _device(cfg: DictConfig, errors: list[str]) -> None:
    name = str(cfg.device)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        errors.append(f"device={name}: not a device; use device=auto, cpu, cuda or cuda:N")


def _backbone(cfg: DictConfig, errors: list[str]) -> None:
    from pipeline.backbones.backbone import FEATURES
    from pipeline.backbones.specs import ARCHS

    b = cfg.backbone
    if str(b.arch) not in ARCHS:
        errors.append(f"backbone.arch={b.arch}: unknown; choose one of {', '.join(sorted(ARCHS))} "
                      "(backbone=<name>, conf/backbone/)")
    if str(b.feature) not in FEATURES:
        errors.append(f"backbone.feature={b.feature}: unknown; choose one of {', '.join(FEATURES)}")
    if str(b.init) not in ("pretrained", "random", "auto"):
        errors.append(f"backbone.init={b.init}: choose pretrained, random or auto")
    if str(b.precision) not in ("fp32", "bf16", "fp16"):
        errors.append(f"backbone.precision={b.precision}: choose fp32, bf16 or fp16")


def _miner(cfg: DictConfig, errors: list[str]) -> None:
    from pipeline.backbones.specs import ARCHS
    from pipeline.discovery import build_miner

    params = _plain(cfg.miner)
    spec = ARCHS.get(str(cfg.backbone.arch))
    if spec is None:
        return  # said by _backbone

    def build() -> None:
        build_miner(str(params.get("name")), spec.patch_size, **params).check_backbone(spec.num_heads)

    _try(errors, "miner", params, build)


def _mine(cfg: DictConfig, errors: list[str]) -> None:
    from pipeline.mining import shard_indices

    m = cfg.mine
    if not int(m.num_shards) >= 1:
        errors.append(f"mine.num_shards={m.num_shards}: must be >= 1")
    elif not 0 <= int(m.shard) < int(m.num_shards):
        errors.append(f"mine.shard={m.shard}: must be in [0, mine.num_shards) = [0, {int(m.num_shards) - 1}]")
    else:
        _try(errors, "mine", _plain(m), lambda: shard_indices(0, int(m.shard), int(m.num_shards)))
    for key in ("batch_size", "procs"):
        if m[key] is not None and int(m[key]) < 1:
            errors.append(f"mine.{key}={m[key]}: must be >= 1 (or null for the default)")


def _cluster(cfg: DictConfig, errors: list[str]) -> None:
    c = cfg.cluster
    if str(c.source) not in ("lost", "cag"):
        errors.append(f"cluster.source={c.source}: choose lost (the mine stage's boxes) or cag (the class-agnostic "
                      "detector's detections)")
    for key in ("k", "n_init", "iters", "batch_size", "short_side"):
        if int(c[key]) < 1:
            errors.append(f"cluster.{key}={c[key]}: must be >= 1")
    if c.max_size is not None and int(c.max_size) < int(c.short_side):
        errors.append(f"cluster.max_size={c.max_size}: must be >= cluster.short_side ({c.short_side}) or null")
    if not 0 <= float(c.score_threshold) <= 1:
        errors.append(f"cluster.score_threshold={c.score_threshold}: must be in [0, 1]")


def _detector(cfg: DictConfig, errors: list[str]) -> None:
    from pipeline.detection.builders import check_settings

    d = _plain(cfg.detector)
    settings = {k: v for k, v in d.items() if k not in ("name", "preset", "weights")}
    settings["norm"] = settings.get("norm") or "bn"
    _try(errors, "detector", d, lambda: check_settings(str(d["preset"]), **settings))


def _schedule(cfg: DictConfig, errors: list[str]) -> None:
    from pipeline.detection.trainer import Schedule

    s = _plain(cfg.schedule)
    _try(errors, "schedule", s, lambda: Schedule.from_dict(s))


def _eval(cfg: DictConfig, errors: list[str]) -> None:
    if int(cfg.eval.batch_size) < 1:
        errors.append(f"eval.batch_size={cfg.eval.batch_size}: must be >= 1")
    if str(cfg.eval.voc_difficult) not in ("remove", "ignore"):
        errors.append(f"eval.voc_difficult={cfg.eval.voc_difficult}: choose remove or ignore")


_CHECKS = {"device": _device, "backbone": _backbone, "miner": _miner, "mine": _mine, "cluster": _cluster,
           "detector": _detector, "schedule": _schedule, "eval": _eval}


def config_errors(cfg: DictConfig, stage: str) -> list[str]:
    """One message per value of the sections ``stage`` uses that is out of range (empty: all good)."""
    errors: list[str] = []
    for section in STAGE_CHECKS.get(stage, ()):
        _CHECKS[section](cfg, errors)
    for key in ("num_images", "contact_sheet", "gallery_size", "thumb"):
        if int(cfg.viz[key]) < 0:
            errors.append(f"viz.{key}={cfg.viz[key]}: must be >= 0")
    return errors


# ------------------------------------------------------------------------------------ library errors
# The library names its parameters (``root=``, ``weights=``, ``init=``); which config key sets a parameter
# depends on the stage (a mining stage's weights are the backbone's, a training stage's the detector's).
_DATASET_KEYS = {"root": "dataset.root", "ann_file": "dataset.ann_file", "image_dir": "dataset.image_dir",
                 "image_set": "dataset.image_set", "list_file": "dataset.list_file", "max_side": "dataset.max_side"}
_BACKBONE_KEYS = {"weights": "backbone.weights", "weights_dir": "paths.weights_dir", "init": "backbone.init",
                  "precision": "backbone.precision", "compile": "backbone.compile", "arch": "backbone"}
_DETECTOR_KEYS = {"weights": "detector.weights", "init": "detector.init", "preset": "detector"}
LIBRARY_KEYS = {"mine": {**_DATASET_KEYS, **_BACKBONE_KEYS}, "cluster": {**_DATASET_KEYS, **_BACKBONE_KEYS},
                **{s: {**_DATASET_KEYS, **_DETECTOR_KEYS} for s in ("train_cag", "train_cad", "evaluate_cag",
                                                                   "evaluate_cad")}}


def in_config_keys(message: str, stage: str | None) -> str:
    """A library message as the user sets things: each ``param=`` it names becomes the config key that sets
    that parameter in ``stage`` (``root=`` -> ``dataset.root=``); the one place that maps them."""
    keys = LIBRARY_KEYS.get(stage or "", _DATASET_KEYS)
    pattern = r"(?<![\w.])(" + "|".join(map(re.escape, keys)) + r")="
    message = re.sub(pattern, lambda m: f"{keys[m.group(1)]}=", message)
    return re.sub(r"\b([Ff])orce the rerun", lambda m: f"{'R' if m.group(1) == 'F' else 'r'}erun with FORCE=1 "
                  "(force=true)", message)
