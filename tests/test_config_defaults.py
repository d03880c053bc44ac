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
        "name": "maskcut", "num_objects": 3, "tau": 0.15, "eps": 1e-5, "image_size": None}


def test_the_shipped_defaults():
    """What the defaults are today (the values the reference code uses)."""
    cfg = compose_cfg("cluster", [])
    assert dict(cfg.cluster) == {"k": 20, "seed": 0, "n_init": 10, "iters": 20, "whiten": True, "l2_normalize": True,
                                 "batch_size": 32, "short_side": 256, "max_size": 1024, "source": "lost",
                                 "boxes": None, "score_threshold": 0.5, "run_name": "k20"}
    assert dict(compose_cfg("mine", ["miner=tokencut"]).miner) == {"name": "tokencut", "tau": 0.2, "eps": 1e-5,
                                                                   "max_boxes": 1}
