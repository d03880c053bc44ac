"""A default exists in one place: the library's dataclasses (``Schedule``, ``DetectorSettings``) are the Hydra
schemas of the ``schedule`` and ``detector`` groups, and the YAML files hold only what differs from them
(tests/test_config_defaults.py does the same for clustering and the miners)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import stages.config
from pipeline.detection.schedule import Schedule
from pipeline.detection.settings import DetectorSettings
from stage_utils import compose_cfg
from stages.common import to_container

CONF = Path(__file__).resolve().parents[1] / "conf"
STAGES = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "pipeline")
GROUPS = {"schedule": Schedule, "detector": DetectorSettings}


@pytest.fixture
def new_default(monkeypatch):
    """Change one field's default of a library dataclass and store the schemas again (``register()``), as if the
    code said so; afterwards the real default is back in the ConfigStore."""
    def change(cls, name, value):
        monkeypatch.setattr(cls.__dataclass_fields__[name], "default", value)
        stages.config.register()

    yield change
    monkeypatch.undo()
    stages.config.register()


def test_a_changed_library_default_reaches_every_stage(new_default):
    assert {"mine", "cluster", "train_cag", "train_cad", "evaluate_cag", "evaluate_cad"} <= set(STAGES)
    before = compose_cfg("train_cag", [])
    assert (before.schedule.gamma, before.detector.detections_per_img) == (0.1, 100)
    new_default(Schedule, "gamma", 0.25)
    new_default(DetectorSettings, "detections_per_img", 7)
    for stage in STAGES:
        cfg = compose_cfg(stage, [])
        assert (cfg.schedule.gamma, cfg.detector.detections_per_img) == (0.25, 7), stage
    for choice in ("detector=mobilenet_fpn", "detector=r50_fpn", "schedule=smoke", "schedule=voc07_reference"):
        cfg = compose_cfg("train_cad", [choice])
        assert (cfg.schedule.gamma, cfg.detector.detections_per_img) == (0.25, 7), choice
        # what the training stage builds from the composed config carries it too
        assert Schedule.from_dict(to_container(cfg.schedule)).gamma == 0.25
        assert DetectorSettings.from_dict(to_container(cfg.detector)).detections_per_img == 7


def test_the_fixture_restores_the_real_default():
    cfg = compose_cfg("train_cag", [])
    assert (cfg.schedule.gamma, cfg.detector.detections_per_img) == (0.1, 100)


def _yaml_values(path: Path) -> dict[str, dict]:
    """The values each group gets from one YAML file (``@package _global_`` files set several groups)."""
    raw = yaml.safe_load(path.read_text()) or {}
    raw.pop("defaults", None)
    if path.read_text().startswith("# @package _global_"):
        return {g: raw.get(g) or {} for g in GROUPS}
    return {path.parent.name: raw}


@pytest.mark.parametrize("path", sorted((CONF / "schedule").glob("*.yaml")) + sorted((CONF / "detector").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_group_files_hold_only_what_differs_from_the_dataclass(path):
    for group, values in _yaml_values(path).items():
        defaults = {f: getattr(GROUPS[group](), f) for f in GROUPS[group].__dataclass_fields__}
        for key, value in values.items():
            assert key in defaults, f"{path.name}: {group}.{key} is not a field of {GROUPS[group].__name__}"
            default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
            assert value != default, f"{path.name}: {group}.{key}={value} repeats the default"


def test_the_schemas_are_the_library_dataclasses():
    assert stages.config._GROUP_SCHEMAS["schedule"] is Schedule
    assert stages.config._GROUP_SCHEMAS["detector"] is DetectorSettings
    assert not hasattr(stages.config, "ScheduleConf") and not hasattr(stages.config, "DetectorConf")
