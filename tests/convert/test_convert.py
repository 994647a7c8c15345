"""Converting whole reference detectors (official detectron2 / MMDetection ATSS + DyHead) into ours."""

import os
import pickle

import numpy as np
import pytest
import timm
import torch
from helpers_fixtures import TOWER_FIXTURES, load_tower_fixture
from helpers_reference_keys import (
    atss_dyhead_shapes,
    atss_head_shapes,
    atss_r50_dyhead,
    dyhead_shapes,
    fpn_shapes,
    random_state,
    resnet_stage_channels,
    timm_resnet_to_detectron2,
    timm_resnet_to_mmdet,
    timm_swin_to_mmdet,
    timm_swin_to_official,
)
from typer.testing import CliRunner

from dyhead_cli.cli import app
from dyhead_cli.convert.capabilities import COCO_CATEGORY_IDS, COCO_CLASSES
from dyhead_cli.convert.checkpoint import convert_state_dict
from dyhead_cli.convert.reading import read_reference_checkpoint
from dyhead_cli.engine.checkpoint import load_model_weights, load_weights
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import ModelConfig, from_dict, load_recipe, recipe_from_dict, to_dict

REPRO_CONFIG = (  # the lines of MMDetection's atss_r50_fpn_dyhead_for_reproduction_1x_coco.py the converter reads
    "model = dict(type='ATSS', backbone=dict(type='ResNet', depth=50, frozen_stages=1, norm_eval=True, style='caffe'), "
    "neck=[dict(type='FPN', add_extra_convs='on_output', num_outs=5), dict(type='DyHead', num_blocks=6)], "
    "bbox_head=dict(type='ATSSHead', pred_kernel_size=1, stacked_convs=0, anchor_generator=dict(type='AnchorGenerator', "
    "ratios=[1.0], octave_base_scale=8, scales_per_octave=1, strides=[8, 16, 32, 64, 128], center_offset=0.5), "
    "bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[0.1, 0.1, 0.2, 0.2])), "
    "test_cfg=dict(nms_pre=1000, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.6), max_per_img=100))\n"
    "img_norm_cfg = dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], to_rgb=False)\n"
    "test_pipeline = [dict(type='LoadImageFromFile', file_client_args=dict(backend='disk')), dict(type='MultiScaleFlipAug', img_scale=(1333, 800), flip=False, "
    "transforms=[dict(type='Resize', keep_ratio=True, backend='pillow'), dict(type='Normalize', **img_norm_cfg), "
    "dict(type='Pad', size_divisor=128), dict(type='ImageToTensor', keys=['img'])])]\n"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def unsupported(*keys: str) -> list[str]:
    """The capability fields (see convert/capabilities.py CAPABILITIES) our [model] table does not have yet."""
    schema = to_dict(ModelConfig())
    missing = []
    for key in keys:
        *tables, name = key.split(".")
        node = schema
        for part in tables:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            missing.append(key)
    return missing


def rebuild(conv):
    model = build_model(from_dict(ModelConfig, conv.model))
    model.load_state_dict(conv.state_dict, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# ATSS-R50-DyHead, both layouts, full size


def test_official_atss_r50_dyhead_converts_completely():
    state = atss_r50_dyhead("official")
    state["pixel_mean"], state["pixel_std"] = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)  # persisted by old detectron2
    conv = convert_state_dict(state, "official")
    rebuild(conv)  # strict=True
    m = conv.model
    assert m["backbone"]["name"] == "resnet50" and m["head"] == "atss" and m["dyhead"]["num_blocks"] == 6
    assert m["dyhead"]["offset_mode"] == "official"
    assert (m["input_format"], m["pixel_mean"], m["pixel_std"]) == ("BGR", [103.53, 116.28, 123.675], [1.0, 1.0, 1.0])
    assert m["backbone"]["norm_eval"] is True and m["fpn"]["extra_from"] == "p5"
    assert m["class_names"] == list(COCO_CLASSES) and len(COCO_CLASSES) == 80
    assert conv.reference.size_divisibility == 128  # dyhead.py: the last output stride, P7's
    assert m["backbone"]["frozen_stages"] == 0 and m["backbone"]["frozen_norm"] is True  # FREEZE_AT -1, FrozenBN
    assert conv.reference.resize_backend == "pillow"  # detectron2 resizes uint8 images with Pillow
    assert [g.key for g in conv.gaps] == unsupported("backbone.stride_in_1x1")  # MSRA weights: stride in the 1x1 conv
    assert sorted(sum(conv.dropped.values(), [])) == ["pixel_mean", "pixel_std"]
    assert torch.equal(conv.state_dict["head.cls_logits.weight"], state["head.cls_logits.weight"])
    assert torch.equal(
        conv.state_dict["backbone.body.layer3.5.bn2.running_var"],
        state["backbone.backbone.bottom_up.res4.5.conv2.norm.running_var"],
    )


def test_mmdet_atss_r50_dyhead_reproduction_converts_completely():
    state = atss_r50_dyhead("mmdet", seed=1)
    meta = {"config": REPRO_CONFIG, "mmdet_version": "2.20.0", "CLASSES": COCO_CLASSES}
    conv = convert_state_dict(state, "mmdet", meta)
    model = rebuild(conv)
    m = conv.model
    assert (m["input_format"], m["pixel_std"]) == ("BGR", [1.0, 1.0, 1.0])
    assert m["backbone"]["frozen_stages"] == 2 and m["head_options"]["nms_thresh"] == 0.6
    assert m["head_options"]["anchor_scale"] == 8.0 and m["class_names"] == list(COCO_CLASSES)
    assert conv.reference.size_divisibility == 128  # the reproduction config's Pad(size_divisor=128)
    assert m["backbone"]["frozen_norm"] is True  # caffe style: norm_cfg requires_grad=False
    assert conv.reference.resize_backend == "pillow"  # its Resize(backend='pillow'), not LoadImage's 'disk'
    assert convert_state_dict(state, "mmdet", {"config": ""}).reference.resize_backend == "cv2"
    # MMDetection 2.x passed the whole offset map to mmcv's kernel: the official flat-buffer behaviour
    assert m["dyhead"]["offset_mode"] == "official"
    assert sorted(g.key for g in conv.gaps) == unsupported("backbone.stride_in_1x1", "fpn.p7_relu")
    assert list(conv.dropped) == ["BatchNorm num_batches_tracked counters (ours start at 0)"]
    assert (
        model.head.scales[2].scale.shape == (1,) and model.head.scales[2].scale.item() == state["bbox_head.scales.2.scale"].item()
    )
    assert torch.equal(model.dyhead.blocks[5].spatial_low.bias, torch.zeros(256))


def test_mmdet_padding_multiple_comes_from_the_config():
    state = atss_r50_dyhead("mmdet", seed=1)
    simple = "data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], pad_size_divisor=32)"
    for config, want in ((simple, 32), (simple.replace("=32", "=128"), 128), ("", 32)):
        assert convert_state_dict(state, "mmdet", {"config": config}).reference.size_divisibility == want
    v3 = (  # MMDetection 3.x's reproduction config: the Resize step holds a tuple
        "test_pipeline = [dict(type='LoadImageFromFile', backend_args=None), "
        "dict(type='Resize', scale=(1333, 800), keep_ratio=True, backend='pillow'), dict(type='PackDetInputs')]"
    )
    assert convert_state_dict(state, "mmdet", {"config": v3}).reference.resize_backend == "pillow"
    assert convert_state_dict(state, "mmdet", {"config": v3.replace("'pillow'", "'cv2'")}).reference.resize_backend == "cv2"
    trained = "backbone=dict(type='ResNet', norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch')"
    assert convert_state_dict(state, "mmdet", {"config": trained}).model["backbone"]["frozen_norm"] is False


def test_mmdet_simple_recipe_with_3x3_predictors():
    state = random_state(atss_dyhead_shapes("mmdet", depth=18, channels=32, num_blocks=1, num_classes=3, pred_kernel_size=3))
    if unsupported("head_options.pred_kernel_size"):
        with pytest.raises(DyheadError, match=r"different kernel size \(head_options.pred_kernel_size = 3; ours: 1\)"):
            convert_state_dict(state, "mmdet")
    else:
        conv = convert_state_dict(state, "mmdet")
        assert conv.model["head_options"]["pred_kernel_size"] == 3
        rebuild(conv)


# ---------------------------------------------------------------------------------------------------
# the DyHead part reproduces the parity fixtures after a whole-detector conversion


@pytest.mark.parametrize("name", sorted(TOWER_FIXTURES))
def test_dyhead_parity_fixture_through_whole_detector(name):
    meta, tower, inputs, outputs = load_tower_fixture(name)
    source, mode = TOWER_FIXTURES[name]
    channels, blocks = int(meta["channels"]), int(meta["num_blocks"])
    state = random_state(atss_dyhead_shapes(source, depth=18, channels=channels, num_blocks=blocks, num_classes=3))
    prefix = "backbone." if source == "official" else "neck.1."
    assert all(prefix + k in state for k in tower)  # the fixture's keys are exactly the reference layout
    state.update({prefix + k: v for k, v in tower.items()})
    conv = convert_state_dict(state, source, offset_mode=None if mode == "official" else mode)
    assert conv.model["fpn"]["channels"] == channels and conv.model["dyhead"]["num_blocks"] == blocks
    assert conv.model["dyhead"]["offset_mode"] == mode  # "official" is every released checkpoint's default
    model = rebuild(conv)
    with torch.no_grad():
        ours = model.dyhead(inputs)
    for a, b in zip(ours, outputs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4


def test_offset_mode_can_be_overridden():
    state = random_state(atss_dyhead_shapes("mmdet", depth=18, channels=32, num_blocks=1, num_classes=3))
    assert convert_state_dict(state, "mmdet", offset_mode="official").model["dyhead"]["offset_mode"] == "official"


# ---------------------------------------------------------------------------------------------------
# the backbone part reproduces timm's own outputs


@pytest.fixture(scope="module")
def resnet50_body() -> torch.nn.Module:
    """timm's resnet50 (features_only) with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    body = timm.create_model("resnet50", features_only=True, pretrained=False)
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return body.eval()


@pytest.fixture(scope="module")
def swin_body() -> torch.nn.Module:
    name = "swin_tiny_patch4_window7_224"
    return timm.create_model(name, features_only=True, pretrained=False, dynamic_img_size=True).eval()


def small_neck_and_head(source: str, in_channels: list[int]) -> dict:
    shapes = fpn_shapes(source, in_channels, 32)
    shapes.update(dyhead_shapes(source, 32, 1))
    shapes.update(atss_head_shapes(source, 32, 3))
    return random_state(shapes, seed=3)


@pytest.mark.parametrize("source", ["official", "mmdet"])
def test_resnet50_backbone_reproduces_timm(source, resnet50_body):
    body = resnet50_body
    weights = body.state_dict()
    renamed = timm_resnet_to_detectron2(weights) if source == "official" else timm_resnet_to_mmdet(weights)
    state = {**renamed, **small_neck_and_head(source, resnet_stage_channels(50)[1:])}
    conv = convert_state_dict(state, source, resnet_style="pytorch")
    assert [g.key for g in conv.gaps] == (unsupported("fpn.p7_relu") if source == "mmdet" else [])
    model = rebuild(conv)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = [body(x)[i] for i in (2, 3, 4)]  # C3..C5
        got = model.backbone(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("source", ["official", "mmdet"])
def test_swin_backbone_maps_back_onto_timm_exactly(source, swin_body):
    weights = swin_body.state_dict()
    channels = [192, 384, 768]
    renamed = timm_swin_to_official(weights, channels) if source == "official" else timm_swin_to_mmdet(weights, channels)
    state = {**renamed, **small_neck_and_head(source, channels)}
    conv = convert_state_dict(state, source)
    assert conv.model["backbone"]["name"] == "swin_tiny_patch4_window7_224" and conv.model["input_format"] == "RGB"
    assert [g.key for g in conv.gaps if g.key.startswith("backbone")] == unsupported("backbone.out_norm")
    assert len(conv.dropped["Swin relative-position index / attention-mask buffers (timm rebuilds them)"]) == 12
    if unsupported("backbone.out_norm"):  # timm's features_only Swin has no per-level output LayerNorm
        assert len(conv.dropped["Swin output-level LayerNorms (approximation: our backbone has none)"]) == 6
    body = {k[len("backbone.body.") :]: v for k, v in conv.state_dict.items() if k.startswith("backbone.body.")}
    assert body.keys() == weights.keys()
    for key, value in weights.items():  # same module, same tensors: the same outputs
        assert torch.equal(body[key], value), key  # incl. MMDetection's unfold-ordered PatchMerging, reordered


# ---------------------------------------------------------------------------------------------------
# errors list the keys


def small_state(source="official", **kwargs):
    return random_state(atss_dyhead_shapes(source, depth=18, channels=32, num_blocks=1, num_classes=3, **kwargs))


def test_unmapped_key_is_listed():
    state = small_state()
    state["head.extra_conv.weight"] = torch.zeros(2)
    with pytest.raises(DyheadError, match=r"unmapped source keys: head\.extra_conv\.weight"):
        convert_state_dict(state, "official")


def test_shape_mismatch_is_listed():
    state = small_state("mmdet")
    state["neck.0.fpn_convs.1.conv.bias"] = torch.zeros(31)
    with pytest.raises(DyheadError, match=r"shape mismatch: fpn\.fpn\.layer_blocks\.1\.0\.bias \(31,\) vs ours \(32,\)"):
        convert_state_dict(state, "mmdet")


def test_missing_key_is_listed():
    state = small_state()
    del state["head.scales.4.scale"]
    with pytest.raises(DyheadError, match=r"no source for our keys: head\.scales\.4\.scale"):
        convert_state_dict(state, "official")
    state = small_state("mmdet")
    del state["bbox_head.atss_cls.weight"]  # an ATSS head missing its classifier: not "an unsupported head"
    with pytest.raises(DyheadError, match=r"an MMDetection ATSS head without bbox_head\.atss_cls\.weight"):
        convert_state_dict(state, "mmdet")


def test_wrong_source_and_two_stage_are_refused():
    with pytest.raises(DyheadError, match="use --from mmdet"):
        convert_state_dict(small_state("mmdet"), "official")
    state = small_state()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024)
    with pytest.raises(DyheadError, match="two-stage"):
        convert_state_dict(state, "official")


# ---------------------------------------------------------------------------------------------------
# reading files safely


def test_detectron2_pkl_of_numpy_arrays_is_read(tmp_path):
    weights = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2)}
    for protocol in (2, 4):
        path = tmp_path / f"model_{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": weights, "__author__": "x", "matching_heuristics": True}, protocol=protocol))
        state, info = read_reference_checkpoint(path)
        assert torch.equal(state["a.weight"], torch.arange(6.0).view(2, 3)) and info["containers"] == [
            "__author__",
            "matching_heuristics",
        ]


def test_containers_module_prefix_and_numpy_meta(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": {"module.x": torch.ones(2)}, "meta": {"epoch": np.int64(12), "config": "c"}, "optimizer": {}}, path)
    state, info = read_reference_checkpoint(path)
    assert list(state) == ["x"] and info["meta"]["config"] == "c" and info["containers"] == ["meta", "optimizer"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_pickled_objects_are_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "was_executed"
    path = tmp_path / f"evil{suffix}"
    obj = {"model": {"x": np.ones(2, dtype=np.float32)}, "extra": Payload(str(marker))}
    if suffix == ".pth":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DyheadError, match=r"holds pickled Python objects .*io\.open.*re-save"):
        read_reference_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# the command line


def test_cli_converts_end_to_end_and_dst_alone_rebuilds(tmp_path):
    runner = CliRunner()
    src, dst = tmp_path / "dyhead_official.pth", tmp_path / "out" / "converted.safetensors"
    torch.save({"model": small_state(), "iteration": 89999}, src)

    if unsupported("backbone.stride_in_1x1"):
        refused = runner.invoke(app, ["convert", str(src), str(dst), "--from", "official"])
        assert refused.exit_code == 1 and "stride" in refused.output and "--approximate" in refused.output
        assert not dst.exists()

    result = runner.invoke(app, ["convert", str(src), str(dst), "--from", "official", "--approximate"])
    assert result.exit_code == 0, result.output
    assert "dyhead eval" in result.output
    state, meta = load_weights(dst)
    recipe = recipe_from_dict(meta["recipe"])
    model = build_model(recipe.model)
    load_model_weights(model, state)  # strict
    assert recipe.model.dyhead.offset_mode == "official" and recipe.model.input_format == "BGR"
    info = meta["converted_from"]
    assert info["source"] == "official" and [g["key"] for g in info["approximations"]] == unsupported("backbone.stride_in_1x1")
    assert load_recipe(dst.with_suffix(".toml")).model == recipe.model
    assert meta["category_ids"] == [1, 2, 3]  # stored: predictions no longer take them from the working folder
    coco = tmp_path / "coco80.pth"
    torch.save({"model": random_state(atss_dyhead_shapes("official", depth=18, channels=32, num_blocks=1))}, coco)
    result = runner.invoke(
        app, ["convert", str(coco), str(tmp_path / "coco80.safetensors"), "--from", "official", "--approximate"]
    )
    assert result.exit_code == 0, result.output
    _, meta = load_weights(tmp_path / "coco80.safetensors")
    assert meta["category_ids"] == list(COCO_CATEGORY_IDS) and meta["category_ids"][-1] == 90  # toothbrush


def test_cli_refuses_unsafe_pickle_in_one_line(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.ones(1)}, "extra": Payload(str(tmp_path / "m"))}, src)
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.safetensors"), "--from", "mmdet"])
    assert result.exit_code == 1 and "will not unpickle" in result.output and "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "m")


def test_official_retinanet_dyhead_needs_a_norm_free_tower():
    from helpers_reference_keys import detectron2_resnet_shapes, retinanet_head_shapes

    def retinanet(num_convs):
        shapes = detectron2_resnet_shapes("backbone.backbone.bottom_up.", 18)
        shapes.update(fpn_shapes("official", resnet_stage_channels(18)[1:], 32))
        shapes.update(dyhead_shapes("official", 32, 1))
        shapes.update(retinanet_head_shapes(32, 3, num_convs=num_convs))
        return random_state(shapes)

    if unsupported("head_options.tower_norm"):
        with pytest.raises(DyheadError, match=r"no GroupNorm .*head_options\.tower_norm = 'none'"):
            convert_state_dict(retinanet(4), "official")  # detectron2's RetinaNet subnets: conv + ReLU, no norm
    else:
        rebuild(convert_state_dict(retinanet(4), "official"))
    conv = convert_state_dict(retinanet(0), "official")
    assert conv.model["head"] == "retinanet" and conv.model["head_options"]["nms_thresh"] == 0.5
    assert conv.model["fpn"]["extra_from"] == "p5"  # the DyHead RetinaNet builds P6 from P5
    rebuild(conv)


# ---------------------------------------------------------------------------------------------------
# with the architecture options in the recipe, the published ResNet models convert faithfully


def test_published_r50_models_convert_without_approximations(tmp_path):
    official = atss_r50_dyhead("official")
    conv = convert_state_dict(official, "official")
    assert conv.gaps == []
    m = conv.model
    assert m["backbone"]["stride_in_1x1"] is True and m["backbone"]["out_norm"] is False and m["fpn"]["p7_relu"] is True
    assert (m["head_options"]["anchor_offset"], m["head_options"]["pred_kernel_size"]) == (0.5, 1)
    model = rebuild(conv)
    assert model.backbone.body.layer2[0].conv1.stride == (2, 2) and model.backbone.body.layer2[0].conv2.stride == (1, 1)

    meta = {"config": REPRO_CONFIG, "mmdet_version": "2.20.0", "CLASSES": COCO_CLASSES}
    conv = convert_state_dict(atss_r50_dyhead("mmdet", seed=1), "mmdet", meta)
    assert conv.gaps == []
    assert conv.model["backbone"]["stride_in_1x1"] is True and conv.model["fpn"]["p7_relu"] is False
    assert conv.model["head_options"]["anchor_offset"] == 0.5 and conv.model["head_options"]["pred_kernel_size"] == 1

    # into our own recipe: "the head's default" sentinels resolve (ATSS: offset 0.5, 1x1); the stride and the
    # input handling differ (ours: RGB ImageNet statistics, the MSRA R-50's: BGR caffe), each named as a
    # recipe value (they were notes, and "our model has no option" for fields it has)
    ours = to_dict(load_recipe("recipes/atss_r50_dyhead_1x_coco.toml").model)
    conv = convert_state_dict(official, "official", model=ours)
    assert [(g.key, g.in_recipe) for g in conv.gaps] == [
        ("backbone.stride_in_1x1", True),
        ("input_format", True),
        ("pixel_mean", True),
        ("pixel_std", True),
    ]
    assert (
        conv.gaps[1].describe()
        == "the recipe's model.input_format = 'RGB', the weights want 'BGR' (the channel order the weights expect)"
    )
    matching = dict(ours, input_format="BGR", pixel_mean=conv.gaps[2].reference, pixel_std=conv.gaps[3].reference)
    matching["backbone"] = dict(ours["backbone"], stride_in_1x1=True)
    assert convert_state_dict(official, "official", model=matching).gaps == []
    aligned = dict(matching, dyhead=dict(matching["dyhead"], offset_mode="aligned"))  # other numbers: refused
    (gap,) = convert_state_dict(official, "official", model=aligned).gaps
    assert (gap.key, gap.reference, gap.ours, gap.approximable) == ("dyhead.offset_mode", "official", "aligned", True)
    narrow = dict(matching, head_options=dict(matching["head_options"], pred_kernel_size=3))  # does not load
    with pytest.raises(
        DyheadError, match=r"the recipe's model.head_options.pred_kernel_size = 3, the weights want 1 .* set the recipe's value"
    ):
        convert_state_dict(official, "official", model=narrow)

    # the command line: no --approximate needed, the written recipe records the options
    src, dst = tmp_path / "atss_r50_dyhead.pth", tmp_path / "atss_r50_dyhead.safetensors"
    torch.save({"model": official}, src)
    result = CliRunner().invoke(app, ["convert", str(src), str(dst), "--from", "official"])
    assert result.exit_code == 0, result.output
    state, meta = load_weights(dst)
    assert meta["converted_from"]["approximations"] == []
    recipe = load_recipe(dst.with_suffix(".toml"))
    assert recipe.model.backbone.stride_in_1x1 is True and recipe.model.head_options.anchor_offset == 0.5
    load_model_weights(build_model(recipe.model), state)  # strict
