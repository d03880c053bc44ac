"""pipeline.artifacts: atomic writes keep the permissions a plain open() would give."""
from __future__ import annotations

import os
import stat

import pytest

from pipeline.artifacts import atomic_path, current_umask, write_json, write_text
from pipeline.journal import Journal


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json(tmp_path / "m.json", {"a": 1})
        write_text(tmp_path / "t.md", "x\n")
        with atomic_path(tmp_path / "p.png", suffix=".png") as tmp:
            tmp.write_bytes(b"png")  # writers that reopen the temp file (PIL, torch.save) keep its mode
        j = Journal(tmp_path / "r.jsonl", {"k": 1})
        j.append({"index": 0})
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("m.json", "t.md", "p.png", "r.jsonl", "r.jsonl.meta.json"):
        assert _mode(tmp_path / name) == expected, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
