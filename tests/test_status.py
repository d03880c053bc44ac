"""Stage states (pipeline/status.py), the one answer `make status` and `make report` both give: a finished
mining run with failed images is done (with failures), a training killed after a checkpoint is partial and
resumable, one killed before it failed, and a copied output tree is checked against its own files."""
from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import pytest

from pipeline.artifacts import read_json, write_json, write_manifest
from pipeline.status import format_status, next_command, pipeline_status, stage_state
from report_fixtures import FOLDER_BAD, folder_args, layout_for, make_experiment, mine_folder, partial_training
from stage_utils import compose_cfg


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A real mining run over 13 files, 5 of which the miner fails on (read-only: copy it to change it)."""
    tmp = tmp_path_factory.mktemp("folder")
    return mine_folder(tmp / "out", tmp / "imgs")


@pytest.fixture
def folder(folder_run, tmp_path):
    """A private copy of the folder experiment: (base dir, its ARGS)."""
    out = tmp_path / "out"
    shutil.copytree(folder_run.parents[1], out)
    return out / "folder" / "dino_vits16", folder_args(out, folder_run.parents[2] / "imgs")


def by_stage(states):
    return {s.stage: s for s in states}


def test_failed_images_leave_a_finished_mining_run_done(folder):
    base, _ = folder
    st = by_stage(pipeline_status(base, n_images=13))["mine"]
    assert read_json(base / "mine" / "metrics.json")["failures"] == len(FOLDER_BAD)
    assert (st.state, st.failures, st.label) == ("done", 5, "done (5 failed)")
    text = format_status(pipeline_status(base, n_images=13))
    assert "done (5 failed)" in text and "partial" not in text
    # without the manifest (a run killed before the merge) the same journal is a partial run: 8 of 13 mined
    (base / "mine" / "manifest.json").unlink()
    (base / "mine" / "pseudo_boxes.json").unlink()
    st = by_stage(pipeline_status(base, n_images=13))["mine"]
    assert (st.state, st.progress, st.label) == ("partial", (8, 13), "partial 8/13")
    assert next_command(st, ["dataset=folder"]) == 'make mine ARGS="dataset=folder"'


def test_a_training_killed_after_a_checkpoint_is_partial_and_resumable(tmp_path):
    base = make_experiment(tmp_path / "out", tmp_path / "data", stages=("mine", "cluster"))
    partial_training(base / "cag", 5, 30)
    states = by_stage(pipeline_status(base))
    st = states["cag"]
    assert (st.state, st.progress, st.label) == ("partial", (5, 30), "partial 5/30")
    assert "resume with train_cag.resume=true" in format_status(list(states.values()))
    assert next_command(st, ["dataset=voc07"]) == 'make train-cag ARGS="dataset=voc07 train_cag.resume=true"'
    # train-cad the same, with its own section's key; an old evaluation under it does not hide it
    partial_training(base / "cad", 2, 4)
    t = 0.0
    write_manifest(base / "cad" / "eval_trainval", stage="evaluate_cad", config={}, start_time=t, end_time=t,
                   inputs={"model": base / "cad" / "model.pt"})
    states = by_stage(pipeline_status(base))
    assert states["cad"].label == "partial 2/4"
    assert next_command(states["cad"], []) == 'make train-cad ARGS="train_cad.resume=true"'
    assert states["cad/eval_trainval"].state == "stale"     # it scored a model that is not there any more


def test_a_training_killed_before_its_first_checkpoint_failed(tmp_path):
    base = make_experiment(tmp_path / "out", tmp_path / "data", stages=("mine",))
    (base / "cag").mkdir()
    (base / "cag" / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n')
    st = by_stage(pipeline_status(base))["cag"]
    assert st.state == "failed" and "before its first checkpoint" in st.detail
    assert next_command(st, ["dataset=voc07"]) == 'make train-cag ARGS="dataset=voc07"'   # nothing finished to force
    # a model.pt that does not load: only FORCE=1 replaces it
    (base / "cag" / "model.pt").write_bytes(b"torn")
    st = by_stage(pipeline_status(base))["cag"]
    assert st.state == "failed" and "model.pt" in st.detail
    assert next_command(st, ["dataset=voc07"]) == 'make train-cag FORCE=1 ARGS="dataset=voc07"'
    # trained to the end but killed before it wrote its results: a plain rerun evaluates the model
    (base / "cag" / "model.pt").unlink()
    partial_training(base / "cag", 30, 30)
    st = by_stage(pipeline_status(base))["cag"]
    assert (st.state, st.label) == ("partial", "partial 30/30") and "not evaluated" in st.detail
    assert next_command(st, ["dataset=voc07"]) == 'make train-cag ARGS="dataset=voc07"'


def test_an_unfinished_forced_rerun_is_mentioned(tmp_path):
    """A forced rerun works in a hidden sibling (``.cag.new``) and swaps it in when complete: until then the
    finished results are the stage's state, and the sibling is mentioned, never listed as a stage."""
    base = make_experiment(tmp_path / "out", tmp_path / "data", stages=("mine", "cag", "cluster"))
    partial_training(base / ".cag.new", 2, 4)
    shutil.copytree(base / "cluster" / "lost" / "k2", base / "cluster" / "lost" / ".k2.new")
    states = by_stage(pipeline_status(base))
    assert set(states) == {"mine", "cag", "cluster/lost/k2", "cad"}
    assert states["cag"].state == "done" and ".cag.new/" in states["cag"].detail
    assert ".cag.new/" in format_status(list(states.values()))
    from pipeline.report import build_report

    assert [c["run"] for c in build_report(base)["cluster"]] == ["lost/k2"]


