"""docs/ARCHITECTURE.md's "How to add a miner", followed step by step for a new miner (a toy one: the centre
box of the image): if the recipe misses a step, this test fails. The YAML file of step 3 is stored through
Hydra's ConfigStore here (what conf/miner/<name>.yaml holds), so the test writes nothing into conf/."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from stage_utils import compose_cfg


@dataclass
class CentreResult:
    box: tuple
    score: float


def centre(feats: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int],
           fraction: float = 0.5) -> CentreResult:
    """Step 1, the algorithm: features in, result out, no I/O (a box of ``fraction`` of the image, centred)."""
    h, w = image_size
    dx, dy = w * (1 - fraction) / 2, h * (1 - fraction) / 2
    return CentreResult((dx, dy, w - dx, h - dy), float(fraction))


@pytest.fixture
def centre_miner(monkeypatch):
    from hydra.core.config_store import ConfigStore

    import stages.config as config
    from pipeline.discovery import miners

    class CentreMiner(miners.Miner):  # step 2: the Miner subclass, registered in MINERS
        name = "centre"
        fn = staticmethod(centre)

        def validate(self) -> None:
            if not 0 < self.params["fraction"] <= 1:
                raise ValueError(f"centre: fraction must be in (0, 1], got {self.params['fraction']!r}")

    monkeypatch.setitem(miners.MINERS, "centre", CentreMiner)
    importlib.reload(config)  # the schema of miner=centre is generated from centre()'s signature
    # step 3: conf/miner/centre.yaml = {defaults: [/schema/miner_centre@_here_, _self_]}
    ConfigStore.instance().store(group="miner", name="centre",
                                 node={"defaults": ["/schema/miner_centre@_here_", "_self_"]})
    yield
    monkeypatch.undo()
    importlib.reload(config)


def test_a_new_miner_runs_through_the_mine_stage_by_the_recipe(tmp_path, centre_miner):
    from stages.checks import config_errors
    from stages.mine import run

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((48, 64 + 16 * i, 3), 90, np.uint8)).save(src / f"im{i}.png")
    args = [f"paths.output_root={tmp_path}", "dataset=folder", f"dataset.root={src}", "miner=centre",
            "backbone.init=random", "num_workers=0", "progress=false", "mine.procs=1"]
    cfg = compose_cfg("mine", args)
    assert dict(cfg.miner) == {"name": "centre", "fraction": 0.5, "crf": False} and config_errors(cfg, "mine") == []
    assert config_errors(compose_cfg("mine", [*args, "miner.fraction=2"]), "mine") == [
        "miner.fraction=2.0: fraction must be in (0, 1], got 2.0"]
    m = run(cfg)
    stage = tmp_path / "folder" / "dino_vits16" / "mine_centre"   # its own folder, as every miner but LOST
    boxes = json.loads((stage / "pseudo_boxes.json").read_text())
    assert m["images"] == 2 and m["method"] == "centre" and boxes["info"]["miner_params"] == {"fraction": 0.5}
    assert [a["bbox"] for a in boxes["annotations"]] == [[16.0, 12.0, 32.0, 24.0], [20.0, 12.0, 40.0, 24.0]]
    assert len(list((stage / "viz").glob("*.png"))) == 2   # its pictures: the generic overlay of a box
