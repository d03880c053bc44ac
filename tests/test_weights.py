"""Weights: official DINO / full-checkpoint / timm files round-trip through the real loader; bad files fail clearly.

Nothing here touches the network: the downloader is monkeypatched in every test that could reach it.
"""
import argparse
import hashlib
import urllib.error

import pytest
import torch
from torch import nn

from pipeline.backbones import ARCHS, WeightsError, build_backbone

VITS16 = ARCHS["dino_vits16"]
R50 = ARCHS["dino_resnet50"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(url, dst, *a, **k):
        raise urllib.error.URLError(f"test: network disabled ({url})")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def src():
    """An in-memory ViT-S/16 (seed 3, not the loader's default 0) and its state dict."""
    b = build_backbone("dino_vits16", init="random", seed=3)
    return b, {k: v.clone() for k, v in b.model.state_dict().items()}


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))


def _same_features(a, b, x):
    fa, fb = a.features(x, with_cls_attn=True), b.features(x, with_cls_attn=True)
    return torch.equal(fa.feats, fb.feats) and torch.equal(fa.cls_attn, fb.cls_attn) and torch.equal(a.embed(x), b.embed(x))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_official_plain_state_dict_round_trip(src, x, tmp_path):
    b0, sd = src
    path = tmp_path / VITS16.weights_file
    torch.save(sd, path)
    b = build_backbone("dino_vits16", init="pretrained", weights=str(path), cache_dir=tmp_path / "cache")
    assert _same_features(b, b0, x)
    assert b.describe() == {"arch": "dino_vits16", "init": "pretrained", "weights_path": str(path),
                            "weights_sha256": _sha(path), "patch_size": 16}


def test_full_dino_checkpoint_uses_teacher(src, x, tmp_path):
    b0, sd = src
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher.update({"head.mlp.0.weight": torch.randn(2048, 384), "head.last_layer.weight_g": torch.ones(65536, 1)})
    student = {f"module.backbone.{k}": v + 1.0 for k, v in sd.items()}   # differs: must not be used
    student["module.head.mlp.0.weight"] = torch.randn(2048, 384)
    ckpt = {"student": student, "teacher": teacher, "optimizer": {"state": {}}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16), "dino_loss": {"center": torch.zeros(1, 65536)}}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    b = build_backbone("dino_vits16", weights=path)
    assert _same_features(b, b0, x)
    assert b.weights_sha256 == _sha(path)
    # a DDP-wrapped teacher ("module.backbone.") loads too
    torch.save({"teacher": {f"module.{k}": v for k, v in teacher.items()}}, path)
    assert _same_features(build_backbone("dino_vits16", weights=path), b0, x)


def test_timm_state_dict_with_classifier_head(src, x, tmp_path):
    b0, sd = src
    path = tmp_path / "timm_vit_small_dino.pth"
    torch.save({**sd, "head.weight": torch.randn(1000, 384), "head.bias": torch.zeros(1000)}, path)
    assert _same_features(build_backbone("dino_vits16", weights=path), b0, x)


def _expect_error(path, *needles, arch="dino_vits16"):
    with pytest.raises(WeightsError) as e:
        build_backbone(arch, weights=path)
    msg = str(e.value)
    for n in (str(path),) + needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_wrong_key_fails_naming_key_and_file(src, tmp_path):
    _, sd = src
    bad = dict(sd)
    bad["blocks.0.attn.qkv_weight"] = bad.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(bad, path)
    msg = _expect_error(path, "blocks.0.attn.qkv_weight", "blocks.0.attn.qkv.weight")
    assert "missing keys" in msg and "unexpected keys" in msg


def test_missing_key_fails(src, tmp_path):
    _, sd = src
    path = tmp_path / "missing.pth"
    torch.save({k: v for k, v in sd.items() if k != "norm.weight"}, path)
    _expect_error(path, "missing keys: norm.weight")


def test_wrong_shape_fails_naming_shapes(src, tmp_path):
    _, sd = src
    path = tmp_path / "vits16_into_vits8.pth"
    torch.save(sd, path)
    msg = _expect_error(path, "pos_embed: file (1, 197, 384) vs model (1, 785, 384)",
                        "patch_embed.proj.weight", arch="dino_vits8")
    assert "dino_vits8" in msg


