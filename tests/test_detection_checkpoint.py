"""pipeline.detection.checkpoint and the trainer's pieces: DetectorSpec, load_detector, Schedule, hooks;
and the module boundaries (scoring without the detector package, evaluation stages without training)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.artifacts import ArtifactError
from pipeline.detection.checkpoint import FORMAT, Checkpointer, DetectorSpec, load_detector
from pipeline.detection.settings import DetectorSettings
from pipeline.detection.trainer import Hook, Schedule, train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = dict(min_size=[56, 64], max_size=96, rpn_topk=[60, 20, 60, 10], batch_size_per_image=16,
            rpn_batch_size_per_image=32)


def test_schedule_fields_mirror_the_schedule_configs():
    from dataclasses import fields

    from stage_utils import compose_cfg
    from stages.common import to_container

    names = {f.name for f in fields(Schedule)}
    for path in sorted((REPO / "conf" / "schedule").glob("*.yaml")):
        d = to_container(compose_cfg("train_cag", [f"schedule={path.stem}"]).schedule)
        assert set(d) == names, path.name
        assert Schedule.from_dict(d).to_dict() == d, path.name
    smoke = Schedule.from_dict(to_container(compose_cfg("train_cag", ["schedule=smoke"]).schedule))
    assert (smoke.iterations, smoke.batch_size, smoke.steps, smoke.amp) == (4, 2, (3,), False)
    with pytest.raises(ValueError, match="unknown schedule key.*'iters'"):
        Schedule.from_dict({"iterations": 1, "batch_size": 1, "lr": 0.1, "iters": 3})


def test_spec_round_trips_and_load_detector_rebuilds_the_trained_model(tmp_path):
    spec = DetectorSpec.create(DetectorSettings("mobilenet_fpn", **TINY), 2, seed=5, category_ids=[3, 7],
                               category_names=["a", "b"])
    assert DetectorSpec.from_dict(spec.to_dict()) == spec and spec.random_init and spec.weights_sha256 is None
    model = spec.build_model()
    with torch.no_grad():  # make the weights differ from a fresh build of the spec
        for p in model.roi_heads.box_predictor.parameters():
            p.add_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ck = Checkpointer(tmp_path / "model.pt", spec=spec, schedule={"iterations": 10},
                      artifact_config={"seed": 0}, provenance={"stage": "unit"})
    ck.save(model, opt, sched, scaler, iteration=10)
    raw = torch.load(tmp_path / "model.pt", weights_only=False)
    assert raw["format"] == FORMAT and {"spec", "model", "optimizer", "scheduler", "iteration", "rng",
                                        "artifact_config", "provenance"} <= set(raw)
    loaded, spec2, meta = load_detector(tmp_path / "model.pt")
    assert spec2 == spec and spec2.category_ids == [3, 7] and not loaded.training
    assert meta["iteration"] == 10 and meta["complete"] and meta["provenance"] == {"stage": "unit"}
    image = [torch.rand(3, 60, 80)]
    model.eval()
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_older_or_foreign_checkpoints_are_a_clear_error(tmp_path):
    torch.save({"model": {}, "config": {"build": {}}, "detector_info": {}}, tmp_path / "old.pt")
    with pytest.raises(ArtifactError, match="older version.*retrained. FORCE=1 retrains it"):
        load_detector(tmp_path / "old.pt", hint="FORCE=1 retrains it.")  # the stage says how, in its keys
    with pytest.raises(ArtifactError, match="not found"):
        load_detector(tmp_path / "none.pt", hint="Run make train-cag.")


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, images, targets):
        feats = torch.stack([im.mean(dim=(1, 2)) for im in images])
        return {"loss_toy": ((self.lin(feats) - torch.stack([t["boxes"][0] / 80 for t in targets])) ** 2).mean()}


def test_extra_hooks_are_called_around_the_steps(tmp_path):
    from test_detection_train import _synthetic_dataset

    calls = []

    class Recorder(Hook):
        def before_train(self, trainer):
            calls.append(("before", trainer.start_iteration))

        def after_step(self, trainer):
            calls.append(("step", trainer.iteration, round(trainer.lr, 6), "loss_toy" in trainer.loss_dict))

        def after_train(self, trainer):
            calls.append(("after", trainer.iteration))

    ds = _synthetic_dataset(tmp_path, n=2)
    sch = Schedule(iterations=3, batch_size=2, lr=0.1, warmup_iters=0, checkpoint_period=2, log_period=1)
    res = train(_Toy(), ds, sch, out_dir=tmp_path / "run", progress=False, hooks=[Recorder()])
    assert res.iteration == 3
    assert calls == [("before", 0), ("step", 1, 0.1, True), ("step", 2, 0.1, True), ("step", 3, 0.1, True),
                     ("after", 3)]
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=False)["schedule"]["iterations"] == 3
    with pytest.raises(TypeError, match="either a Schedule or its fields"):
        train(_Toy(), ds, sch, out_dir=tmp_path / "x", lr=0.2)


def test_plan_checkpoint_decides_train_resume_report_or_refuses_without_naming_config_keys():
    from pipeline.rerun import CheckpointRefused, plan_checkpoint

    art = {"schedule": {"lr": 0.1}, "input_sha256": "a"}
    done = {"artifact_config": art, "iteration": 4, "schedule": {"iterations": 4}}
    half = {**done, "iteration": 2}
    assert plan_checkpoint("m.pt", None, art, resume=False) == "train"
    assert plan_checkpoint("m.pt", done, art, resume=False) == "report"
    assert plan_checkpoint("m.pt", half, art, resume=True) == "resume"
    with pytest.raises(CheckpointRefused, match=r"partial training \(iteration 2 of 4\) of this configuration$") as e:
        plan_checkpoint("m.pt", half, art, resume=False)
    assert e.value.kind == "partial"
    other = {"schedule": {"lr": 0.2}, "input_sha256": "b"}
    with pytest.raises(CheckpointRefused, match=r"cannot resume from m\.pt: a partial training .*\(the input changed "
                                                r"since; schedule\.lr: 0\.1 -> 0\.2\)$") as e:
        plan_checkpoint("m.pt", half, other, resume=True, inputs={"input_sha256": "the input"})
    assert e.value.kind == "changed" and "FORCE" not in str(e.value) and "resume=" not in str(e.value)


def test_a_training_can_start_from_a_previous_models_weights(tmp_path, voc07_mini):
    """A self-training round starts from the previous round's model: ``init_weights`` copies its weights (another
    number of classes is an error naming the file), and ``TrainParams.init_from`` records the file's hash in the
    trained model's artifact settings."""
    from pipeline.artifacts import coco_boxes_dataset, sha256_file, write_json
    from pipeline.data import build_dataset
    from pipeline.detection.checkpoint import init_weights
    from pipeline.detection.run import TrainParams, train_detector
    from pipeline.evaluation.settings import EvalSettings

    settings = DetectorSettings(preset="mobilenet_fpn", min_size=64, max_size=96)
    previous = DetectorSpec.create(settings, 1, seed=0)
    path = tmp_path / "previous.pt"
    torch.save({"format": FORMAT, "spec": previous.to_dict(), "model": previous.build_model().state_dict()}, path)
    fresh = DetectorSpec.create(settings, 1, seed=1).build_model()
    init_weights(fresh, path)
    want = previous.build_model().state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ArtifactError, match="do not fit this detector.*1 class"):
        init_weights(DetectorSpec.create(settings, 3, seed=0).build_model(), path)

    records = build_dataset("voc07", str(voc07_mini), max_images=2).records
    boxes = tmp_path / "boxes.json"
    write_json(boxes, coco_boxes_dataset(
        [{"id": r.coco_id, "file_name": r.path, "width": r.width, "height": r.height} for r in records],
        [{"image_id": r.coco_id, "bbox_xyxy": [float(v) for v in r.boxes[0]]} for r in records]))
    p = TrainParams(stage="round1", stage_dir=tmp_path / "round1", in_path=boxes, input_name="boxes",
                    class_agnostic=True, settings=settings, schedule=Schedule(iterations=1, batch_size=1, lr=0.001),
                    artifact={}, report={}, config={}, image_root=lambda coco: tmp_path, dataset_records=lambda: records,
                    evaluation=EvalSettings(enabled=False), init_from=path)
    train_detector(p)
    trained = torch.load(tmp_path / "round1" / "model.pt", map_location="cpu", weights_only=False)
    assert trained["artifact_config"]["init_sha256"] == sha256_file(path)
