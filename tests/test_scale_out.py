"""Scale-out paths of the mine stage: local multirun shards, SIGKILL + resume, up-to-date skip, status,
SLURM config composition."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from stage_utils import REPO_ROOT, compose_cfg, run_cli

FAST = ["backbone.init=random", "num_workers=0", "progress=false", "viz.num_images=2"]


def _images(root, n, size=(48, 64), sizes=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        hw = sizes[i] if sizes else size
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def _run_inprocess(out, src, *extra):
    from stages.mine import run

    cfg = compose_cfg("mine", [f"paths.output_root={out}", "dataset=folder", f"dataset.root={src}", *FAST, *extra])
    return run(cfg)


def _boxes(out):
    return (out / "folder" / "dino_vits16" / "mine" / "pseudo_boxes.json").read_bytes()


def test_three_local_shards_merge_to_the_single_run_file(tmp_path):
    src = _images(tmp_path / "imgs", 7)
    _run_inprocess(tmp_path / "single", src)
    run_cli("stages.mine", ["-m", "hydra/launcher=local", "mine.shard=0,1,2", "mine.num_shards=3",
                            f"paths.output_root={tmp_path / 'sharded'}", "dataset=folder", f"dataset.root={src}",
                            *FAST], timeout=600)
    results = tmp_path / "sharded" / "folder" / "dino_vits16" / "mine" / "results"
    assert sorted(p.name for p in results.glob("*.jsonl")) == [f"shard-000{i}-of-0003.jsonl" for i in range(3)]
    assert _boxes(tmp_path / "sharded") == _boxes(tmp_path / "single")
    # `make merge` path: merging again from the journals gives the same file
    from stages.mine import run

    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path / 'sharded'}", "dataset=folder", f"dataset.root={src}",
                               "mine.num_shards=3", "mine.merge_only=true", *FAST])
    assert run(cfg)["images"] == 7
    assert _boxes(tmp_path / "sharded") == _boxes(tmp_path / "single")


def test_sigkill_mid_run_then_resume_recomputes_only_missing(tmp_path):
    n = 6  # two quick images, then slower ones: the kill lands while the third is in flight
    src = _images(tmp_path / "imgs", n, sizes=[(48, 48)] * 2 + [(480, 480)] * (n - 2))
    out = tmp_path / "killed"
    journal = out / "folder" / "dino_vits16" / "mine" / "results" / "shard-0000-of-0001.jsonl"
    args = [sys.executable, "-m", "stages.mine", f"paths.output_root={out}", "dataset=folder",
            f"dataset.root={src}", *FAST]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = journal.read_bytes().count(b"\n")
    assert 2 <= done < n
    assert not (journal.parent.parent / "pseudo_boxes.json").exists()
    metrics = _run_inprocess(out, src)
    assert metrics["resumed"] == done and metrics["computed_this_run"] == n - done
    viz = journal.parent.parent / "viz"
    assert sorted(p.name for p in viz.iterdir()) == ["000000_img00.png", "000001_img01.png"]  # none lost
    _run_inprocess(tmp_path / "clean", src)
    assert _boxes(out) == _boxes(tmp_path / "clean")


def test_rerun_is_up_to_date_and_force_redoes(tmp_path, capsys):
    src = _images(tmp_path / "imgs", 2)
    first = _run_inprocess(tmp_path, src)
    again = _run_inprocess(tmp_path, src)
    assert "is up to date" in capsys.readouterr().out
    assert again == first
    forced = _run_inprocess(tmp_path, src, "force=true")
    assert forced["computed_this_run"] == 2


def test_status_reports_done_stale_missing(tmp_path):
    from pipeline.artifacts import write_manifest
    from pipeline.status import format_status, pipeline_status

    src = _images(tmp_path / "imgs", 2)
    _run_inprocess(tmp_path, src)
    root = tmp_path / "folder" / "dino_vits16"
    boxes = root / "mine" / "pseudo_boxes.json"
    # a downstream stage that consumed pseudo_boxes.json, recorded the way every stage records inputs
    write_manifest(root / "cag", stage="train_cag", config={}, inputs={"pseudo_boxes": boxes},
                   start_time=time.time(), end_time=time.time())
    states = {s.stage: s.state for s in pipeline_status(root)}
    assert states == {"mine": "done", "cag": "done", "cluster": "missing", "cad": "missing"}
    write_manifest(root / "cluster" / "lost" / "k2", stage="cluster", config={},
                   inputs={"pseudo_boxes": boxes}, start_time=time.time(), end_time=time.time())
    states = {s.stage: s.state for s in pipeline_status(root)}
    assert states == {"mine": "done", "cag": "done", "cluster/lost/k2": "done", "cad": "missing"}
    data = json.loads(boxes.read_text())
    data["annotations"] = data["annotations"][:1]
    boxes.write_text(json.dumps(data))
    states = pipeline_status(root)
    assert {s.stage: s.state for s in states} == {"mine": "done", "cag": "stale", "cluster/lost/k2": "stale",
                                                  "cad": "missing"}
    assert "STALE" in format_status(states) and "pseudo_boxes" in format_status(states)
    proc = run_cli("stages.status", [f"paths.output_root={tmp_path}", "dataset=folder"])
    assert "cag" in proc.stdout and "STALE" in proc.stdout


def test_slurm_launcher_config_composes():
    proc = run_cli("stages.mine", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                   "hydra.launcher.timeout_min=120", "--cfg", "hydra", "--package",
                                   "hydra.launcher"])
    assert "SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout
    assert "timeout_min: 120" in proc.stdout and "array_parallelism:" in proc.stdout


def test_local_launcher_runs_a_k_sweep_as_separate_processes(tmp_path):
    from pipeline.artifacts import coco_boxes_dataset, write_json

    src = _images(tmp_path / "imgs", 3, size=(64, 64))
    images = [{"id": i + 1, "file_name": f"img{i:02d}.png", "width": 64, "height": 64} for i in range(3)]
    anns = [{"image_id": i + 1, "bbox_xyxy": [4 * j, 0, 40 + 4 * j, 48], "score": 1.0} for i in range(3)
            for j in range(2)]
    out = tmp_path / "out"
    write_json(out / "demo" / "dino_vits16" / "mine" / "pseudo_boxes.json",
               coco_boxes_dataset(images, anns, info={"image_root": str(src)}))
    sweep = tmp_path / "sweep"
    run_cli("stages.cluster", ["-m", "hydra/launcher=local", "cluster.k=2,3", f"paths.output_root={out}",
                               f"hydra.sweep.dir={sweep}", "backbone.init=random", "progress=false",
                               "cluster.short_side=32", "cluster.n_init=2"], timeout=600)
    base = out / "demo" / "dino_vits16" / "cluster" / "lost"
    assert [json.loads((base / f"k{k}" / "metrics.json").read_text())["k"] for k in (2, 3)] == [2, 3]
    jobs = {p.parent.name for p in (sweep / ".submitit").rglob("*_result.pkl")}
    assert len(jobs) == 2  # two submitit jobs: two processes


def _tiny_pseudo_boxes(tmp_path):
    from pipeline.artifacts import coco_boxes_dataset, write_json

    src = _images(tmp_path / "imgs", 4, size=(96, 128))
    images = [{"id": i + 1, "file_name": f"img{i:02d}.png", "width": 128, "height": 96} for i in range(4)]
    anns = [{"image_id": i + 1, "bbox_xyxy": [16, 8, 96, 80], "score": 1.0} for i in range(4)]
    out = tmp_path / "out"
    write_json(out / "demo" / "dino_vits16" / "mine" / "pseudo_boxes.json",
               coco_boxes_dataset(images, anns, info={"image_root": str(src)}))
    return out


def test_multi_task_submitit_job_trains_with_ddp(tmp_path):
    """What hydra/launcher=slurm_ddp does on a GPU node, here as 2 local CPU tasks (gloo): one process
    group, rank 0 alone writes and evaluates."""
    out = _tiny_pseudo_boxes(tmp_path)
    sweep = tmp_path / "sweep"
    run_cli("stages.train_cag", ["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2",
                                 f"hydra.sweep.dir={sweep}", f"paths.output_root={out}", "detector=mobilenet_fpn",
                                 "schedule=smoke", "progress=false", "num_workers=0"], timeout=600,
            env={"OMP_NUM_THREADS": "1"})
    logs = {int(p.name.split("_")[1]): p.read_text() for p in (sweep / ".submitit").rglob("*_log.out")}
    assert sorted(logs) == [0, 1]
    assert "global_rank=1(2)" in logs[1] and "artifacts:" in logs[0] and "artifacts:" not in logs[1]
    metrics = json.loads((out / "demo" / "dino_vits16" / "cag" / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and metrics["random_init"] is True


def test_demo_auto_fallback_is_not_up_to_date_once_weights_may_exist(tmp_path, monkeypatch, capsys):
    """backbone.init=auto (make demo) fell back to random weights: a rerun looks for the weights again
    instead of calling the random-weight run up to date (and resumes its journal when still offline)."""
    import pipeline.backbones.weights as w

    def offline(url, dst, progress=True):
        raise OSError("offline (test)")

    from stages.mine import run

    monkeypatch.setattr(w.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    src = _images(tmp_path / "imgs", 2)
    over = [f"paths.output_root={tmp_path}", "dataset=folder", f"dataset.root={src}", "backbone.init=auto",
            f"paths.weights_dir={tmp_path / 'noweights'}", *[a for a in FAST if not a.startswith("backbone.init")]]
    first = run(compose_cfg("mine", over))
    assert first["random_init"] is True and "RANDOMLY INITIALISED" in capsys.readouterr().err
    again = run(compose_cfg("mine", over))
    out = capsys.readouterr()
    assert "is up to date" not in out.out and "RANDOMLY INITIALISED" in out.err
    assert again["resumed"] == 2 and again["computed_this_run"] == 0


def test_status_partial_upstream_propagation_and_annotations(tmp_path, voc07_mini):
    """make status: a half-mined run is 'partial N/M'; a stage whose input stage is stale is stale too; edited
    annotations make a stage that scored against them stale; the README's chain ARGS are accepted."""
    from pipeline.artifacts import write_manifest
    from pipeline.data import build_dataset
    from pipeline.status import annotations_digest, pipeline_status

    src = _images(tmp_path / "imgs", 3)
    _run_inprocess(tmp_path, src, "mine.num_shards=3", "mine.shard=0")
    root = tmp_path / "folder" / "dino_vits16"
    (st,) = [s for s in pipeline_status(root, n_images=3) if s.stage == "mine"]
    assert st.state == "partial" and st.progress == (1, 3)
    import shutil
    shutil.rmtree(root / "mine")
    # cluster read mine's boxes, cad read the clusters: when the boxes change both are stale
    boxes = root / "mine" / "pseudo_boxes.json"
    boxes.parent.mkdir(parents=True, exist_ok=True)
    boxes.write_text("{}")
    labels = root / "cluster" / "lost" / "k2" / "pseudo_labels.json"
    labels.parent.mkdir(parents=True)
    labels.write_text("{}")
    t = time.time()
    write_manifest(labels.parent, stage="cluster", config={}, inputs={"boxes": boxes}, start_time=t, end_time=t)
    write_manifest(root / "cad", stage="train_cad", config={}, inputs={"pseudo_labels": labels}, start_time=t,
                   end_time=t)
    assert {s.stage: s.state for s in pipeline_status(root)}["cad"] == "done"
    boxes.write_text('{"changed": 1}')
    states = {s.stage: s for s in pipeline_status(root)}
    assert states["cluster/lost/k2"].state == "stale" and states["cad"].state == "stale"
    assert "upstream cluster/lost/k2 is stale" in states["cad"].changed
    # annotations edited after a stage scored against them
    recs = build_dataset("voc07", str(voc07_mini), max_images=2).records
    ev = tmp_path / "voc07" / "dino_vits16" / "cag"
    write_manifest(ev, stage="train_cag", config={}, start_time=t, end_time=t,
                   extra={"annotations_digest": annotations_digest(recs)})
    assert pipeline_status(ev.parent, annotations_digest=annotations_digest(recs))[1].state == "done"
    recs[0].boxes[0, 0] += 5
    (cag,) = [s for s in pipeline_status(ev.parent, annotations_digest=annotations_digest(recs)) if s.stage == "cag"]
    assert cag.state == "stale" and "annotations" in cag.changed[0]
    proc = run_cli("stages.status", [f"paths.output_root={tmp_path}", "dataset=folder", f"dataset.root={src}",
                                     "detector=mobilenet_fpn", "schedule=smoke", "miner=dinoseg", "cluster.k=3",
                                     "+experiment=lost_voc07", "dataset=folder"], check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    proc = run_cli("stages.mine", ["-m", "hydra/launcher=slurm", f"paths.output_root={tmp_path}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: hydra/launcher=slurm") and "hydra/launcher=local" in proc.stderr


def test_cpu_worker_processes_and_batches_give_identical_boxes(tmp_path, voc07_mini, monkeypatch):
    """mine.procs=2 (two one-thread processes, one journal; forked, and spawned as on platforms without
    fork) and mine.batch_size=3 give the byte-identical pseudo_boxes.json of one process mining one image at
    a time, on real VOC images."""
    import pipeline.parallel
    from stages.mine import run

    def mine(out, *extra):
        cfg = compose_cfg("mine", [f"paths.output_root={out}", "dataset=voc07", f"paths.data_root={voc07_mini}",
                                   "dataset.max_images=6", *FAST, *extra])
        return run(cfg), out / "voc07" / "dino_vits16" / "mine" / "pseudo_boxes.json"

    m1, one = mine(tmp_path / "one", "mine.procs=1", "mine.batch_size=1")
    m2, two = mine(tmp_path / "two", "mine.procs=2")
    m3, batched = mine(tmp_path / "batched", "mine.procs=1", "mine.batch_size=3")
    assert (m1["processes"], m2["processes"], m3["batch_size"]) == (1, 2, 3)
    assert two.read_bytes() == one.read_bytes() and batched.read_bytes() == one.read_bytes()
    assert m2["computed_this_run"] == 6 and len(list((two.parent / "viz").glob("*.png"))) == 2  # viz.num_images
    monkeypatch.setattr(pipeline.parallel, "fork_available", lambda: False)  # workers build their own model
    m4, spawned = mine(tmp_path / "spawned", "mine.procs=2")
    assert m4["processes"] == 2 and spawned.read_bytes() == one.read_bytes()
