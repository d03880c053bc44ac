"""The Makefile refuses Hydra overrides given as make variables, and reads FORCE=1|true|yes (make -n: nothing runs)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


def make_n(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _stage_line(out: str, module: str) -> str:
    return next(line for line in out.splitlines() if f"-m {module}" in line)


@pytest.mark.parametrize("args,shown", [
    (["dataset=voc07"], 'error: dataset=voc07 is not a make variable; pass Hydra overrides as ARGS="dataset=voc07"'),
    (["mine.force=true"], 'mine.force=true is not a make variable; pass Hydra overrides as ARGS="mine.force=true"'),
    (["backbone=dino_vitb16", "ARGS=dataset=voc07"], 'as ARGS="backbone=dino_vitb16 dataset=voc07"'),
    (["seed=3"], "seed=3 is not a make variable"),
])
def test_hydra_overrides_as_make_variables_are_refused(args, shown):
    p = make_n("mine", *args)
    assert p.returncode != 0 and shown in p.stderr
    assert "stages.mine" not in p.stdout


def test_every_top_level_config_key_is_refused():
    """The Makefile lists the top-level keys that no YAML file sets (their values are the dataclasses' defaults)."""
    import dataclasses

    from stages.config import PipelineConf

    for f in dataclasses.fields(PipelineConf):
        p = make_n("mine", f"{f.name}=1")
        assert p.returncode != 0 and f"{f.name}=1 is not a make variable" in p.stderr, f.name


def test_args_and_other_variables_pass():
    p = make_n("mine", "ARGS=dataset=voc07 backbone=dino_vits16", "V=1")
    assert p.returncode == 0, p.stderr
    assert _stage_line(p.stdout, "stages.mine").split()[-2:] == ["dataset=voc07", "backbone=dino_vits16"]


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("yes", True), ("TRUE", True), ("0", False),
                                      ("false", False), ("no", False), ("", False)])
def test_force_values(value, on):
    p = make_n("mine", "cluster", f"FORCE={value}")
    assert p.returncode == 0, p.stderr
    assert ("force=true" in _stage_line(p.stdout, "stages.mine")) is on
    assert ("force=true" in _stage_line(p.stdout, "stages.cluster")) is on


def test_force_nonsense_is_refused():
    p = make_n("mine", "FORCE=maybe")
    assert p.returncode != 0 and "FORCE=maybe: use FORCE=1 (or true, yes)" in p.stderr
