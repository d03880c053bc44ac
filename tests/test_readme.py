"""The README's commands are exact: its SLURM examples compose with the real configs."""
from __future__ import annotations

import re
import shlex

import pytest

from stage_utils import REPO_ROOT, run_cli

README = (REPO_ROOT / "README.md").read_text()


def _slurm_examples() -> list[str]:
    block = README.split("<!-- slurm-examples")[1].split("<!-- /slurm-examples -->")[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith(".venv/bin/python -m stages.")]


def _single_job(args: list[str]) -> list[str]:
    """Drop -m and keep the first value of each sweep (Hydra's --cfg composes one job, not a sweep)."""
    out = []
    for a in args:
        if a == "-m":
            continue
        key, _, val = a.partition("=")
        m = re.fullmatch(r"range\((\d+),\s*\d+\)", val)
        if m:
            val = m.group(1)
        elif "," in val and not val.startswith("["):
            val = val.split(",")[0]
        out.append(f"{key}={val}" if _ else a)
    return out


def test_readme_starts_with_the_two_commands():
    head = "\n".join(README.splitlines()[:8])
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("command", _slurm_examples())
def test_slurm_example_composes(command):
    args = shlex.split(command)
    assert args[:2] == [".venv/bin/python", "-m"] and "-m" in args[3:]  # the venv's Python: a bare one lacks omegaconf
    assert any(a.startswith("hydra/launcher=slurm") for a in args)
    proc = run_cli(args[2], _single_job(args[3:]) + ["--cfg", "hydra", "--package", "hydra.launcher"])
    assert "SlurmLauncher" in proc.stdout
    for a in args[3:]:
        if a.startswith("hydra.launcher."):
            key, val = a[len("hydra.launcher."):].split("=")
            assert f"{key}: {val}" in proc.stdout


def test_python_example_runs(tmp_path, monkeypatch):
    """The README's "Use it from Python" block, as written, on a real photo (random weights: offline)."""
    import numpy as np
    from PIL import Image

    import pipeline.backbones as backbones

    block = README.split("<!-- python-example")[1].split("```python\n")[1].split("```")[0]
    assert len([ln for ln in block.splitlines() if ln.strip()]) <= 12
    real = backbones.build_backbone
    monkeypatch.setattr(backbones, "build_backbone", lambda arch, **kw: real(arch, init="random", **kw))
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save("photo.jpg")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    box = namespace["result"].box
    assert 0 <= box[0] < box[2] <= 90 and 0 <= box[1] < box[3] <= 70
    assert Image.open("photo_lost.png").size[0] >= 90
