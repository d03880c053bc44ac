"""Every published setting composes with the real config tree and selects what its name says."""
from __future__ import annotations

from pathlib import Path

import pytest

from stage_utils import CONF_DIR, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose_cfg("mine", [f"+experiment={name}"])
    method, dataset = name.split("_")[:2]
    assert cfg.miner.name == method and cfg.dataset.name == dataset
    arch = name.split("_")[2] if name.count("_") == 2 else "vits16"
    assert cfg.backbone.arch == f"dino_{arch}"
    assert cfg.stage_dir.endswith(f"{dataset}/dino_{arch}/" + ("mine" if method == "lost" else f"mine_{method}"))


def test_env_vars_override_paths(monkeypatch):
    monkeypatch.setenv("LOST_OUTPUT_ROOT", "/scratch/out")
    monkeypatch.setenv("LOST_DATA_ROOT", "/datasets")
    cfg = compose_cfg("mine", ["dataset=voc07"])
    assert cfg.stage_dir == "/scratch/out/voc07/dino_vits16/mine"
    assert cfg.dataset.root == "/datasets"
