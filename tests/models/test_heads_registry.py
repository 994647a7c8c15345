"""The head registry, ``resolve_model_config`` (per-head defaults, choice keys) and the heads' state-dict names.

The key lists below are the names the heads had before the shared ``DenseHead`` (and that checkpoints and
``dyhead convert`` use): a state dict with exactly these keys must load strictly.
"""

import dataclasses

import pytest
import torch
from helpers_detection import tiny_config

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model, resolve_model_config
from dyhead_cli.models.heads import HEADS, atss, fcos, retinanet
from dyhead_cli.recipe import HeadOptions, ModelConfig, dump_toml, recipe_from_dict, to_dict

pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = [f"head.scales.{i}.scale" for i in range(5)]
PREDICTORS = [f"head.{m}.{p}" for m in ("cls_logits", "bbox_pred") for p in ("weight", "bias")]
CENTERNESS = ["head.centerness.weight", "head.centerness.bias"]


def tower(name: str, convs: list[int], norms: list[int]) -> list[str]:
    return [f"head.{name}.{i}.{p}" for i in sorted(convs + norms) for p in ("weight", "bias")]


# head, num_convs, tower_norm -> every head.* key, in order, as the previous heads wrote them
OLD_KEYS = {
    ("atss", 0, "gn"): PREDICTORS + CENTERNESS + SCALES,
    ("fcos", 0, "gn"): PREDICTORS + CENTERNESS + SCALES,
    ("retinanet", 0, "gn"): PREDICTORS,
    ("atss", 2, "gn"): tower("cls_tower", [0, 3], [1, 4])
    + tower("bbox_tower", [0, 3], [1, 4])
    + PREDICTORS
    + CENTERNESS
    + SCALES,
    ("fcos", 2, "gn"): tower("cls_tower", [0, 3], [1, 4])
    + tower("bbox_tower", [0, 3], [1, 4])
    + PREDICTORS
    + CENTERNESS
    + SCALES,
    ("retinanet", 2, "none"): tower("cls_tower", [0, 2], []) + tower("bbox_tower", [0, 2], []) + PREDICTORS,
}


@pytest.mark.parametrize("head, num_convs, norm", list(OLD_KEYS), ids=lambda v: str(v))
def test_head_state_dict_keeps_the_previous_names_and_loads_strictly(head, num_convs, norm):
    torch.manual_seed(0)
    model = build_model(tiny_config(head, 0, num_convs=num_convs, tower_norm=norm))
    keys = [k for k in model.state_dict() if k.startswith("head.")]
    assert keys == OLD_KEYS[(head, num_convs, norm)]
    # A state dict of another model with these names (random values) loads strictly and is used.
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    fresh = build_model(tiny_config(head, 0, num_convs=num_convs, tower_norm=norm))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.head.cls_logits.weight, state["head.cls_logits.weight"])


@pytest.mark.parametrize("head, offset, kernel", [("atss", 0.5, 1), ("fcos", 0.5, 3), ("retinanet", 0.0, 3)])
def test_resolve_fills_the_head_defaults_declared_in_its_module(head, offset, kernel):
    cfg = ModelConfig(head=head)
    assert cfg.head_options.anchor_offset is None and cfg.head_options.pred_kernel_size is None
    resolved = resolve_model_config(cfg)
    assert (resolved.head_options.anchor_offset, resolved.head_options.pred_kernel_size) == (offset, kernel)
    head_class = {"atss": atss.ATSSHead, "fcos": fcos.FCOSHead, "retinanet": retinanet.RetinaNetHead}[head]
    assert HEADS[head].head is head_class and HEADS[head].defaults == head_class.DEFAULTS
    built = head_class(32, 2, (8, 16, 32, 64, 128))  # the constructor's defaults are the same declaration
    assert (built.anchor_offset, built.cls_logits.kernel_size) == (offset, (kernel, kernel))
    assert resolve_model_config(resolved) == resolved  # idempotent
    assert cfg.head_options.anchor_offset is None  # the input is not changed


