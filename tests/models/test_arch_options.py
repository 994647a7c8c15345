"""Architecture options the reference detectors need: stride_in_1x1, out_norm, p7_relu, per-head options."""

import pytest
import torch
import torch.nn.functional as F

from dyhead_cli.engine import recipes
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.backbone import TimmBackbone
from dyhead_cli.models.build import build_model
from dyhead_cli.models.fpn import FPN
from dyhead_cli.recipe import load_recipe, recipe_from_dict, save_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stride_in_1x1_moves_the_stride_to_the_first_1x1_conv():
    torch.manual_seed(0)
    ours = TimmBackbone("resnet50", stride_in_1x1=True).eval()
    with torch.no_grad():  # timm zero-inits each block's last BatchNorm: the residual branch would be 0
        for name, param in ours.named_parameters():
            if name.endswith("bn3.weight"):
                param.uniform_(0.5, 1.5)
    plain = TimmBackbone("resnet50").eval()
    plain.load_state_dict(ours.state_dict())  # same parameters and keys
    for i, stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        block = getattr(ours.body, f"layer{i}")[0]
        assert block.conv1.stride == (stride, stride) and block.conv2.stride == (1, 1)
        assert block.conv1.padding == (0, 0) and block.conv2.padding == (1, 1)
        assert getattr(ours.body, f"layer{i}")[1].conv1.stride == (1, 1)
        assert getattr(plain.body, f"layer{i}")[0].conv2.stride == (stride, stride)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = ours(x), plain(x)
        # the caffe bottleneck by hand: stride in conv1, then the 3x3 at stride 1
        block = ours.body.layer2[0]
        c2 = ours.body.layer1(ours.body.maxpool(ours.body.act1(ours.body.bn1(ours.body.conv1(x)))))
        h = block.act1(block.bn1(F.conv2d(c2, block.conv1.weight, stride=2)))
        h = block.act2(block.bn2(F.conv2d(h, block.conv2.weight, padding=1)))
        h = block.bn3(block.conv3(h))
        manual = block.act3(h + block.downsample(c2))
        assert torch.allclose(block(c2), manual, atol=1e-5)
    assert [f.shape for f in got] == [f.shape for f in want] == [(1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    assert not torch.allclose(got[0], want[0])


def test_stride_in_1x1_needs_a_bottleneck_resnet():
    with pytest.raises(DyheadError, match="bottleneck ResNet"):
        TimmBackbone("resnet18", stride_in_1x1=True)


def test_out_norm_adds_a_layernorm_per_level():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", out_norm=True).eval()
    assert [k for k in backbone.state_dict() if k.startswith("out_norms.")] == [
        f"out_norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    assert [n.normalized_shape[0] for n in backbone.out_norms] == [128, 256, 512]
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 64))
    for f in feats:  # normalised over channels at every location, NCHW out
        assert torch.allclose(f.mean(1), torch.zeros(()), atol=1e-4)
        assert torch.allclose(f.var(1, unbiased=False), torch.ones(()), atol=1e-2)
    assert TimmBackbone("resnet18").out_norms is None


def test_p7_relu_false_changes_p7_only():
    torch.manual_seed(0)
    with_relu, without = FPN([16, 32, 64], 32), FPN([16, 32, 64], 32, p7_relu=False)
    without.load_state_dict(with_relu.state_dict())  # torchvision's keys in both
    assert "fpn.extra_blocks.p7.weight" in without.state_dict()
    feats = [torch.randn(1, 16, 16, 16), torch.randn(1, 32, 8, 8), torch.randn(1, 64, 4, 4)]
    with torch.no_grad():
        a, b = with_relu(feats), without(feats)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert not torch.allclose(a[4], b[4])
    assert torch.allclose(b[4], without.fpn.extra_blocks.p7(b[3]))


def small(**head_options):
    return {
        "model": {
            "num_classes": 3,
            "backbone": {"name": "resnet18"},
            "fpn": {"channels": 32},
            "dyhead": {"num_blocks": 0},
            "head_options": head_options,
        }
    }


def test_head_options_reach_the_heads():
    m = build_model(recipe_from_dict(small()).model)  # ATSS defaults: offset 0.5, 1x1 predictors, GN tower
    assert m.head.anchor_offset == 0.5 and m.head.cls_logits.kernel_size == (1, 1) and m.head.box_loss_weight == 2.0
    values = {"head": "atss", "num_convs": 1, "tower_norm": "none", "anchor_offset": 0.0, "pred_kernel_size": 3}
    cfg = small(**{k: v for k, v in values.items() if k != "head"}, box_loss_weight=1.0)
    m = build_model(recipe_from_dict(cfg).model)
    assert m.head.anchor_offset == 0.0 and m.head.cls_logits.kernel_size == (3, 3) and m.head.box_loss_weight == 1.0
    assert not any(isinstance(x, torch.nn.GroupNorm) for x in m.head.cls_tower.modules())
    cfg = small(num_convs=1, smooth_l1_beta=0.1, box_loss="smooth_l1")
    cfg["model"]["head"] = "retinanet"
    m = build_model(recipe_from_dict(cfg).model)
    assert m.head.anchor_offset == 0.0 and m.head.cls_logits.kernel_size == (3, 3) and m.head.smooth_l1_beta == 0.1
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.head.cls_tower.modules())
    cfg["model"]["head"] = "fcos"
    cfg["model"]["head_options"]["pred_kernel_size"] = 1
    assert build_model(recipe_from_dict(cfg).model).head.cls_logits.kernel_size == (1, 1)


def test_new_fields_round_trip_and_are_checked(tmp_path):
    cfg = small(anchor_offset=0.5, pred_kernel_size=1, tower_norm="none", smooth_l1_beta=0.1, box_loss_weight=1.5)
    cfg["model"]["backbone"].update(stride_in_1x1=True, out_norm=True)
    cfg["model"]["fpn"]["p7_relu"] = False
    r = recipe_from_dict(cfg)
    save_recipe(r, tmp_path / "r.toml")
    again = load_recipe(tmp_path / "r.toml")
    assert again == r and again.model.backbone.stride_in_1x1 and not again.model.fpn.p7_relu
    assert again.model.head_options.tower_norm == "none" and again.model.head_options.anchor_offset == 0.5
    d = recipe_from_dict({}).model  # defaults: today's behaviour
    assert (d.backbone.stride_in_1x1, d.backbone.out_norm, d.fpn.p7_relu) == (False, False, True)
    # unset head options are the head's own defaults, filled in when the recipe is resolved
    assert (d.head_options.anchor_offset, d.head_options.pred_kernel_size, d.head_options.tower_norm) == (None, None, "gn")
    resolved = recipes.from_dict({}).model.head_options
    assert (resolved.anchor_offset, resolved.pred_kernel_size) == (0.5, 1)  # ATSS's
    with pytest.raises(DyheadError, match=r"tower_norm' = 'bn' is not one of gn, none"):
        recipes.from_dict(small(tower_norm="bn"))
    with pytest.raises(DyheadError, match="pred_kernel_size' must be a positive odd number"):
        recipes.from_dict(small(pred_kernel_size=2))
    with pytest.raises(DyheadError, match=r"anchor_offset' must be in \[0, 1\)"):
        recipes.from_dict(small(anchor_offset=1.5))
