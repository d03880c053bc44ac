"""pipeline.detection.builders/weights: presets, the DINO ResNet-50 key mapping, strict key checks."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.detection.builders import build_detector
from pipeline.detection.weights import DINO_RESNET50_URL, WeightsError

SMALL = dict(min_size=64, max_size=96, rpn_topk=(60, 20, 60, 10), batch_size_per_image=16,
             rpn_batch_size_per_image=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the official DINO ResNet-50 format: torchvision resnet50 keys, no fc."""
    torch.manual_seed(seed)
    sd = resnet50(weights=None).state_dict()
    for k, v in sd.items():  # make every tensor, buffers included, distinct and non-default
        if v.is_floating_point():
            sd[k] = torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v)
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "dino_resnet50_pretrain.pth"
    sd = _official_state_dict()
    torch.save(sd, path)
    return path, sd


def _expected_name(key: str, preset: str) -> str:
    if preset == "r50_fpn":
        return "backbone.body." + key
    return ("roi_heads.box_head.res5." + key[len("layer4."):]) if key.startswith("layer4.") else "backbone." + key


@pytest.mark.parametrize("preset", ["r50_c4", "r50_fpn"])
def test_dino_keys_land_on_the_right_tensors(dino_file, preset):
    path, sd = dino_file
    model = build_detector(preset, 1, init="dino", weights=str(path), **SMALL)
    target = model.state_dict()
    checked = 0
    for k, v in sd.items():
        name = _expected_name(k, preset)
        if k.endswith("num_batches_tracked") and name not in target:
            continue  # frozen batch norms have no counter
        assert torch.equal(target[name], v), k
        checked += 1
    assert checked >= 265  # 53 convs + 53 BNs x 4 tensors
    from pipeline.detection.checkpoint import DetectorSpec
    from pipeline.detection.settings import DetectorSettings

    spec = DetectorSpec.create(DetectorSettings(preset, init="dino", weights=str(path)), 1)
    assert spec.init == "dino" and spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not hasattr(model, "detector_info")  # what a detector is travels in its DetectorSpec, not on the module


def test_c4_structure_freezing_and_forward(dino_file):
    path, _ = dino_file
    m = build_detector("r50_c4", 1, init="dino", weights=str(path), **SMALL)
    # FREEZE_AT=2: stem + res2 frozen with frozen BN; res3..res5 and the extra norm train
    assert not m.backbone.conv1.weight.requires_grad and isinstance(m.backbone.bn1, FrozenBatchNorm2d)
    assert all(not p.requires_grad for p in m.backbone.layer1.parameters())
    assert all(p.requires_grad for p in m.backbone.layer2.parameters())
    assert isinstance(m.backbone.layer2[0].bn1, nn.BatchNorm2d)
    assert isinstance(m.roi_heads.box_head.norm, nn.BatchNorm2d) and m.roi_heads.box_head.norm.num_features == 2048
    assert m.roi_heads.box_predictor.cls_score.out_features == 2 and m.roi_heads.box_predictor.bbox_pred.out_features == 8
    assert m.rpn.anchor_generator.num_anchors_per_location() == [15]
    assert m.roi_heads.box_roi_pool.output_size == 14
    m.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    losses = m(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.backbone.layer1[0].conv1.weight.grad is None and m.backbone.layer3[0].conv1.weight.grad is not None
    # res5 on 14x14 RoIs gives 7x7 maps (stride 2), pooled to 2048-d
    feats = m.roi_heads.box_head(torch.rand(3, 1024, 14, 14))
    assert feats.shape == (3, 2048)
    assert m.roi_heads.box_head.res5(torch.rand(1, 1024, 14, 14)).shape == (1, 2048, 7, 7)


def test_random_init_and_test_size():
    m = build_detector("mobilenet_fpn", 3, min_size=(64, 96), max_size=160, test_min_size=72, seed=5)
    m2 = build_detector("mobilenet_fpn", 3, min_size=(64, 96), max_size=160, test_min_size=72, seed=5)
    m3 = build_detector("mobilenet_fpn", 3, min_size=(64, 96), max_size=160, test_min_size=72, seed=6)
    w = "roi_heads.box_head.fc6.weight"
    assert torch.equal(m.state_dict()[w], m2.state_dict()[w]) and not torch.equal(m.state_dict()[w], m3.state_dict()[w])
    assert m.roi_heads.box_predictor.cls_score.out_features == 4
    m.eval()
    img, _ = m.transform([torch.rand(3, 100, 200)])
    assert img.image_sizes[0] == (72, 144)  # the test size, not the largest training size (96 -> 80 x 160)
    m.train()
    sizes = {m.transform([torch.rand(3, 100, 100)])[0].image_sizes[0][0] for _ in range(30)}
    assert sizes == {64, 96}  # multi-scale training picks among the given sizes


def test_key_errors_name_the_keys_and_the_file(tmp_path, dino_file):
    _, sd = dino_file
    extra = dict(sd, **{"layer5.0.conv1.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"extra\.pth.*\n.*unexpected keys \(1\): layer5\.0\.conv1\.weight"):
        build_detector("r50_c4", 1, init="dino", weights=str(tmp_path / "extra.pth"), **SMALL)
    missing = {k: v for k, v in sd.items() if k != "layer3.2.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): layer3\.2\.bn2\.running_var"):
        build_detector("r50_fpn", 1, init="dino", weights=str(tmp_path / "missing.pth"), **SMALL)
    bad = dict(sd, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape mismatch.*conv1\.weight"):
        build_detector("r50_c4", 1, init="dino", weights=str(tmp_path / "shape.pth"), **SMALL)
    # an ImageNet torchvision file (with fc) is accepted: fc is ignored
    torch.save(dict(sd, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}), tmp_path / "in.pth")
    m = build_detector("r50_fpn", 1, init="imagenet", weights=str(tmp_path / "in.pth"), **SMALL)
    assert torch.equal(m.state_dict()["backbone.body.conv1.weight"], sd["conv1.weight"])


def test_bad_arguments_give_clear_errors(tmp_path):
    from stages.checks import in_config_keys

    with pytest.raises(WeightsError, match=DINO_RESNET50_URL.replace(".", r"\.") + r".*pass weights=") as e:
        build_detector("r50_c4", 1, init="dino")
    assert "detector.weights=/path/to/" in in_config_keys(str(e.value), "train_cag")  # what the stage says
    with pytest.raises(WeightsError, match=r"not found.*nope\.pth"):
        build_detector("r50_c4", 1, init="dino", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read weights file .*junk\.pth"):
        build_detector("r50_fpn", 1, init="dino", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="init dino is not available for preset mobilenet_fpn"):
        build_detector("mobilenet_fpn", 1, init="dino", weights="x.pth")
    with pytest.raises(ValueError, match="unknown detector preset 'r101'"):
        build_detector("r101", 1)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("mobilenet_fpn", 0)
