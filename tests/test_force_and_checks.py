"""Bad values are one `error:` line naming the key, checked before a stage touches anything; FORCE replaces
finished results only once the new ones are complete (issue 20, cases 1, 3 and 4)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.artifacts import (begin_replacement, commit_replacement, recover_replacement, replacement_dir,
                                sha256_file)
from stage_utils import compose_cfg, run_cli

FAST = ["backbone.init=random", "num_workers=0", "progress=false", "mine.procs=1"]


def _errors(stage: str, *overrides: str) -> list[str]:
    from stages.checks import config_errors

    return config_errors(compose_cfg(stage, list(overrides)), stage)


@pytest.mark.parametrize("stage, overrides, expected", [
    ("mine", ["miner.k_patches=0"], "miner.k_patches=0: k_patches must be a positive integer"),
    ("mine", ["miner=maskcut", "miner.num_objects=0"], "miner.num_objects=0: num_objects must be a positive"),
    ("mine", ["miner=dinoseg", "miner.head=9"], "miner.head=9: head must be an integer in [0, 5]"),
    ("mine", ["miner=dinoseg", "miner.head=9", "backbone=dino_vitb16"], None),   # ViT-B has 12 heads
    ("mine", ["miner=dinoseg", "miner.mass=1.5"], "miner.mass=1.5: mass must be in (0, 1]"),
    ("mine", ["miner=tokencut", "miner.tau=1.5"], "miner.tau=1.5: tau must be in (-1, 1)"),
    ("mine", ["backbone.feature=x"], "backbone.feature=x: unknown; choose one of k, q, v, tokens"),
    ("mine", ["mine.num_shards=0"], "mine.num_shards=0: must be >= 1"),
    ("mine", ["mine.shard=3", "mine.num_shards=2"], "mine.shard=3: must be in [0, mine.num_shards) = [0, 1]"),
    ("mine", ["device=gpu"], "device=gpu: not a device"),
    ("train_cag", ["schedule.lr=-1"], "schedule.lr=-1.0: lr must be a positive number"),
    ("train_cag", ["schedule.steps=[5,2]"], "schedule.steps=[5, 2]: steps must be increasing"),
    ("train_cad", ["detector.nms=2"], "detector.nms=2.0: nms must be an IoU in [0, 1]"),
    ("train_cag", ["detector=mobilenet_fpn", "detector.init=dino"], "detector.init=dino: init dino is not available"),
    ("cluster", ["cluster.k=0"], "cluster.k=0: must be >= 1"),
    ("cluster", ["cluster.source=gt"], "cluster.source=gt: choose lost"),
    ("mine", ["schedule.lr=-1"], None),   # a stage judges only what it uses: mining needs no schedule
])
def test_each_bad_value_is_one_message_naming_its_key(stage, overrides, expected):
    errors = _errors(stage, *overrides)
    if expected is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_the_shipped_configs_pass_every_check():
    for stage in ("mine", "cluster", "train_cag", "train_cad", "evaluate_cag", "evaluate_cad", "report"):
        assert _errors(stage) == []
    for miner in ("lost", "dinoseg", "tokencut", "maskcut"):
        assert _errors("mine", f"miner={miner}") == []
    for det in ("r50_c4", "r50_fpn", "mobilenet_fpn"):
        for sch in ("default", "smoke", "voc07_reference"):
            assert _errors("train_cag", f"detector={det}", f"schedule={sch}") == []


@pytest.mark.parametrize("args, expected", [
    (["miner.k_patches=0"], "error: miner.k_patches=0: k_patches must be a positive integer, got 0"),
    (["dataset=dataset_schema"], "error: dataset=dataset_schema: no such dataset; choose one of coco, coco20k, "
                                 "demo, folder, voc07, voc12"),
    (["hydra/launcher=local"], "error: hydra/launcher=local takes effect only with -m"),
])
def test_the_command_line_says_one_error_line(tmp_path, args, expected):
    p = run_cli("stages.mine", [f"paths.output_root={tmp_path}", *FAST, *args], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "demo").exists()


def test_schemas_are_not_choices():
    """The schemas live in their own group: never offered (or accepted) as a dataset, miner, ..."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        compose_cfg("mine", ["miner=lost_schema"])
    cfg = compose_cfg("mine", ["miner=maskcut"])  # the YAML files still start from their schema (typed)
    with pytest.raises(Exception, match="num_objects"):
        compose_cfg("mine", ["miner=maskcut", "miner.num_objects=many"])
    assert cfg.miner.num_objects == 3


# ------------------------------------------------------------------------------------ FORCE
def _folder(tmp_path, n=5):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48 + 16 * (i % 2), 64, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    return src