def test_unreadable_or_foreign_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    _expect_error(junk, "cannot read weights file")
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    _expect_error(lst, "not a state dict")
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "cls_token": torch.zeros(1, 1, 384)}, nested)
    _expect_error(nested, "'epoch'")
    with pytest.raises(WeightsError, match="Pass weights=") as e:
        build_backbone("dino_vits16", weights=tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(e.value)


def test_weights_dir_then_cache_then_download(src, x, tmp_path, monkeypatch):
    b0, sd = src
    wdir, cache = tmp_path / "weights", tmp_path / "cache"
    wdir.mkdir()
    torch.save(sd, wdir / VITS16.weights_file)
    b = build_backbone("dino_vits16", weights_dir=wdir, cache_dir=cache)  # the downloader would raise
    assert b.weights_path == str(wdir / VITS16.weights_file) and _same_features(b, b0, x)

    calls = []

    def fake_download(url, dst, *a, **k):  # stands in for the network: writes the file atomically
        calls.append((url, dst))
        torch.save(sd, dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    empty = tmp_path / "empty"
    b = build_backbone("dino_vits16", weights_dir=empty, cache_dir=cache)
    assert calls == [(VITS16.url, str(cache / VITS16.weights_file))]
    assert b.weights_path == str(cache / VITS16.weights_file) and _same_features(b, b0, x)
    build_backbone("dino_vits16", weights_dir=empty, cache_dir=cache)   # now cached: no second download
    assert len(calls) == 1


def test_offline_error_names_file_url_and_overrides(tmp_path):
    wdir, cache = tmp_path / "weights", tmp_path / "cache"
    with pytest.raises(WeightsError) as e:
        build_backbone("dino_vits16", weights_dir=wdir, cache_dir=cache)
    msg = str(e.value)
    for needle in (str(wdir / VITS16.weights_file), str(cache / VITS16.weights_file),
                   "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                   "network disabled", "weights=", "weights_dir=", "init=random"):
        assert needle in msg, needle
    from stages.checks import in_config_keys  # what the mine stage prints of it

    keyed = in_config_keys(msg, "mine")
    assert all(k in keyed for k in ("backbone.weights=", "paths.weights_dir=", "backbone.init=random")), keyed
    assert not (cache / VITS16.weights_file).exists()


def test_random_init_touches_no_file(tmp_path):
    b = build_backbone("dino_vits8", init="random", weights=tmp_path / "absent.pth", weights_dir=tmp_path)
    assert b.weights_path is None and b.weights_sha256 is None and b.init == "random"


def _randomised_r50_state():
    b = build_backbone("dino_resnet50", init="random", seed=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in b.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return b, {k: v.clone() for k, v in b.model.state_dict().items()}


def test_resnet50_official_format_round_trip(tmp_path):
    b0, sd = _randomised_r50_state()
    assert not any(k.startswith("fc.") for k in sd) and "conv1.weight" in sd and "layer4.2.bn3.running_var" in sd
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    ref = b0.features(x).feats
    # official form (torchvision keys, no fc); fc present (ignored) and no num_batches_tracked (old PyTorch)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    variants = {"plain.pth": sd, "old_with_fc.pth": {**old, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
                "full.pth": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(8, 2048)}}}
    for name, state in variants.items():
        path = tmp_path / name
        torch.save(state, path)
        b = build_backbone("dino_resnet50", weights=path)
        assert torch.equal(b.features(x).feats, ref), name
        assert b.weights_sha256 == _sha(path)
    path = tmp_path / "bad.pth"
    torch.save({k: v for k, v in sd.items() if k != "layer3.0.conv2.weight"}, path)
    _expect_error(path, "layer3.0.conv2.weight", arch="dino_resnet50")


def test_one_dino_training_checkpoint_loads_into_backbone_and_detector(tmp_path):
    """pipeline.weights is the one reader: a DINO training checkpoint (teacher/student dict) gives the same
    ResNet-50 weights to the DINO ResNet-50 backbone and to a detector's body; a broken file is refused by
    both with the same error type."""
    from pipeline.detection.builders import build_detector
    from pipeline.detection.weights import WeightsError as DetectorWeightsError

    assert DetectorWeightsError is WeightsError
    _, sd = _randomised_r50_state()
    full = {"teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()}, "module.head.last_layer.weight":
                        torch.zeros(4, 2048)}, "student": {"x": torch.zeros(1)}, "epoch": 100}
    path = tmp_path / "checkpoint.pth"
    torch.save(full, path)
    b = build_backbone("dino_resnet50", weights=path)
    det = build_detector("r50_fpn", 1, init="dino", weights=str(path), min_size=64, max_size=96)
    for k in ("conv1.weight", "layer4.2.conv3.weight", "layer2.1.bn1.running_mean"):
        assert torch.equal(b.model.state_dict()[k], sd[k])
        assert torch.equal(det.state_dict()[f"backbone.body.{k}"], sd[k])
    torch.save({"teacher": {"x": "not a tensor"}}, tmp_path / "bad.pth")
    for load in (lambda: build_backbone("dino_resnet50", weights=tmp_path / "bad.pth"),
                 lambda: build_detector("r50_fpn", 1, init="dino", weights=str(tmp_path / "bad.pth"))):
        with pytest.raises(WeightsError, match=r"bad\.pth.*not a tensor"):
            load()
