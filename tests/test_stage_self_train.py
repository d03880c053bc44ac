"""The self-train stage (issue 18, part 4): rounds on train-cag's detector, each a folder with its pseudo-labels, model,
metrics and pictures; reruns are up to date, a changed threshold is refused, FORCE redoes them, a killed round
resumes to the weights of an uninterrupted one; `make status` lists the rounds. Random weights, smoke schedule: a
test of the code, never a result."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts import sha256_file
from pipeline.detection.self_training import SelfTrainSettings
from pipeline.status import pipeline_status
from stage_utils import compose_cfg

SMOKE = ["backbone.init=random", "detector.init=random", "schedule=smoke", "num_workers=0", "progress=false",
         "mine.procs=1", "viz.num_images=1", "viz.contact_sheet=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _artifact(path):
    return torch.load(path, map_location="cpu", weights_only=False)["artifact_config"]


def test_rounds_with_masks_rerun_refusal_force_and_status(tmp_path, coco_tiny, capsys):
    from stages.common import run_guarded
    from stages.mine import run as mine
    from stages.self_train import run as self_train
    from stages.train_cag import run as train_cag

    data = [f"paths.output_root={tmp_path}", "dataset=coco", f"dataset.root={coco_tiny}", "dataset.max_images=2",
            "miner=maskcut", *SMOKE, "detector=mask_mobilenet_fpn", "train_cag.drop_loss_iou=0.01"]
    rounds = [*data, "self_train.rounds=2", "self_train.score_thresholds=[0.0]", "self_train.max_per_image=2"]
    mine(compose_cfg("mine", data))
    train_cag(compose_cfg("train_cag", data))
    table = self_train(compose_cfg("self_train", rounds))
    cag = tmp_path / "coco" / "dino_vits16" / "cag_maskcut"
    assert [r["round"] for r in table] == [0, 1, 2]
    for r in (1, 2):
        d = cag / f"round{r}"
        assert {"pseudo_labels.json", "model.pt", "metrics.json", "manifest.json", "detections.json"} <= \
            {p.name for p in d.iterdir()} and any((d / "viz").glob("*.png"))
        labels = json.loads((d / "pseudo_labels.json").read_text())
        st = labels["info"]["self_training"]
        # threshold 0: every image keeps its 2 best predictions (with their masks), and the objects they miss
        assert st["prediction"] == 4 and st["prediction"] + st["previous"] == len(labels["annotations"])
        assert all(isinstance(a["segmentation"], dict) for a in labels["annotations"])
        previous = cag / (f"round{r - 1}" if r > 1 else "../mine_maskcut") / \
            ("pseudo_labels.json" if r > 1 else "pseudo_boxes.json")
        assert st["made_from"]["labels_sha256"] == sha256_file(previous)
        art = _artifact(d / "model.pt")
        start = cag / (f"round{r - 1}" if r > 1 else ".") / "model.pt"
        assert art["init_sha256"] == sha256_file(start) and art["self_train"] == {"round": r, "score_threshold": 0.0}
        assert "recipe" not in art  # DropLoss off in the rounds (train-cag's was on)
    assert _artifact(cag / "model.pt")["recipe"] == {"drop_loss_iou": 0.01}

    capsys.readouterr()
    before = {r: (cag / f"round{r}" / "model.pt").stat().st_mtime_ns for r in (1, 2)}
    self_train(compose_cfg("self_train", rounds))
    assert capsys.readouterr().out.count("is up to date") == 2
    assert before == {r: (cag / f"round{r}" / "model.pt").stat().st_mtime_ns for r in (1, 2)}

    labels_before = (cag / "round1" / "pseudo_labels.json").read_bytes()
    with pytest.raises(SystemExit) as e:  # another threshold over finished rounds: one line, nothing touched
        run_guarded(self_train, compose_cfg("self_train", [*rounds, "self_train.score_thresholds=[0.5]"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "score_threshold: 0.0 -> 0.5" in err and "FORCE=1" in err
    assert before[1] == (cag / "round1" / "model.pt").stat().st_mtime_ns
    assert (cag / "round1" / "pseudo_labels.json").read_bytes() == labels_before  # the finished round's labels kept

    from stages.locations import layout_of

    status_cfg = compose_cfg("status", rounds)
    states = {s.stage: s for s in pipeline_status(tmp_path / "coco" / "dino_vits16", layout_of(status_cfg))}
    assert states["cag_maskcut/round2"].state == "done" and states["cag_maskcut/round2"].target == "self-train"
    from pipeline.status import format_status
    from stages.report import run as report

    table = format_status(list(states.values())).split("self-training rounds of cag_maskcut:")[1].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["0", "1", "2"]
    summary = report(compose_cfg("report", rounds))
    assert [r["round"] for r in summary["train_cag"]["rounds"]] == [0, 1, 2]
    assert (tmp_path / "coco" / "dino_vits16" / "report" / summary["train_cag"]["rounds_plot"]).is_file()

    self_train(compose_cfg("self_train", [*rounds, "self_train.score_thresholds=[0.5]", "self_train.rounds=1",
                                          "force=true"]))
    assert capsys.readouterr().out.count("results swapped into") == 1
    assert json.loads((cag / "round1" / "pseudo_labels.json").read_text())["info"]["self_training"][
        "score_threshold"] == 0.5
    assert not any(p.name.startswith(".") for p in cag.iterdir())  # no work folder left behind

    from stages.evaluate_cag import run as evaluate_cag

    last = [*rounds, "evaluate_cag.model=${inputs.self_train_model}", "viz.num_images=0"]  # round 2's detector
    assert evaluate_cag(compose_cfg("evaluate_cag", last))["model"] == str(cag / "round2" / "model.pt")
    capsys.readouterr()
    evaluate_cag(compose_cfg("evaluate_cag", last))
    assert "is up to date" in capsys.readouterr().out  # the same model, images and settings: nothing redone


def test_a_killed_round_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, voc07_mini, capsys):
    from stages.common import run_guarded
    from stages.mine import run as mine
    from stages.self_train import run as self_train
    from stages.train_cag import run as train_cag

    data = [f"paths.output_root={tmp_path}", "dataset=voc07", f"dataset.root={voc07_mini}", "dataset.max_images=3",
            *SMOKE, "detector=mobilenet_fpn", "eval.enabled=false", "viz.num_images=0"]
    mine(compose_cfg("mine", data))
    train_cag(compose_cfg("train_cag", data))
    whole = self_train(compose_cfg("self_train", data))
    cag = tmp_path / "voc07" / "dino_vits16" / "cag"
    uninterrupted = torch.load(cag / "round1" / "model.pt", map_location="cpu", weights_only=False)["model"]
    assert [r["round"] for r in whole] == [0, 1]

    import shutil

    shutil.rmtree(cag / "round1")
    assert self_train(compose_cfg("self_train", [*data, "self_train.stop_after=2"])) is None
    with pytest.raises(SystemExit) as e:  # a partial round without resume: one line saying how to go on
        run_guarded(self_train, compose_cfg("self_train", data))
    assert e.value.code == 2 and "self_train.resume=true continues it" in capsys.readouterr().err
    self_train(compose_cfg("self_train", [*data, "self_train.resume=true"]))
    resumed = torch.load(cag / "round1" / "model.pt", map_location="cpu", weights_only=False)["model"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_settings_rules_and_the_threshold_of_each_round():
    s = SelfTrainSettings(score_thresholds=[0.7, 0.65])
    assert [s.threshold(r) for r in (1, 2, 3)] == [0.7, 0.65, 0.65]
    bad = SelfTrainSettings(rounds=0, score_thresholds=[1.5], iou_threshold=0.0)
    assert [p.split("=")[0] for p in bad.problems()] == ["rounds", "score_thresholds", "iou_threshold"]


def test_self_train_needs_a_trained_detector(tmp_path, voc07_mini, capsys):
    from stages.common import run_guarded
    from stages.self_train import run as self_train

    with pytest.raises(SystemExit) as e:
        run_guarded(self_train, compose_cfg("self_train", [f"paths.output_root={tmp_path}", "dataset=voc07",
                                                          f"dataset.root={voc07_mini}", *SMOKE]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "no finished class-agnostic detector" in err and \
        "make train-cag" in err
