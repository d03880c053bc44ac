"""A default lives in one place: the library's own declaration (issue 16). Change it there and every stage's
composed config has the new value (no YAML file or mirrored schema class restates it)."""
from __future__ import annotations

import dataclasses
import importlib

import pytest

from stage_utils import compose_cfg

STAGES = ("mine", "cluster", "train_cag", "train_cad", "evaluate_cag", "evaluate_cad", "status", "report")


@pytest.fixture
def reload_config(monkeypatch):
    """Reload stages.config (its schemas are built from the library at import) after the test changed the
    library, and again with the library restored."""
    import stages.config as config

    yield lambda: importlib.reload(config)
    monkeypatch.undo()
    importlib.reload(config)


def test_a_clustering_default_changed_in_the_library_reaches_every_stage(monkeypatch, reload_config):
    import pipeline.clustering.settings as settings

    changed = dataclasses.make_dataclass("ClusteringSettings", [("k", int, dataclasses.field(default=7)),
                                                                ("short_side", int, dataclasses.field(default=99))],
                                         bases=(settings.ClusteringSettings,))
    monkeypatch.setattr(settings, "ClusteringSettings", changed)
    reload_config()
    for stage in STAGES:
        cfg = compose_cfg(stage, [])
        assert (cfg.cluster.k, cfg.cluster.short_side, cfg.cluster.run_name) == (7, 99, "k7"), stage
    assert compose_cfg("cluster", ["cluster.k=3"]).cluster.k == 3  # the command line still wins


def test_a_miner_default_is_its_algorithms_keyword_argument(monkeypatch, reload_config):
    from pipeline.discovery.miners import MINERS

    def lost(feats, dims, patch_size, image_size, k_patches: int = 55):  # the same algorithm, another default
        raise AssertionError("not run")

    monkeypatch.setattr(MINERS["lost"], "fn", staticmethod(lost))
    reload_config()
    for stage in STAGES:
        assert compose_cfg(stage, []).miner.k_patches == 55, stage
    assert dict(compose_cfg("mine", ["miner=maskcut"]).miner) == {
        "name": "maskcut", "num_objects": 3, "tau": 0.15, "eps": 1e-5, "solver": "scipy", "image_size": None,
        "crf": False}


def test_the_shipped_defaults():
    """What the defaults are today (the values the reference code uses)."""
    cfg = compose_cfg("cluster", [])
    assert dict(cfg.cluster) == {"k": 20, "seed": 0, "n_init": 10, "iters": 20, "whiten": True, "l2_normalize": True,
                                 "batch_size": 32, "short_side": 256, "max_size": 1024, "source": "lost",
                                 "boxes": None, "score_threshold": 0.5, "run_name": "k20"}
    assert dict(compose_cfg("mine", ["miner=tokencut"]).miner) == {"name": "tokencut", "tau": 0.2, "eps": 1e-5,
                                                                   "max_boxes": 1, "solver": "scipy", "crf": False}


# every library settings dataclass the config is typed with: (module, class, a field, another default, its key)
LIBRARY_DEFAULTS = [
    ("pipeline.run_settings", "RunSettings", "num_workers", 5, "num_workers"),
    ("pipeline.mining_settings", "MineSettings", "num_shards", 3, "mine.num_shards"),
    ("pipeline.evaluation.settings", "EvalSettings", "batch_size", 7, "eval.batch_size"),
    ("pipeline.viz.settings", "VizSettings", "thumb", 33, "viz.thumb"),
    ("pipeline.report.settings", "ReportSettings", "worst", 9, "report.worst"),
    ("pipeline.data.settings", "DatasetSettings", "max_side", 640, "dataset.max_side"),
    ("pipeline.backbones.settings", "BackboneSettings", "precision", "bf16", "backbone.precision"),
]


@pytest.mark.parametrize("module, name, field, value, key", LIBRARY_DEFAULTS, ids=[d[1] for d in LIBRARY_DEFAULTS])
def test_a_settings_default_changed_in_the_library_reaches_every_stage(monkeypatch, reload_config, module, name,
                                                                       field, value, key):
    import typing

    from omegaconf import OmegaConf

    mod = importlib.import_module(module)
    cls = getattr(mod, name)
    assert OmegaConf.select(compose_cfg("mine", []), key) != value
    changed = dataclasses.make_dataclass(name, [(field, typing.get_type_hints(cls)[field],
                                                 dataclasses.field(default=value))], bases=(cls,))
    monkeypatch.setattr(mod, name, changed)
    reload_config()
    for stage in STAGES:
        assert OmegaConf.select(compose_cfg(stage, []), key) == value, stage
    for choices in (["dataset=voc07"], ["dataset=coco20k", "backbone=dino_resnet50"], ["+experiment=tokencut_voc12"]):
        assert OmegaConf.select(compose_cfg("mine", choices), key) == value, choices


def test_the_iou_thresholds_are_the_librarys(monkeypatch, reload_config):
    import pipeline.evaluation.hungarian as hungarian

    assert list(compose_cfg("evaluate_cad", []).evaluate_cad.iou_thresholds) == list(hungarian.IOU_THRESHOLDS)
    monkeypatch.setattr(hungarian, "IOU_THRESHOLDS", (0.5, 0.75))
    reload_config()
    for stage in STAGES:
        assert list(compose_cfg(stage, []).evaluate_cad.iou_thresholds) == [0.5, 0.75], stage


def test_the_yaml_files_restate_no_default():
    """conf/pipeline.yaml sets only interpolations (and the locations); a dataset or backbone file only what
    differs from its dataclass."""
    from pathlib import Path

    import yaml

    from pipeline.backbones.settings import BackboneSettings
    from pipeline.data.settings import DatasetSettings

    conf = Path(__file__).resolve().parents[1] / "conf"
    tree = yaml.safe_load((conf / "pipeline.yaml").read_text())
    for section, values in tree.items():
        if section not in ("defaults", "base_dir", "dirs", "inputs", "stage_dir"):
            assert all("${" in str(v) for v in values.values()), f"pipeline.yaml: {section} restates a default"
    for group, cls in (("dataset", DatasetSettings), ("backbone", BackboneSettings)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for path in sorted((conf / group).glob("*.yaml")):
            for key, value in yaml.safe_load(path.read_text()).items():
                assert key == "defaults" or value != defaults[key], f"{group}/{path.name}: {key}={value} is the default"
