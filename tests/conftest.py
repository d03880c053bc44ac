"""Shared fixtures: where the read-only real test data lives (``LOST_SHARED_DATA``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("LOST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared test data not found at {d} (set LOST_SHARED_DATA to its path)")
    return d


def _fixture_dir(shared: Path, name: str) -> Path:
    d = shared / name
    if not d.is_dir():
        pytest.skip(f"{d} missing")
    return d


@pytest.fixture(scope="session")
def voc07_mini(shared_data) -> Path:
    return _fixture_dir(shared_data, "voc07-mini")


@pytest.fixture(scope="session")
def coco_tiny(shared_data) -> Path:
    return _fixture_dir(shared_data, "coco-tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a busy 2-core machine OpenMP's spin-waiting makes 2 threads up to 100x slower for small convs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
