"""Backbone ensembles (VoteCut's ``miner.backbones``): members parsed and checked, each member's input and features
(computed once per image), a one-member ensemble equal to the one-backbone miner, the votes over several backbones
against the reference's multi-model path (transcribed in tests/test_votecut.py), and the mine stage."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import InterpolationMode, resize

from pipeline.backbones import build_backbone
from pipeline.backbones.ensemble import BackboneEnsemble, Member, build_ensemble, parse_members
from pipeline.discovery import build_miner
from pipeline.discovery.votecut import kmeans_labels, ncut_eigenvectors, votecut_ensemble
from test_votecut import ref_instances, ref_votecut_masks, scene


def _random(arch: str):
    torch.manual_seed(0)
    return build_backbone(arch, init="random", device="cpu")


def test_parse_members():
    assert parse_members(["dino_vits8", "dinov2_vitb14:normed"]) == [Member("dino_vits8"),
                                                                     Member("dinov2_vitb14", "normed")]
    for bad, says in ((["dino_vits9"], "unknown backbone 'dino_vits9'"), (["dino_vits8:keys"], "unknown feature"),
                      (["dino_vits8", "dino_vits8"], "twice"), ([], "non-empty"), ("dino_vits8", "non-empty")):
        with pytest.raises(ValueError, match=says):
            parse_members(bad)


def test_normed_feature_is_the_final_norm_of_the_tokens():
    b = _random("dinov2_vits14_reg")
    x = torch.randn(1, 3, 28, 42)
    prefix = 1 + 4  # CLS and the registers
    assert torch.equal(b.features(x, "normed").feats, b.model.forward_features(x)[:, prefix:])
    assert not torch.equal(b.features(x, "normed").feats, b.features(x, "tokens").feats)
    with pytest.raises(ValueError, match="normed"):
        _random("dino_resnet50").features(torch.randn(1, 3, 64, 64), "normed")


def test_member_inputs_grid_and_one_pass_per_member():
    members = [Member("dinov2_vits14", "normed"), Member("dino_vits8")]
    ens = BackboneEnsemble([_random(m.arch) for m in members], members, 60)
    # 60 px: DINOv2 sees 56 (4 x 14), the ViT/8 56 (7 x 8): the finest grid is the ViT/8's 7 x 7, its patch 8
    assert ens.sides == [56, 56] and ens.finest == 1 and ens.patch_size == 8
    assert ens.arch == "dinov2_vits14+dino_vits8" and ens.init == "random"
    assert [d["feature"] for d in ens.describe()["members"]] == ["normed", None]
    padded = torch.zeros(3, 64, 64)  # the loader's 60 x 60 square padded to 64 (patch 8)
    padded[:, :60, :60] = 1.5
    for i in range(2):  # the square (not the padding), resized: a constant image stays that constant
        assert ens.member_input(padded, i).shape == (3, 56, 56)
        assert torch.allclose(ens.member_input(padded, i), torch.full((3, 56, 56), 1.5), atol=1e-5)
    exact = BackboneEnsemble(ens.backbones, members, 56)
    img = torch.randn(3, 56, 56)
    assert exact.member_input(img, 1) is img  # a member whose side is the square gets the loader's tensor itself
    calls = []
    for b in ens.backbones:
        b.features_batch = (lambda f: lambda images, **kw: calls.append(len(images)) or f(images, **kw))(
            b.features_batch)
    images = [torch.randn(3, 64, 64) for _ in range(3)]
    outs = ens.features_batch(images, which="k")
    assert calls == [3, 3] and len(outs) == 3  # each member once, over all the images
    for j, out in enumerate(outs):
        assert out.dims == (7, 7) and out.finest == 1 and out.feats is None
        for i, (b, m) in enumerate(zip(ens.backbones, members)):
            want = b.features(ens.member_input(images[j], i)[None], which=m.feature or "k").feats
            assert torch.equal(out.members[i].feats, want)
    with pytest.raises(ValueError, match="CLS attention"):
        ens.features_batch(images, with_cls_attn=True)
    with pytest.raises(ValueError, match="smaller than one patch of dinov2_vits14"):
        BackboneEnsemble(ens.backbones, members, 12)


def test_one_member_ensemble_is_the_one_backbone_miner():
    backbone = _random("dino_vits8")
    ens = build_ensemble(["dino_vits8"], 64, lambda arch: backbone)
    single = build_miner("votecut", 8, image_size=64, min_size=1)
    voted = build_miner("votecut", 8, image_size=64, min_size=1, backbones=["dino_vits8"])
    torch.manual_seed(1)
    img = torch.randn(3, 64, 64)
    a = single(backbone.features_batch([img])[0], (64, 64))
    b = voted(ens.features_batch([img])[0], (64, 64))
    assert len(a.boxes) > 1 and a.scores == b.scores and a.num_instances == b.num_instances
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    with pytest.raises(ValueError, match="EnsembleOutput"):
        voted(backbone.features_batch([img])[0], (64, 64))
    with pytest.raises(ValueError, match="needs image_size"):
        build_miner("votecut", 8, image_size=None, backbones=["dino_vits8"])


def test_votes_over_several_backbones_are_the_references():
    """Three "backbones" see the same scene at 24 x 24, 12 x 12 and 16 x 16: the reference labels each group's
    eigenvectors, takes every group's instances at its own grid, resizes them all to the finest grid (torchvision
    NEAREST) and votes."""
    fine = scene(noise=0.2)
    grid = fine.reshape(24, 24, -1)
    coarse = grid[::2, ::2].reshape(144, -1)
    odd = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(16, 16), mode="nearest")[0]
    odd = odd.permute(1, 2, 0).reshape(256, -1)
    groups = [(coarse, (12, 12)), (fine, (24, 24)), (odd, (16, 16))]
    r = votecut_ensemble(groups, 8, (192, 192), finest=1)
    instances = []
    for feats, dims in groups:
        labels = [kmeans_labels(v, k) for v in ncut_eigenvectors(feats, dims) for k in (2, 3)]
        instances += [resize(torch.Tensor(m[None]), [24, 24], interpolation=InterpolationMode.NEAREST)[0].numpy()
                      for m in ref_instances(labels)]
    masks, scores = ref_votecut_masks(instances)
    assert r.num_instances == len(instances) and r.scores == scores and len(r.masks) == len(masks) > 1
    assert all(np.array_equal(a, b) for a, b in zip(r.masks, masks))
    ys, xs = np.nonzero(r.masks[0])
    assert list(r.boxes[0]) == [xs.min() * 8, ys.min() * 8, (xs.max() + 1) * 8, (ys.max() + 1) * 8]
    with pytest.raises(ValueError, match="finest"):
        votecut_ensemble(groups, 8, (192, 192), finest=3)


def test_mine_stage_with_an_ensemble(tmp_path, voc07_mini):
    from stage_utils import compose_cfg
    from stages.checks import config_errors
    from stages.mine import run

    base = [f"paths.output_root={tmp_path}", "backbone.init=random", "num_workers=0", "progress=false",
            "dataset=voc07", f"paths.data_root={voc07_mini}", "dataset.max_images=2", "miner=votecut",
            "miner.image_size=64", "miner.min_size=1", "viz.num_images=1"]
    cfg = compose_cfg("mine", [*base, "miner.backbones=[dino_vits16,dinov2_vits14:normed]"])
    metrics = run(cfg)
    assert metrics["images"] == 2 and metrics["failures"] == 0
    out = tmp_path / "voc07" / "dino_vits16" / "mine_votecut"
    data = json.loads((out / "pseudo_boxes.json").read_text())
    members = data["info"]["backbone"]["members"]
    assert [(m["arch"], m["feature"]) for m in members] == [("dino_vits16", None), ("dinov2_vits14", "normed")]
    assert data["info"]["random_init"] and data["info"]["miner_params"]["backbones"] == [
        "dino_vits16", "dinov2_vits14:normed"]
    scores = [a["score"] for a in data["annotations"]]
    assert scores and scores[0] == 1.0 and all("counts" in a["segmentation"] for a in data["annotations"])
    assert any((out / "viz").iterdir())
    before = (out / "pseudo_boxes.json").stat().st_mtime_ns
    run(cfg)  # the same ensemble again: up to date, nothing rewritten
    assert (out / "pseudo_boxes.json").stat().st_mtime_ns == before
    errors = config_errors(compose_cfg("mine", [*base, "miner.backbones=[dino_vits16,dino_vits9]"]), "mine")
    assert len(errors) == 1 and errors[0].startswith("miner.backbones") and "dino_vits9" in errors[0]
