"""The mining loop's sink protocol (pipeline.mining.MiningSink): every row once, in order, then finish(); the
sinks that need the miner's result first; the process-parallel path hands the parent the rows of the
single-process path; the library sinks (journal, pictures, progress, timing) and the read-only completeness check."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.backbones import build_backbone
from pipeline.data import build_dataset
from pipeline.discovery import build_miner
from pipeline.mining import MiningRun, MiningSink, mine_images
from pipeline.mining_sinks import Pictures, Progress, Timing
from pipeline.parallel import fork_available, mine_in_processes


class Recorder(MiningSink):
    """Remembers every call, in order (``log`` is shared between recorders to see their order)."""

    def __init__(self, log: list, name: str, needs_result: bool = False) -> None:
        self.log, self.name, self.needs_result = log, name, needs_result
        self.rows, self.results, self.finished = [], [], 0

    def process(self, index, record, result, row, size) -> None:
        assert self.finished == 0, "process() after finish()"
        assert row["image_id"] == record.image_id
        self.log.append((self.name, index))
        self.rows.append((index, row, None if size is None else tuple(size)))
        self.results.append(result)

    def finish(self) -> None:
        self.finished += 1


def build_parts(root: str) -> tuple:
    """The dataset, backbone and miner of these tests (a spawned worker builds them with this)."""
    backbone = build_backbone("dino_vits16", init="random", seed=0)
    return build_dataset("folder", root), backbone, build_miner("lost", backbone.patch_size, k_patches=20)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five small images, the fourth corrupt (it fails and must still reach every sink)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48 + 16 * (i % 2), 64, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    good = (root / "im3.png").read_bytes()
    (root / "im3.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def parts(folder):
    return build_parts(str(folder))


def test_every_row_once_in_order_then_finish(parts):
    dataset, backbone, miner = parts
    log = []
    rows, pics = Recorder(log, "rows"), Recorder(log, "pictures", needs_result=True)
    indices = [4, 0, 3, 1]
    stats = mine_images(dataset, backbone, miner, indices, [rows, pics], batch_size=3)
    assert [i for i, _, _ in rows.rows] == indices and [i for i, _, _ in pics.rows] == indices
    assert rows.finished == pics.finished == 1 and stats.images == 4
    # the sink that needs the result is called first for each image, though it was given second
    assert log == [(name, i) for i in indices for name in ("pictures", "rows")]
    failed = [row for _, row, _ in rows.rows if row["error"] is not None]
    assert [r["image_id"] for r in failed] == ["im3.png"] and failed[0]["boxes"] == []
    assert [r is None for r in pics.results] == [False, False, True, False]  # a failed image: no result, no size
    assert rows.rows[2][2] is None and rows.rows[0][2] == (48, 64)
    assert set(stats.phases) == {"load", "forward", "miner", "sinks"} and stats.phases["forward"] > 0


def test_batches_hand_the_sinks_the_rows_of_one_image_at_a_time(parts):
    dataset, backbone, miner = parts
    one, three = Recorder([], "one"), Recorder([], "three")
    mine_images(dataset, backbone, miner, range(5), [one], batch_size=1)
    mine_images(dataset, backbone, miner, range(5), [three], batch_size=3)
    assert one.rows == three.rows


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes_hand_the_parent_the_rows_of_one_process(parts, folder, tmp_path, method):
    if method == "fork" and not fork_available():
        pytest.skip("no fork here")
    dataset, backbone, miner = parts
    single = Recorder([], "single")
    mine_images(dataset, backbone, miner, range(5), [single])
    parent, worker_side = Recorder([], "parent"), Pictures(tmp_path / "viz", 5, backbone.patch_size)
    stats = mine_in_processes(dataset, backbone, miner, list(range(5)), [worker_side, parent], procs=2,
                              start_method=method, build=("test_mining_sinks:build_parts", {"root": str(folder)}))
    assert sorted(i for i, _, _ in parent.rows) == list(range(5))           # each image once
    assert sorted(parent.rows, key=lambda r: r[0]) == single.rows           # the same rows and sizes
    assert parent.results == [None] * 5 and parent.finished == 1            # rows only, finished once
    assert sorted(s.images for s in stats) == [2, 3]                        # worker i: images i, i+2, ...
    # the sink that needs the miner's result ran in the workers: a picture of every image that was mined
    assert sorted(p.name for p in (tmp_path / "viz").glob("*.png")) == [
        "000000_im0.png", "000001_im1.png", "000002_im2.png", "000004_im4.png"]


def test_spawn_needs_a_builder(parts):
    dataset, backbone, miner = parts
    with pytest.raises(ValueError, match="build"):
        mine_in_processes(dataset, backbone, miner, [0, 1], [], procs=2, start_method="spawn")


def test_journal_timing_and_progress_sinks(parts, tmp_path, capsys):
    dataset, backbone, miner = parts
    run = MiningRun(tmp_path / "mine", {"what": "test"})
    assert not run.mined_all(dataset.records) and not (tmp_path / "mine").exists()  # read only: nothing created
    timing = Timing()
    progress = Progress(5, "mine test", enabled=False, slow_s=0.0, slow_hint="a smaller image helps")
    mine_images(dataset, backbone, miner, run.pending(dataset.records), [run, progress, timing])
    lines = run.journal_path.read_text().splitlines()
    assert [json.loads(x)["image_id"] for x in lines] == [f"im{i}.png" for i in range(5)]
    assert timing.images == 5 and [f["image_id"] for f in timing.failures] == ["im3.png"] and timing.seconds > 0
    out = capsys.readouterr().out
    assert "skipped" in out and "im3.png" in out
    assert re.search(r"slow: im0.png \(64x48 px\) took \d+ s; a smaller image helps", out)
    assert not run.mined_all(dataset.records)            # the failed image is not done
    assert run.pending(dataset.records) == [3]


def test_forced_run_discards_the_journal_of_another_configuration(parts, tmp_path):
    from pipeline.journal import JournalMismatch

    dataset, backbone, miner = parts
    mine_images(dataset, backbone, miner, [0, 1], [MiningRun(tmp_path, {"k": 1})])
    other = MiningRun(tmp_path, {"k": 2})
    with pytest.raises(JournalMismatch):
        other.pending(dataset.records)
    assert other.pending(dataset.records, discard_other=True) == [0, 1, 2, 3, 4]
    assert MiningRun(tmp_path, {"k": 1}).pending(dataset.records, discard_other=True) == [0, 1, 2, 3, 4]


def test_pictures_sink_draws_the_first_images_and_the_sheet(parts, tmp_path):
    dataset, backbone, miner = parts
    pics = Pictures(tmp_path / "viz", 2, backbone.patch_size, tag="  lost", sheet=tmp_path / "sheet.png",
                    sheet_images=2)
    mine_images(dataset, backbone, miner, range(5), [pics])
    assert sorted(p.name for p in (tmp_path / "viz").glob("*.png")) == ["000000_im0.png", "000001_im1.png"]
    assert pics.write_sheet() == ["viz/", "sheet.png"] and (tmp_path / "sheet.png").is_file()
    pics.clear()
    assert not (tmp_path / "viz").exists() and not (tmp_path / "sheet.png").exists()
