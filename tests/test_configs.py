"""Every published setting composes with the real config tree and selects what its name says."""
from __future__ import annotations

from pathlib import Path

import pytest

from stage_utils import CONF_DIR, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if not p.stem.startswith("cutler_"))
CUTLER = {"cutler_coco": ("maskcut", "coco", "cascade_mask_r50_fpn", 1.0),
          "cutler_voc07": ("maskcut", "voc07", "cascade_mask_r50_fpn", 1.0),
          "cutler_lost_voc07": ("lost", "voc07", "cascade_r50_fpn", 0.0),
          "cutler_tokencut_voc07": ("tokencut", "voc07", "cascade_r50_fpn", 0.0)}


def test_every_cutler_preset_is_checked():
    assert sorted(CUTLER) == sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("cutler_*.yaml"))


@pytest.mark.parametrize("name", sorted(CUTLER))
def test_cutler_presets_compose_with_the_papers_recipe(name):
    """CutLER's recipe: its miner's pseudo-labels, Cascade (Mask) R-CNN, DropLoss 0.01, copy-paste only with masks,
    its 160k schedule, two self-training rounds at 0.7 / 0.65 on 80k iterations at LR 0.005."""
    miner, dataset, detector, copy_paste = CUTLER[name]
    cfg = compose_cfg("self_train", [f"+experiment={name}"])
    assert (cfg.miner.name, cfg.dataset.name, cfg.detector.preset) == (miner, dataset, detector)
    assert cfg.train_cag.drop_loss_iou == 0.01 and cfg.train_cag.copy_paste == copy_paste
    assert (cfg.schedule.iterations, cfg.schedule.lr, list(cfg.schedule.steps)) == (160000, 0.01, [80000])
    s = cfg.self_train
    assert (s.rounds, list(s.score_thresholds), s.iterations, s.lr, list(s.steps)) == (2, [0.7, 0.65], 80000, 0.005, [])
    assert cfg.stage_dir.endswith(f"{dataset}/{cfg.backbone.name}/" + ("cag" if miner == "lost" else f"cag_{miner}"))


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
