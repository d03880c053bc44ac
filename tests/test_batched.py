"""Fast mining pieces: batched features (exact path bit-identical), batched LOST, precision guard, processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbones import build_backbone, group_by_size
from pipeline.backbones import precision as prec
from pipeline.discovery import dinoseg, lost, run_miner
from pipeline.discovery import build_miner
from pipeline.discovery.batched import lost_batch
from pipeline.parallel import WorkerError, choose_cpu_workers, run_parallel

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vits16():
    return build_backbone("dino_vits16", init="random", seed=1)


def _imgs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


EQUAL = [(32, 48)] * 3
MIXED = [(32, 48), (48, 32), (32, 48)]  # two sizes, interleaved


def _same(a, b):
    return a.dims == b.dims and torch.equal(a.feats, b.feats) and (
        (a.cls_attn is None and b.cls_attn is None) or torch.equal(a.cls_attn, b.cls_attn))


# --------------------------------------------------------------------------- batched features
@pytest.mark.parametrize("sizes", [EQUAL, MIXED], ids=["equal", "mixed"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("which", ["k", "tokens"])
def test_features_batch_exact_is_bit_identical_to_one_by_one(vits16, sizes, n, which):
    imgs = _imgs(sizes[:n])
    one = [vits16.features(im[None], which=which, with_cls_attn=True) for im in imgs]
    got = vits16.features_batch(imgs, which=which, with_cls_attn=True)  # CPU fp32: exact by default
    assert len(got) == n
    for a, b in zip(got, one):
        assert a.feats.shape[0] == 1 and _same(a, b)


def test_features_batch_grouped_path_keeps_order_and_agrees(vits16):
    imgs = _imgs(MIXED + [(48, 32)])
    one = [vits16.features(im[None], with_cls_attn=True) for im in imgs]
    got = vits16.features_batch(imgs, with_cls_attn=True, exact=False, max_batch=2)
    for a, b in zip(got, one):
        assert a.dims == b.dims and a.feats.shape == b.feats.shape
        torch.testing.assert_close(a.feats, b.feats, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.cls_attn, b.cls_attn, rtol=0, atol=1e-5)


def test_group_by_size():
    imgs = _imgs([(16, 32), (32, 16), (16, 32), (16, 32), (32, 16)])
    assert group_by_size(imgs, 2) == [[0, 2], [3], [1, 4]]
    assert group_by_size(imgs, 8) == [[0, 2, 3], [1, 4]]


def test_features_batch_rejects_bad_input(vits16):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        vits16.features_batch([torch.zeros(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="max_batch"):
        vits16.features_batch(_imgs([(32, 32)]), max_batch=0)


# --------------------------------------------------------------------------- batched LOST
def _assert_lost_equal(a, b):
    assert a.seed == b.seed and a.score == b.score
    assert a.box.tolist() == b.box.tolist()
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.degree, b.degree)
    assert np.array_equal(a.potentials, b.potentials) and np.array_equal(a.similars, b.similars)
    assert np.array_equal(a.map, b.map)


@pytest.mark.parametrize("kind", ["ties", "gauss"])
def test_lost_batch_equals_lost(kind):
    rng = np.random.default_rng(3)
    h, w, b = 7, 9, 5
    for trial in range(4):
        if kind == "ties":  # small integer features: many equal degrees, exact products
            f = rng.integers(-2, 3, size=(b, h * w, 4)).astype(np.float32)
        else:
            f = rng.standard_normal((b, h * w, 16)).astype(np.float32)
        if trial == 0:
            f[1] = 0.0  # all-zero features: the whole-image fallback
        feats = torch.from_numpy(f)
        sizes = [(h * 16 - i, w * 16 - 2 * i) for i in range(b)]
        k = [100, 5, 20, 1][trial]
        got = lost_batch(feats, (h, w), 16, sizes, k_patches=k)
        assert len(got) == b
        for i in range(b):
            _assert_lost_equal(got[i], lost(feats[i], (h, w), 16, sizes[i], k_patches=k))


def test_lost_batch_errors():
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        lost_batch(torch.zeros(4, 3), (2, 2), 16, [(32, 32)])
    with pytest.raises(ValueError, match="image sizes"):
        lost_batch(torch.zeros(2, 4, 3), (2, 2), 16, [(32, 32)])
    with pytest.raises(ValueError, match="NaN"):
        lost_batch(torch.full((1, 4, 3), float("nan")), (2, 2), 16, [(32, 32)])


def test_mine_batch_matches_one_image_at_a_time(vits16):
    imgs = _imgs(MIXED + [(48, 48)], seed=5)
    outs = vits16.features_batch(imgs, with_cls_attn=True)
    sizes = [(im.shape[1] - 3, im.shape[2] - 1) for im in imgs]
    got = build_miner("lost", 16, k_patches=50).mine_batch(outs, sizes)
    for o, s, r in zip(outs, sizes, got):
        _assert_lost_equal(r, run_miner("lost", o, s, patch_size=16, k_patches=50))
    got = build_miner("dinoseg", 16, head=2).mine_batch(outs, sizes)  # no batched math: one by one
    for o, s, r in zip(outs, sizes, got):
        ref = dinoseg(o.cls_attn[0], o.dims, 16, s, head=2)
        assert r.box.tolist() == ref.box.tolist() and np.array_equal(r.mask, ref.mask)
    with pytest.raises(ValueError, match="2 image sizes"):
        build_miner("lost", 16).mine_batch(outs, sizes[:2])

def test_precision_guard(monkeypatch):
    with pytest.raises(ValueError, match="fp16 is not supported on a CPU"):
        build_backbone("dino_vits16", init="random", precision="fp16")
    with pytest.raises(ValueError, match="unknown backbone precision"):
        build_backbone("dino_vits16", init="random", precision="int8")
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"bf16 on this CPU is about 5-12x slower than float32 \(no native bf16 units"):
        build_backbone("dino_vits16", init="random", precision="bf16")
    assert prec.check_precision("bf16", "cpu", force=True) == "bf16"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.check_precision("bf16", "cpu") == "bf16"
    assert prec.check_precision("fp32", "cpu") == "fp32"


def test_fp32_unchanged_and_forced_bf16_close(vits16):
    img = _imgs([(32, 48)], seed=9)[0][None]
    ref = vits16.features(img, with_cls_attn=True)
    fp32 = build_backbone("dino_vits16", init="random", seed=1, precision="fp32")
    assert fp32.describe() == vits16.describe() and fp32.exact
    assert _same(fp32.features(img, with_cls_attn=True), ref)
    bf16 = build_backbone("dino_vits16", init="random", seed=1, precision="bf16", force_precision=True)
    assert not bf16.exact and bf16.describe()["precision"] == "bf16"
    out = bf16.features(img, with_cls_attn=True)
    assert out.feats.dtype == torch.float32 and out.cls_attn.dtype == torch.float32
    assert not torch.equal(out.feats, ref.feats)  # really ran in bf16
    cos = torch.nn.functional.cosine_similarity(out.feats[0], ref.feats[0], dim=-1)
    assert cos.min() > 0.9
    assert not any(blk.attn.fused_attn for blk in bf16.model.blocks)  # restored after the forward


# --------------------------------------------------------------------------- processes
def test_choose_cpu_workers():
    assert choose_cpu_workers(60, 2) == 2
    assert choose_cpu_workers(60, 16) == 7          # >= 8 images per worker
    assert choose_cpu_workers(5, 16) == 1           # too few images to pay a worker's start-up
    assert choose_cpu_workers(0, 4) == 1
    assert choose_cpu_workers(1000, 1) == 1
    with pytest.raises(ValueError):
        choose_cpu_workers(10, 0)


def test_run_parallel_shards_like_journals():
    got = []
    res = run_parallel("parallel_targets:shard_target", 2, kwargs={"n": 7}, on_message=lambda s, m: got.append((s, m)))
    assert res == [0, 10]
    assert sorted(m["index"] for _, m in got) == list(range(7))
    assert all(m["index"] % 2 == s and m["threads"] == 1 for s, m in got)  # shard i: i, i+N, ...; 1 thread
    with pytest.raises(WorkerError, match="boom in shard 0"):
        run_parallel("parallel_targets:failing_target", 1, start_method="fork")
    with pytest.raises(ValueError, match="module:function"):
        run_parallel("no_colon", 1)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_workers_stop_when_the_parent_is_killed(tmp_path, start_method):
    """A SIGKILLed parent leaves no worker computing for nobody: the next row it sends ends it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.parallel import fork_available

    if start_method == "fork" and not fork_available():
        pytest.skip("no fork on this platform")
    pid_file = tmp_path / "worker.pid"
    code = ("import sys; sys.path.insert(0, 'tests'); from pipeline.parallel import run_parallel; "
            f"run_parallel('parallel_targets:orphan_target', 1, start_method={start_method!r}, "
            f"kwargs={{'pid_file': {str(pid_file)!r}}})")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)  # still there?
        except ProcessLookupError:
            break
        with open(f"/proc/{worker}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":  # exited, not yet reaped
                break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker went on after its parent was killed")


def test_run_parallel_fork_shares_built_objects():
    """Forked workers get the parent's objects as they are (nothing pickled: a lambda and a model travel),
    run one thread, and shard like spawned ones; fork refuses more than one thread per worker."""
    from pipeline.parallel import fork_available

    if not fork_available():
        pytest.skip("no fork on this platform")
    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    want = torch.cat([model(x[i:i + 1]) for i in range(5)]).detach()  # row by row, as the workers (a batched
    got = {}                                                          # product may round differently)

    def target(shard, num_shards, emit, model, rows, scale):
        for i in range(shard, len(rows), num_shards):
            emit((i, scale(model(rows[i:i + 1]).detach()).tolist(), torch.get_num_threads()))
        return shard

    res = run_parallel(target, 2, start_method="fork", kwargs={"model": model, "rows": x, "scale": lambda t: 2 * t},
                       on_message=lambda s, m: got.__setitem__(m[0], m[1:]))
    assert res == [0, 1] and sorted(got) == list(range(5))
    assert all(got[i][0] == (2 * want[i:i + 1]).tolist() and got[i][1] == 1 for i in got)
    with pytest.raises(ValueError, match="one thread per worker"):
        run_parallel(target, 2, start_method="fork", threads_per_proc=2, kwargs={})


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
def test_cuda_lost_batch_boxes_equal_cpu():
    rng = np.random.default_rng(11)
    h, w = 12, 17
    for k in (100, 7):
        f = torch.from_numpy(rng.integers(-2, 3, size=(16, h * w, 6)).astype(np.float32))  # exact products
        sizes = [(h * 16 - i % 5, w * 16 - i % 7) for i in range(16)]
        got = lost_batch(f.cuda(), (h, w), 16, sizes, k_patches=k)
        for i in range(16):
            ref = lost(f[i], (h, w), 16, sizes[i], k_patches=k)
            assert got[i].seed == ref.seed and got[i].box.tolist() == ref.box.tolist()
            assert np.array_equal(got[i].mask, ref.mask) and np.array_equal(got[i].degree, ref.degree)
            assert np.array_equal(got[i].similars, ref.similars) and np.array_equal(got[i].map, ref.map)


@cuda
def test_cuda_lost_batch_equals_cuda_lost_on_float_features():
    f = torch.randn(8, 300, 64, generator=torch.Generator().manual_seed(0)).cuda()
    got = lost_batch(f, (15, 20), 16, [(240, 320)] * 8)
    for i in range(8):
        _assert_lost_equal(got[i], lost(f[i], (15, 20), 16, (240, 320)))


@cuda
def test_cuda_features_batch_exact_and_grouped():
    b = build_backbone("dino_vits16", init="random", seed=1, device="cuda")
    imgs = _imgs(MIXED + [(64, 48)], seed=2)
    one = [b.features(im[None], with_cls_attn=True) for im in imgs]
    for a, r in zip(b.features_batch(imgs, with_cls_attn=True, exact=True), one):
        assert _same(a, r)
    for a, r in zip(b.features_batch(imgs, with_cls_attn=True), one):  # grouped on CUDA by default
        torch.testing.assert_close(a.feats, r.feats, rtol=0, atol=1e-3)
    cpu = build_backbone("dino_vits16", init="random", seed=1)
    ref = cpu.features(imgs[0][None])
    torch.testing.assert_close(one[0].feats.cpu(), ref.feats, rtol=0, atol=1e-3)  # no TF32 in fp32 mode
    for p in ("bf16", "fp16"):
        rb = build_backbone("dino_vits16", init="random", seed=1, device="cuda", precision=p)
        out = rb.features_batch(imgs, with_cls_attn=True)
        cos = torch.nn.functional.cosine_similarity(out[0].feats[0].cpu(), ref.feats[0], dim=-1)
        assert out[0].feats.dtype == torch.float32 and cos.min() > 0.9, p
