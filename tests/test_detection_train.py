"""pipeline.detection.trainer: LR schedule, exact kill-and-resume, checkpoints, metrics, DDP on CPU."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.detection.builders import build_detector
from pipeline.detection.data import DetectionDataset
from pipeline.detection.trainer import TrainResult, init_distributed, lr_factor, param_groups, train

TINY = dict(min_size=(56, 64), max_size=96, rpn_topk=(60, 20, 60, 10), batch_size_per_image=16,
            rpn_batch_size_per_image=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic_dataset(root, n=6, seed=0, write=True) -> DetectionDataset:
    """n small images, each with one or two bright rectangles and their boxes (``write=False``: the images
    exist already; concurrent processes must not rewrite files another one is reading)."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        a = (rng.random((60, 80, 3)) * 60).astype(np.uint8)
        for _ in range(1 + i % 2):
            x, y = int(rng.integers(0, 50)), int(rng.integers(0, 30))
            w, h = int(rng.integers(12, 30)), int(rng.integers(12, 30))
            a[y:y + h, x:x + w] = 230
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "bbox": [x, y, min(w, 80 - x), min(h, 60 - y)],
                         "category_id": 1})
        if write:
            Image.fromarray(a).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 80, "height": 60})
    return DetectionDataset({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}, root)


def test_lr_schedule_by_hand():
    f = lambda it: lr_factor(it, warmup_iters=10, warmup_factor=0.001, steps=(20, 30), gamma=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == pytest.approx(1.0) and f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1) and f(29) == pytest.approx(0.1)
    assert f(30) == pytest.approx(0.01) and f(10**6) == pytest.approx(0.01)


def test_no_weight_decay_on_norm_layers():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    m[0].bias.requires_grad_(False)
    groups = param_groups(m, 1e-4, 0.0)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(m[1].weight), id(m[1].bias)}
    assert len(groups[0]["params"]) == 3  # conv weight, linear weight + bias (frozen conv bias left out)


def _run(out_dir, ds, model_seed=0, **kw) -> tuple[nn.Module, TrainResult]:
    torch.manual_seed(1234 + model_seed)  # the global RNG must not matter: train() seeds it
    model = build_detector("mobilenet_fpn", 1, seed=model_seed, **TINY)
    args = dict(out_dir=out_dir, iterations=6, batch_size=2, lr=0.01, warmup_iters=2, steps=(4,),
                checkpoint_period=100, seed=7, progress=False, log_period=1)
    args.update(kw)
    return model, train(model, ds, **args)


def test_kill_and_resume_ends_with_the_same_weights(tmp_path):
    ds = _synthetic_dataset(tmp_path)
    full_model, full = _run(tmp_path / "full", ds)
    assert full.iteration == 6 and len(full.losses) == 6 and not full.stopped_early

    _, part = _run(tmp_path / "killed", ds, stop_after=3)
    assert part.iteration == 3 and part.stopped_early
    ckpt = torch.load(tmp_path / "killed" / "model.pt", weights_only=False)
    assert ckpt["iteration"] == 3 and {"model", "optimizer", "scheduler", "rng", "artifact_config"} <= set(ckpt)
    # a fresh process would build the model again (another seed proves the weights come from model.pt)
    resumed_model, resumed = _run(tmp_path / "killed", ds, model_seed=99, resume=True)
    assert (resumed.start_iteration, resumed.iteration) == (3, 6)
    np.testing.assert_allclose(part.losses + resumed.losses, full.losses, rtol=1e-5)
    a, b = full_model.state_dict(), resumed_model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4, 5, 6]
    # LR in the log follows the schedule: base 0.01, warm-up 2, x0.1 from iteration index 4
    expected = [0.01 * lr_factor(i, 2, 0.001, (4,), 0.1) for i in range(6)]
    np.testing.assert_allclose([x["lr"] for x in lines], expected, rtol=1e-9)
    # resuming a finished run does nothing
    _, again = _run(tmp_path / "killed", ds, resume=True)
    assert again.iteration == 6 and again.losses == []


def test_resume_without_checkpoint_warns_and_starts_over(tmp_path):
    ds = _synthetic_dataset(tmp_path, n=2)
    with pytest.warns(UserWarning, match="does not exist: training from scratch"):
        _, r = _run(tmp_path / "fresh", ds, resume=True, iterations=1)
    assert r.iteration == 1 and (tmp_path / "fresh" / "model.pt").is_file()


def test_non_finite_loss_is_a_clear_error(tmp_path):
    ds = _synthetic_dataset(tmp_path, n=2)
    with pytest.raises(FloatingPointError, match="iteration"):
        _run(tmp_path / "nan", ds, lr=1e12, warmup_iters=0, iterations=6)


class _ToyDetector(nn.Module):
    """A detector-shaped toy: regresses each box from the image's mean colour (loss = mean over images)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)

    def forward(self, images, targets):
        feats = torch.stack([im.mean(dim=(1, 2)) for im in images])
        goal = torch.stack([t["boxes"][0] / 80.0 for t in targets])
        return {"loss_toy": ((self.lin(feats) - goal) ** 2).mean()}


def _ddp_worker(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert init_distributed() == (rank, world)
    ds = _synthetic_dataset(root, write=False)
    model = _ToyDetector()
    train(model, ds, out_dir=out, iterations=5, batch_size=4, lr=0.1, warmup_iters=0, seed=3, progress=False)
    torch.distributed.destroy_process_group()


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    assert init_distributed() == (0, 1)  # no torchrun environment: a no-op
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ds = _synthetic_dataset(tmp_path)  # written once, before the workers read it
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, tmp_path, tmp_path / "ddp"), nprocs=2, join=True)
    single = _ToyDetector()
    train(single, ds, out_dir=tmp_path / "one", iterations=5, batch_size=4, lr=0.1, warmup_iters=0, seed=3,
          progress=False)
    ddp_state = torch.load(tmp_path / "ddp" / "model.pt", weights_only=False)["model"]
    assert not torch.allclose(ddp_state["lin.weight"], _ToyDetector().lin.weight)  # it trained
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_tensorboard_gets_the_logged_scalars_when_installed(tmp_path, monkeypatch):
    import pipeline.detection.hooks as hooks

    class Writer:
        scalars: list = []
        closed = False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def close(self):
            Writer.closed = True

    monkeypatch.setattr(hooks, "_tensorboard", lambda out_dir: Writer())
    ds = _synthetic_dataset(tmp_path, n=2)
    _run(tmp_path / "tb", ds, iterations=2, log_period=1)
    tags = {t for t, _ in Writer.scalars}
    assert {"train/loss", "train/lr", "train/loss_classifier"} <= tags
    assert sorted({s for _, s in Writer.scalars}) == [1, 2] and Writer.closed
    logged = [json.loads(x) for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in logged] == [1, 2]