def _labels_of_status_output(text: str) -> dict[str, str]:
    """``stage -> state label`` from `make status` lines (``<stage> <label> <path> ...``)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(done \(\d+ failed\)|partial \d+/\d+|done|STALE|missing|failed|partial)\s", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_status_and_report_agree(folder, capsys):
    """The two stages, the same ARGS, the cases of issue 20: mining done with 5 failures, a train-cag killed at
    iteration 5 of 30, cluster missing; every stage has the same state in both, and the same command."""
    from stages.report import run as report
    from stages.status import run as status

    base, args = folder
    partial_training(base / "cag", 5, 30)
    states = status(compose_cfg("status", args), overrides=args)
    shown = _labels_of_status_output(capsys.readouterr().out)
    summary = report(compose_cfg("report", args), overrides=args)
    rows = {r["stage"]: r for r in summary["provenance"]["stages"]}
    assert shown == {"mine": "done (5 failed)", "cag": "partial 5/30", "cluster": "missing", "cad": "missing"}
    assert {k: r["label"] for k, r in rows.items()} == shown
    assert {s.stage: s.label for s in states} == {k: r["label"] for k, r in rows.items()}
    resume = f'make train-cag ARGS="{" ".join(args)} train_cag.resume=true"'
    assert rows["cag"]["command"] == resume
    html = Path(summary["index"]).read_text()
    assert "done (5 failed)" in html and "partial 5/30" in html and resume.replace('"', "&#34;") in html


def test_status_stage_prints_the_command(folder, capsys):
    from stages.status import run as status

    base, args = folder
    status(compose_cfg("status", args), overrides=[*args, "force=true"])
    out = capsys.readouterr().out
    assert f'make train-cag ARGS="{" ".join(args)}"' in out     # force=... is not carried into the command


# ----------------------------------------------------------------------------- a copied output tree
def _change(path: Path) -> None:
    coco = read_json(path)
    coco["annotations"][0]["bbox"] = [1, 1, 5, 5]
    write_json(path, coco)


def test_a_copied_tree_is_checked_against_its_own_files(tmp_path):
    """`cp -a outputs /tmp/o2`, re-mine in the copy: the copy's downstream stages are stale, the original's
    are not; a change in the original does not make the copy stale."""
    orig = make_experiment(tmp_path / "outputs", tmp_path / "data")
    shutil.copytree(tmp_path / "outputs", tmp_path / "o2")
    copy = tmp_path / "o2" / "voc07" / "dino_vits16"
    _change(copy / "mine" / "pseudo_boxes.json")
    states = by_stage(pipeline_status(copy))
    assert {k: s.state for k, s in states.items()} == {"mine": "done", "cag": "stale", "cluster/lost/k2": "stale",
                                                       "cad": "stale", "cad/eval_trainval": "stale"}
    assert any("mine/pseudo_boxes.json" in c for c in states["cag"].changed)
    assert all(s.state == "done" for s in pipeline_status(orig))
    # the other way round: the original's clusters change, the copy's train-cad read the copy's clusters
    shutil.rmtree(tmp_path / "o2")
    shutil.copytree(tmp_path / "outputs", tmp_path / "o2")
    _change(orig / "cluster" / "lost" / "k2" / "pseudo_labels.json")
    assert by_stage(pipeline_status(orig))["cad"].state == "stale"
    assert all(s.state == "done" for s in pipeline_status(copy)), format_status(pipeline_status(copy))


def test_a_copied_tree_with_a_relative_output_root(tmp_path, monkeypatch):
    """The default output root is relative (``outputs``): the manifests then record relative paths; a copy
    checked from the same directory still reads its own files."""
    monkeypatch.chdir(tmp_path)
    make_experiment(Path("outputs"), tmp_path / "data", stages=("mine", "cag"))
    man = read_json(Path("outputs/voc07/dino_vits16/cag/manifest.json"))
    assert man["inputs"]["pseudo_boxes"]["path"] == "outputs/voc07/dino_vits16/mine/pseudo_boxes.json"
    shutil.copytree("outputs", "o2")
    _change(Path("o2/voc07/dino_vits16/mine/pseudo_boxes.json"))
    for root in (Path("o2/voc07/dino_vits16"), tmp_path / "o2" / "voc07" / "dino_vits16"):
        assert by_stage(pipeline_status(root))["cag"].state == "stale"
    assert by_stage(pipeline_status(Path("outputs/voc07/dino_vits16")))["cag"].state == "done"


def test_a_stage_dir_checked_alone_finds_its_tree(tmp_path):
    """stage_state(dir) without the tree's root (as the train stage's tests call it) re-roots by the
    stage dir the manifest recorded."""
    make_experiment(tmp_path / "outputs", tmp_path / "data", stages=("mine", "cag"))
    shutil.copytree(tmp_path / "outputs", tmp_path / "o2")
    _change(tmp_path / "o2" / "voc07" / "dino_vits16" / "mine" / "pseudo_boxes.json")
    assert stage_state(tmp_path / "o2" / "voc07" / "dino_vits16" / "cag").state == "stale"
    assert stage_state(tmp_path / "outputs" / "voc07" / "dino_vits16" / "cag").state == "done"


def test_commands_pick_the_run_of_each_stage(tmp_path):
    """A stale stage's command selects its own run (miner, cluster K, the cluster run of cad, the evaluated
    image set) over what the ARGS say, and asks for FORCE=1: it has finished results."""
    base = make_experiment(tmp_path / "out", tmp_path / "data")
    shutil.copytree(base / "mine", base / "mine_maskcut_q")
    man = base / "mine_maskcut_q" / "manifest.json"
    write_json(man, {**read_json(man), "annotations_digest": "before"})   # its CorLoc scored other annotations
    _change(base / "mine" / "pseudo_boxes.json")
    states = by_stage(pipeline_status(base, layout_for(base), annotations_digest="changed"))
    args = ["dataset=voc07", "miner=lost", "cluster.k=20"]
    cmd = functools.partial(next_command, args=args)
    assert cmd(states["mine_maskcut_q"]) == \
        'make mine FORCE=1 ARGS="dataset=voc07 miner=maskcut cluster.k=20 backbone.feature=q"'
    assert cmd(states["cag"]) == 'make train-cag FORCE=1 ARGS="dataset=voc07 miner=lost cluster.k=20"'
    assert cmd(states["cluster/lost/k2"]) == 'make cluster FORCE=1 ARGS="dataset=voc07 miner=lost cluster.k=2"'
    assert cmd(states["cad"]) == \
        'make train-cad FORCE=1 ARGS="dataset=voc07 miner=lost cluster.k=20 train_cad.cluster_run=lost/k2"'
    assert cmd(states["cad/eval_trainval"]) == 'make evaluate-cad FORCE=1 ARGS="dataset=voc07 miner=lost cluster.k=20"'
    assert next_command(states["cad/eval_trainval"], ["dataset.image_set=test"]) == \
        'make evaluate-cad FORCE=1 ARGS="dataset.image_set=trainval"'
    assert next_command(states["cag"], None) == \
        f'make train-cag FORCE=1 ARGS="dataset=voc07 backbone=dino_vits16 paths.output_root={tmp_path / "out"}"'


# ----------------------------------------------------------------------------- one chain per miner
DOWNSTREAM = ("mine", "cag", "cag_eval", "clusters", "cluster_features", "cluster", "cad", "cad_eval")


def test_lost_and_tokencut_chains_write_separate_folders():
    """Every folder of a chain is keyed by its miner (and feature) as the mine folder is: a TokenCut chain
    never writes into a LOST chain's detector or clusters, and LOST's folders are where they always were
    (a chain run before is still up to date)."""
    from omegaconf import OmegaConf

    for stage in ("mine", "train_cag", "evaluate_cag", "cluster", "train_cad", "evaluate_cad"):
        lost, tok = (compose_cfg(stage, [f"miner={m}", "dataset=voc07"]) for m in ("lost", "tokencut"))
        ld, td = (OmegaConf.to_container(c.dirs, resolve=True) for c in (lost, tok))
        li, ti = (OmegaConf.to_container(c.inputs, resolve=True) for c in (lost, tok))
        assert all(ld[k] != td[k] for k in DOWNSTREAM), (stage, ld, td)
        assert all(li[k] != ti[k] for k in li) and lost.stage_dir != tok.stage_dir
        assert ld["report"] == td["report"]
    base = "outputs/voc07/dino_vits16"
    assert {k: ld[k] for k in DOWNSTREAM} == {
        "mine": f"{base}/mine", "cag": f"{base}/cag", "cag_eval": f"{base}/cag/eval_trainval",
        "clusters": f"{base}/cluster", "cluster_features": f"{base}/cluster/lost/features",
        "cluster": f"{base}/cluster/lost/k20", "cad": f"{base}/cad", "cad_eval": f"{base}/cad/eval_trainval"}
    assert li["pseudo_labels"] == f"{base}/cluster/lost/k20/pseudo_labels.json"
    assert td["cad"] == f"{base}/cad_tokencut" and td["cluster"] == f"{base}/cluster_tokencut/lost/k20"
    q = OmegaConf.to_container(compose_cfg("train_cad", ["backbone.feature=q", "dataset=voc07"]).dirs, resolve=True)
    assert q["cag"] == f"{base}/cag_q" and q["mine"] == f"{base}/mine_q"


def test_status_and_report_find_both_chains(tmp_path, capsys):
    """A LOST and a TokenCut chain of one dataset: `make status` and `make report` list every stage of
    both, each with its own state (TokenCut's re-mined boxes make only its own chain stale) and a command
    that selects its chain."""
    from stages.report import run as report
    from stages.status import run as status

    out = tmp_path / "out"
    base = make_experiment(out, tmp_path / "data")
    make_experiment(out, tmp_path / "data", miner="tokencut")
    _change(base / "mine_tokencut" / "pseudo_boxes.json")
    args = [f"paths.output_root={out}", "dataset=voc07"]
    states = by_stage(status(compose_cfg("status", args), overrides=args))
    lost = ("mine", "cag", "cluster/lost/k2", "cad", "cad/eval_trainval")
    tok = ("mine_tokencut", "cag_tokencut", "cluster_tokencut/lost/k2", "cad_tokencut", "cad_tokencut/eval_trainval")
    assert set(states) == {*lost, *tok}
    assert [states[s].state for s in lost] == ["done"] * 5
    assert [states[s].state for s in tok] == ["done"] + ["stale"] * 4
    assert "mine_tokencut/pseudo_boxes.json" in " ".join(states["cag_tokencut"].changed)
    assert next_command(states["cad_tokencut"], args) == \
        f'make train-cad FORCE=1 ARGS="{" ".join(args)} miner=tokencut train_cad.cluster_run=lost/k2"'
    assert next_command(states["cluster_tokencut/lost/k2"], [*args, "miner=lost"]) == \
        f'make cluster FORCE=1 ARGS="{" ".join(args)} miner=tokencut cluster.k=2"'
    text = capsys.readouterr().out
    assert all(re.search(rf"^{re.escape(s)}\s", text, re.M) for s in (*lost, *tok))
    # the report: the same states; both mining runs and both chains' cluster runs; the detectors of the
    # chain its ARGS name (miner=tokencut: TokenCut's)
    summary = report(compose_cfg("report", [*args, "miner=tokencut"]), overrides=[*args, "miner=tokencut"])
    rows = {r["stage"]: r for r in summary["provenance"]["stages"]}
    assert {k: r["state"] for k, r in rows.items()} == {k: s.state for k, s in states.items()}
    assert [m["stage"] for m in summary["mining"]] == ["mine_tokencut", "mine"]
    assert [c["stage"] for c in summary["cluster"]] == ["cluster_tokencut/lost/k2", "cluster/lost/k2"]
    assert summary["train_cag"]["stage"] == "cag_tokencut" and summary["train_cag"]["status"]["state"] == "stale"
    assert [e["status"]["stage"] for e in summary["evaluate_cad"]] == ["cad_tokencut/eval_trainval"]
    assert [t["stage"] for t in summary["other_detectors"]] == ["cag", "cad"]     # LOST's, in their own sections
    assert summary["other_detectors"][0]["status"]["state"] == "done" and "other-detectors" in summary["sections"]
    html = Path(summary["index"]).read_text()
    assert 'id="cluster_tokencut-lost-k2"' in html and 'id="cluster-lost-k2"' in html
    assert 'id="cag"' in html and 'id="cad"' in html and 'id="train-cag"' in html


def test_the_typed_reader_reads_what_a_real_mining_run_wrote(folder, tmp_path):
    """pipeline.summaries reads the mine stage's own files: its failures, its journals, its manifest, and its
    pictures (each with the index of the image it shows, from the name mining_picture_name gives)."""
    from PIL import Image

    from pipeline.summaries import Manifest, MiningSummary, journal_counts, mining_picture_name

    base, _ = folder
    mine = base / "mine"
    s = MiningSummary.read(mine)
    assert s.failures == len(FOLDER_BAD) and s.images == 13 and len(s.failed_ids()) == len(FOLDER_BAD)
    assert journal_counts(mine) == (13 - len(FOLDER_BAD), len(FOLDER_BAD))
    shutil.rmtree(mine / "viz", ignore_errors=True)
    (mine / "viz").mkdir()
    for i in (0, 1, 10):
        Image.new("RGB", (4, 4)).save(mine / "viz" / mining_picture_name(i, f"sub/img{i}.png"))
    (mine / "viz" / "notes.png").write_bytes(b"")
    pics = MiningSummary.read(mine).pictures()
    assert [(p.path.name, p.index) for p in pics] == [("000000_img0.png", 0), ("000001_img1.png", 1),
                                                      ("000010_img10.png", 10), ("notes.png", None)]
    man = Manifest.read(mine)
    assert man.config["stage_dir"] and man.section("miner")["name"] == "lost" and "pseudo_boxes" not in man.inputs
    assert Manifest.read(base / "cag") is None and MiningSummary.read(base / "cag").failures == 0
