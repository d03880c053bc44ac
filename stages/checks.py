"""Every configured value a stage uses, checked once right after Hydra composes the config: a bad value is one
``error:`` line naming its key (``miner.k_patches=0: ...``) before the stage reads an image, builds a model or
touches its results (``FORCE=1`` with a typo never costs a finished run). The rules live in the library beside
what they guard (the settings dataclasses' ``rules()``/``check()``, ``Schedule``, ``DetectorSettings``,
``Miner.validate``/``check_backbone``); this module walks the sections a stage uses and turns parameter names
into config keys. Inputs on disk are opened by the stages, still before anything is replaced.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.run_settings import RunSettings

# the sections each stage checks ("": the top level, its run settings): every stage composes the whole tree
# (one ARGS serves a chain), and a stage judges only the values it reads; the pictures' settings always
STAGE_CHECKS = {
    "mine": ("", "backbone", "miner", "mine"),
    "cluster": ("", "backbone", "cluster"),
    "train_cag": ("", "detector", "schedule", "train_cag", "eval"),
    "train_cad": ("", "detector", "schedule", "train_cad", "eval"),
    "self_train": ("", "detector", "schedule", "train_cag", "self_train", "eval"),
    "evaluate_cag": ("", "eval"),
    "evaluate_cad": ("", "eval"),
}
HINTS = {"backbone.arch": " (backbone=<name>, conf/backbone/)"}  # where the choices of a key are


def _show(v: Any) -> str:
    return "null" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))


def keyed(section: str, values: dict, message: str) -> str:
    """One line of the library's ``message`` led by the config key it is about. A settings class says
    ``param=value: why`` (other parameters in `backquotes`, None for null); another library message names its
    parameter as a word (the first of ``values`` it mentions), else the line is led by the section."""
    dot = f"{section}." if section else ""
    own = re.match(r"(\w+)=.*?: (.*)", message)
    if own and own[1] in values:
        why = re.sub(r"`(\w+)`", lambda m: dot + m[1], re.sub(r"\bNone\b", "null", own[2]))
        return f"{dot}{own[1]}={_show(values[own[1]])}: {why}{HINTS.get(dot + own[1], '')}"
    message = re.sub(r"^\w+( \w+)?: ", "", message, count=1)  # "lost: ", "schedule smoke: " (the key says it)
    found = [(m.start(), str(name)) for name in values
             for m in [re.search(rf"\b{re.escape(str(name))}\b", message)] if m is not None]
    if found:
        name = min(found)[1]  # the parameter the message is about comes first
        return f"{dot}{name}={_show(values[name])}: {message}"
    return f"{section}: {message}"


def _values(cfg: DictConfig, section: str) -> dict:
    if not section:
        return {f.name: cfg[f.name] for f in dataclasses.fields(RunSettings)}
    return OmegaConf.to_container(cfg[section], resolve=True)


def _check(cfg: DictConfig, section: str, values: dict) -> None:
    """The library's check of one section (the miner's against the backbone it runs on)."""
    if section != "miner":
        (OmegaConf.get_type(cfg[section]) if section else RunSettings)(**values).check()
        return
    from pipeline.backbones.specs import ARCHS
    from pipeline.discovery import build_miner

    spec = ARCHS.get(str(cfg.backbone.arch))  # an unknown arch is the backbone's error
    if spec is not None:
        build_miner(str(values["name"]), spec.patch_size, **values).check_backbone(
            spec.num_heads, spec.embed_dim, str(cfg.backbone.feature))


def config_errors(cfg: DictConfig, stage: str) -> list[str]:
    """One message per value of the sections ``stage`` uses that is out of range (empty: all good)."""
    errors: list[str] = []
    for section in (*STAGE_CHECKS.get(stage, ()), "viz"):
        values = _values(cfg, section)
        try:
            _check(cfg, section, values)
        except (ValueError, TypeError) as e:
            errors += [keyed(section, values, line) for line in str(e).splitlines()]
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
                **{s: {**_DATASET_KEYS, **_DETECTOR_KEYS, "copy_paste": f"{s}.copy_paste",
                       "score_weighting": f"{s}.score_weighting"}
                   for s in ("train_cag", "train_cad", "self_train", "evaluate_cag", "evaluate_cad")}}


def in_config_keys(message: str, stage: str | None) -> str:
    """A library message as the user sets things: each ``param=`` it names becomes the config key that sets
    that parameter in ``stage`` (``root=`` -> ``dataset.root=``); the one place that maps them."""
    keys = LIBRARY_KEYS.get(stage or "", _DATASET_KEYS)
    pattern = r"(?<![\w.])(" + "|".join(map(re.escape, keys)) + r")="
    message = re.sub(pattern, lambda m: f"{keys[m.group(1)]}=", message)
    return re.sub(r"\b([Ff])orce the rerun", lambda m: f"{'R' if m.group(1) == 'F' else 'r'}erun with FORCE=1 "
                  "(force=true)", message)