def _hashes(d):
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def test_force_with_a_bad_value_leaves_the_finished_run_whole(tmp_path):
    from stages.mine import run

    src = _folder(tmp_path)
    data = [f"paths.output_root={tmp_path}", *FAST, "dataset=folder", f"dataset.root={src}"]
    run(compose_cfg("mine", data))
    stage = tmp_path / "folder" / "dino_vits16" / "mine"
    before = _hashes(stage)
    p = run_cli("stages.mine", [*data, "force=true", "miner.k_patches=0"], check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: miner.k_patches=0"), p.stderr
    assert _hashes(stage) == before


def test_a_forced_run_that_dies_loses_nothing_and_the_same_command_finishes_it(tmp_path, monkeypatch):
    import pipeline.mining as mining
    from stages.mine import run

    src = _folder(tmp_path)
    data = [f"paths.output_root={tmp_path}", *FAST, "dataset=folder", f"dataset.root={src}"]
    run(compose_cfg("mine", data))
    stage = tmp_path / "folder" / "dino_vits16" / "mine"
    before = _hashes(stage)

    real, calls = mining.make_row, []

    def die_at_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **kw)

    forced = compose_cfg("mine", [*data, "force=true", "miner.k_patches=20"])
    monkeypatch.setattr(mining, "make_row", die_at_third)
    with pytest.raises(RuntimeError, match="killed"):
        run(forced)
    assert _hashes(stage) == before   # the finished results are whole
    journal = next((replacement_dir(stage) / "results").glob("shard-*.jsonl"))
    assert len(journal.read_text().splitlines()) == 2
    monkeypatch.setattr(mining, "make_row", real)
    m = run(forced)
    assert m["resumed"] == 2 and m["computed_this_run"] == 3 and not replacement_dir(stage).exists()
    info = json.loads((stage / "pseudo_boxes.json").read_text())["info"]
    assert info["miner_params"] == {"k_patches": 20}
    assert json.loads((stage / "manifest.json").read_text())["artifact"]["miner"]["k_patches"] == 20


def test_a_swap_killed_half_way_is_repaired(tmp_path):
    final = tmp_path / "cag"
    final.mkdir()
    (final / "model.pt").write_text("old")
    work = begin_replacement(final, keep=False)
    (work / "model.pt").write_text("new")
    # killed after parking the old results, before the new ones took their place
    old = tmp_path / ".cag.old"
    final.rename(old)
    recover_replacement(final)
    assert (final / "model.pt").read_text() == "old" and not old.exists()
    # the next forced run with keep=True continues its work; its commit swaps
    work = begin_replacement(final, keep=True)
    assert (work / "model.pt").read_text() == "new"
    commit_replacement(final, work)
    assert (final / "model.pt").read_text() == "new" and not work.exists() and not old.exists()
    # killed after the swap, before the parked copy was removed: the new results stay
    old.mkdir()
    (old / "model.pt").write_text("old")
    recover_replacement(final)
    assert (final / "model.pt").read_text() == "new" and not old.exists()


def test_library_errors_reach_the_user_in_config_keys():
    """The library names its parameters; the stage that ran says which config key sets each one."""
    from stages.checks import in_config_keys

    msg = "no weights for dino_vits16: ... Fix: pass weights=/p/x.pth, or weights_dir=<dir>, or init=random"
    assert in_config_keys(msg, "mine").endswith(
        "pass backbone.weights=/p/x.pth, or paths.weights_dir=<dir>, or backbone.init=random")
    assert "detector.weights=/p/x.pth" in in_config_keys(msg, "train_cag")
    assert in_config_keys("set cluster.k=3 or k=3", "mine") == "set cluster.k=3 or k=3"  # keys stay keys


def test_no_config_key_or_make_target_in_library_messages():
    """Messages raised under pipeline/ speak in parameters (issue 16): no `section.key=`, `group=` of the config,
    `make <target>` or FORCE=1 in a string literal of a raise statement."""
    import ast
    import re
    from pathlib import Path

    sections = ("dataset", "backbone", "miner", "detector", "schedule", "paths", "cluster", "mine", "train_cag",
                "train_cad", "evaluate_cag", "evaluate_cad", "eval", "viz", "report")
    key = re.compile(rf"\b({'|'.join(sections)})(\.\w+)?=|`make [a-z]|FORCE=1|force=true")
    bad = []
    for path in sorted((Path(__file__).resolve().parents[1] / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for s in ast.walk(node.exc):
                    if isinstance(s, ast.Constant) and isinstance(s.value, str) and key.search(s.value):
                        bad.append(f"{path.name}:{node.lineno}: {s.value[:70]}")
    assert bad == []