def test_resolve_keeps_values_the_recipe_sets_and_the_model_uses_them():
    cfg = tiny_config("atss", 0, anchor_offset=0.0, pred_kernel_size=3)
    resolved = resolve_model_config(cfg)
    assert (resolved.head_options.anchor_offset, resolved.head_options.pred_kernel_size) == (0.0, 3)
    model = build_model(cfg)
    assert model.head.anchor_offset == 0.0 and model.head.cls_logits.kernel_size == (3, 3)
    default = build_model(tiny_config("atss", 0))
    assert default.head.anchor_offset == 0.5 and default.head.cls_logits.kernel_size == (1, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(head="atsss"),
            "recipe key 'model.head' = 'atsss' is not one of atss, fcos, retinanet, faster_rcnn (did you mean 'atss'?)",
        ),
        (dict(input_format="RBG"), "recipe key 'model.input_format' = 'RBG' is not one of RGB, BGR"),
        (
            dict(dyhead=dict(offset_mode="mmdett")),
            "'model.dyhead.offset_mode' = 'mmdett' is not one of official, mmdet, aligned (did you mean 'mmdet'?)",
        ),
        (dict(dyhead=dict(impl="fats")), "'model.dyhead.impl' = 'fats' is not one of fast, reference"),
        (dict(head_options=dict(box_loss="l1")), "'model.head_options.box_loss' = 'l1' is not one of giou, smooth_l1"),
        (dict(head_options=dict(tower_norm="bn")), "'model.head_options.tower_norm' = 'bn' is not one of gn, none"),
        (
            dict(head_options=dict(postprocess="mmdetection")),
            "'model.head_options.postprocess' = 'mmdetection' is not one of official, mmdet (did you mean 'mmdet'?)",
        ),
        (dict(head_options=dict(pred_kernel_size=2)), "pred_kernel_size' must be a positive odd number, got 2"),
        (dict(head_options=dict(anchor_offset=1.0)), "anchor_offset' must be in [0, 1), got 1.0"),
    ],
)
def test_resolve_rejects_unknown_choices_in_one_line(change, message):
    cfg = ModelConfig()
    for key, value in change.items():
        if isinstance(value, dict):
            value = dataclasses.replace(getattr(cfg, key), **value)
        setattr(cfg, key, value)
    with pytest.raises(DyheadError) as info:
        resolve_model_config(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DyheadError):
        build_model(cfg)


def test_head_default_options_are_absent_from_toml_and_come_back_as_none():
    values = to_dict(recipe_from_dict({"model": {"head": "retinanet"}}))
    assert values["model"]["head_options"]["anchor_offset"] is None
    text = dump_toml(values)
    assert "anchor_offset" not in text and "pred_kernel_size" not in text and 'postprocess = "official"' in text
    set_values = recipe_from_dict({"model": {"head_options": {"anchor_offset": 0, "pred_kernel_size": 3}}})
    assert set_values.model.head_options.anchor_offset == 0.0 and isinstance(set_values.model.head_options.anchor_offset, float)
    assert "anchor_offset = 0.0" in dump_toml(to_dict(set_values))
    with pytest.raises(DyheadError, match="anchor_offset' must be of type float"):
        recipe_from_dict({"model": {"head_options": {"anchor_offset": "half"}}})
    assert HeadOptions(anchor_offset=None).anchor_offset is None


@pytest.mark.parametrize("head", sorted(HEADS))
def test_detections_carry_no_autograd_graph(head):
    """Inference outputs of every head are plain tensors (post-processing runs without autograd), so they
    hold no activations and ``.numpy()`` works, even when the caller did not turn autograd off."""
    cfg = tiny_config(head, num_blocks=1, score_thresh=0.0)
    if head == "faster_rcnn":  # RoIs pooled from P2..P5
        cfg.fpn = dataclasses.replace(cfg.fpn, levels=[2, 3, 4, 5, 6], top_block="maxpool")
    model = build_model(cfg).eval()
    (found,) = model(torch.rand(1, 3, 64, 64) * 255, [(64, 64)])
    assert len(found["scores"]) > 0
    assert not any(t.requires_grad for t in found.values()), head
    found["boxes"].numpy()
