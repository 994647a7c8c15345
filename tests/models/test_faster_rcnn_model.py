"""Faster R-CNN as a whole detector: P2..P6 pyramids, recipes, state-dict names, overfitting tiny data."""

from pathlib import Path

import pytest
import torch
from helpers_detection import overfit, synthetic_batch

from dyhead_cli.engine import recipes
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.models.fpn import FPN
from dyhead_cli.recipe import (
    BackboneConfig,
    DyHeadConfig,
    FPNConfig,
    HeadOptions,
    ModelConfig,
    RCNNConfig,
    load_recipe,
)

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def rcnn_config(num_blocks: int, channels: int = 32, **rcnn) -> ModelConfig:
    """A test-sized Faster R-CNN: timm's ``test_resnet``, P2..P6, a 128-wide box head; ``rcnn`` overrides."""
    return ModelConfig(
        num_classes=3,
        head="faster_rcnn",
        backbone=BackboneConfig(name="test_resnet"),
        fpn=FPNConfig(channels=channels, levels=[2, 3, 4, 5, 6], top_block="maxpool"),
        dyhead=DyHeadConfig(num_blocks=num_blocks),
        head_options=HeadOptions(nms_thresh=0.5),
        rcnn=RCNNConfig(**{"fc_dim": 128, **rcnn}),
    )


def test_fpn_p2_to_p6_with_p6_max_pooled_from_p5():
    fpn = FPN([16, 24, 32, 48], 8, top_block="maxpool", first_level=2)
    feats = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip((16, 24, 32, 48), (4, 8, 16, 32))]
    levels = fpn(feats)
    assert fpn.strides == (4, 8, 16, 32, 64)
    assert [tuple(p.shape[-2:]) for p in levels] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert torch.equal(levels[4], levels[3][..., ::2, ::2])  # detectron2's LastLevelMaxPool: 1x1 kernel, stride 2
    assert not any("extra_blocks" in k for k in fpn.state_dict())


def test_default_pyramid_keeps_its_levels_and_state_dict_names():
    model = build_model(ModelConfig(num_classes=3, backbone=BackboneConfig(name="test_resnet"), fpn=FPNConfig(channels=32)))
    assert model.backbone.out_strides == (8, 16, 32) and model.fpn.strides == (8, 16, 32, 64, 128)
    fpn_keys = {k.rsplit(".", 1)[0] for k in model.state_dict() if k.startswith("fpn.")}
    assert fpn_keys == {f"fpn.fpn.{b}.{i}.0" for b in ("inner_blocks", "layer_blocks") for i in range(3)} | {
        "fpn.fpn.extra_blocks.p6",
        "fpn.fpn.extra_blocks.p7",
    }


def test_faster_rcnn_modules_carry_detectron2_names_and_shapes():
    model = build_model(rcnn_config(num_blocks=1, channels=32))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("head.")}
    assert shapes == {
        "head.rpn.conv.weight": (32, 32, 3, 3),
        "head.rpn.conv.bias": (32,),
        "head.rpn.objectness_logits.weight": (3, 32, 1, 1),
        "head.rpn.objectness_logits.bias": (3,),
        "head.rpn.anchor_deltas.weight": (12, 32, 1, 1),
        "head.rpn.anchor_deltas.bias": (12,),
        "head.box_head.fc1.weight": (128, 32 * 49),
        "head.box_head.fc1.bias": (128,),
        "head.box_head.fc2.weight": (128, 128),
        "head.box_head.fc2.bias": (128,),
        "head.box_predictor.cls_score.weight": (4, 128),
        "head.box_predictor.cls_score.bias": (4,),
        "head.box_predictor.bbox_pred.weight": (12, 128),
        "head.box_predictor.bbox_pred.bias": (12,),
    }
    assert model.backbone.out_strides == (4, 8, 16, 32) and model.head.box_strides == (4, 8, 16, 32)
    assert [a.tolist() for a in model.head.anchor_sizes[1][1:2]] == [[64.0, 64.0]]  # 8 x stride 8, ratio 1


