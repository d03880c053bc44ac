"""Shared fixtures: the real test data, in the repository under ``tests/data`` (see its README.md).

``LOST_SHARED_DATA`` may name a directory with larger copies under the same names (e.g. the 80-image
``coco-tiny``, the whole ``coco20k_filenames.txt``); each fixture uses that copy when it is there and the
in-repo one otherwise. Tests must therefore derive expected numbers from the data they are given.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_REPO_DATA = REPO_ROOT / "tests" / "data"


def shared_data_dir() -> Path | None:
    """``LOST_SHARED_DATA`` when it is set (it may not exist), else None."""
    v = os.environ.get("LOST_SHARED_DATA")
    return Path(v).expanduser().resolve() if v else None


def data_path(name: str) -> Path:
    """``name`` under ``LOST_SHARED_DATA`` when set and present there, else the in-repo copy in tests/data."""
    shared = shared_data_dir()
    if shared is not None and (shared / name).exists():
        return shared / name
    p = IN_REPO_DATA / name
    if not p.exists():  # shipped with the repository: missing is a broken checkout, not a reason to skip
        pytest.fail(f"test data {p} missing (it is tracked in git under tests/data)")
    return p


def pytest_report_header(config):
    shared = shared_data_dir()
    where = f"LOST_SHARED_DATA={shared} where present, else " if shared and shared.is_dir() else ""
    return f"test data: {where}{IN_REPO_DATA}"


@pytest.fixture(scope="session")
def voc07_mini() -> Path:
    return data_path("voc07-mini")


@pytest.fixture(scope="session")
def coco_tiny() -> Path:
    return data_path("coco-tiny")


@pytest.fixture(scope="session")
def coco20k_list() -> Path:
    return data_path("coco20k_filenames.txt")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a busy 2-core machine OpenMP's spin-waiting makes 2 threads up to 100x slower for small convs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
