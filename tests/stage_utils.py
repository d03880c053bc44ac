"""Compose the real Hydra configs and run stages in-process, tiny (helpers for the stage tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import stages.config  # noqa: F401  (registers the config schemas)
from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_ROOT / "conf")


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=False)


def run_cli(module: str, overrides: list[str], timeout: int = 300, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """``python -m <module> <overrides>`` from the repo root, as a user would run it."""
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