def test_levels_must_fit_the_top_block_and_faster_rcnn_needs_p2():
    with pytest.raises(DyheadError, match="does not fit top_block"):
        recipes.from_dict({"model": {"fpn": {"levels": [2, 3, 4, 5, 6]}}})
    with pytest.raises(DyheadError, match="pools RoIs from P2"):
        recipes.from_dict({"model": {"head": "faster_rcnn"}})
    with pytest.raises(DyheadError, match=r"top_block' = 'maxpol' is not one of p6p7, maxpool \(did you mean 'maxpool'"):
        recipes.from_dict({"model": {"fpn": {"top_block": "maxpol"}}})


# Few proposals and RoIs for 4 images of 128 px: 3x faster steps than detectron2's 1000 / 512.
SMALL = {"rpn_pre_nms_top_n_train": 500, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n": 200, "roi_batch_size_per_image": 64}


@pytest.mark.parametrize("name", ["faster_rcnn_quickstart", "faster_rcnn_r50_dyhead_1x_coco", "faster_rcnn_r50_1x_coco"])
def test_recipes_load_as_the_official_config(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    m = recipe.model
    assert m.head == "faster_rcnn" and m.fpn.levels == [2, 3, 4, 5, 6] and m.fpn.top_block == "maxpool"
    assert m.head_options.nms_thresh == 0.5
    if name != "faster_rcnn_quickstart":
        assert m.dyhead.num_blocks == (6 if "dyhead" in name else 0)
        assert recipe.train.lr == 0.02 and recipe.train.max_steps == 90000 and recipe.train.lr_steps == [0.6667, 0.8889]
        assert m.rcnn == RCNNConfig()  # detectron2's defaults


def test_overfit_faster_rcnn_with_dyhead():
    images, targets = synthetic_batch(4)
    steps, ap50, seconds = overfit(rcnn_config(num_blocks=1, **SMALL), images, targets, max_steps=150)
    print(f"\noverfit faster_rcnn dyhead=1: {steps} steps, AP50 {ap50:.3f}, {seconds:.1f} s")
    assert ap50 > 0.9


@pytest.mark.slow
def test_overfit_faster_rcnn_without_dyhead():
    images, targets = synthetic_batch(4)
    steps, ap50, seconds = overfit(rcnn_config(num_blocks=0, **SMALL), images, targets, max_steps=250, lr=2e-3)
    print(f"\noverfit faster_rcnn dyhead=0: {steps} steps, AP50 {ap50:.3f}, {seconds:.1f} s")
    assert ap50 > 0.9


def test_benchmark_compare_for_faster_rcnn_is_the_papers_comparison():
    from dyhead_cli.commands.benchmark.measure import Settings, candidates_for

    cfg = rcnn_config(num_blocks=1)
    found = {c.key: c for c in candidates_for(cfg, Settings(size=(128, 160), compare=True))}
    assert list(found) == ["dyhead", "no_dyhead", "atss_dyhead", "torchvision_faster_rcnn"]
    assert found["dyhead"].name == "Faster R-CNN-test_resnet-DyHead"
    assert found["no_dyhead"].config["dyhead"]["num_blocks"] == 0 and found["no_dyhead"].config["head"] == "faster_rcnn"
    atss = found["atss_dyhead"].config
    assert (atss["head"], atss["fpn"]["levels"], atss["fpn"]["top_block"]) == ("atss", [3, 4, 5, 6, 7], "p6p7")
    assert atss["dyhead"]["num_blocks"] == 1 and atss["fpn"]["channels"] == 32
    tv = found["torchvision_faster_rcnn"]
    assert tv.config["torchvision"].startswith("fasterrcnn_resnet50_fpn(") and tv.config["num_classes"] == 4
