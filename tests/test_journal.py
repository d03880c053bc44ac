from __future__ import annotations

import json

import pytest

from pipeline.journal import Journal, JournalMismatch, discard_journal
from pipeline.mining import shard_indices


def test_append_load_and_torn_last_line(tmp_path):
    j = Journal(tmp_path / "r.jsonl", {"a": 1})
    for i in range(3):
        j.append({"index": i, "v": i * i})
    with open(j.path, "a") as f:
        f.write('{"index": 3, "v"')  # the process died mid-write
    j2 = Journal(tmp_path / "r.jsonl", {"a": 1})
    assert sorted(j2.load()) == [0, 1, 2]
    j2.append({"index": 3, "v": 9})
    assert [json.loads(x)["index"] for x in j2.path.read_text().splitlines()] == [0, 1, 2, 3]


def test_meta_mismatch_is_refused_and_discard_clears(tmp_path):
    j = Journal(tmp_path / "r.jsonl", {"k": 100, "w": "x"})
    j.append({"index": 0})
    with pytest.raises(JournalMismatch, match="changed: k"):
        Journal(tmp_path / "r.jsonl", {"k": 50, "w": "x"})
    discard_journal(tmp_path / "r.jsonl")
    assert Journal(tmp_path / "r.jsonl", {"k": 50, "w": "x"}).load() == {}


def test_shard_indices_partition():
    parts = [shard_indices(10, s, 3) for s in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError):
        shard_indices(10, 3, 3)
