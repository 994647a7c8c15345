"""Converting the official Faster R-CNN + DyHead (detectron2, configs/dyhead_r50_rcnn_fpn_1x.yaml) into ours.

The synthetic checkpoints carry detectron2's names and shapes: ``bottom_up.*`` (ResNet), ``fpn_lateral2..5`` /
``fpn_output2..5`` (no top-block weights: P6 is a max-pool), ``dyhead_tower.<i>.*``,
``proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}``, ``roi_heads.box_head.fc1/fc2``,
``roi_heads.box_predictor.{cls_score (K+1, background last), bbox_pred (4K)}``. The official DyHead
wraps detectron2's FPN backbone (``backbone.backbone.bottom_up.*``); both that and the flat
``backbone.bottom_up.*`` spelling are tested. Outputs of the converted model are compared with the same
weights used the detectron2 way, written out here independently of the model code.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_reference_keys import (
    detectron2_resnet_shapes,
    dyhead_shapes,
    resnet_stage_channels,
)
from torchvision.ops import batched_nms, roi_align

from dyhead_cli.convert.capabilities import COCO_CLASSES
from dyhead_cli.convert.checkpoint import convert_state_dict
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import ModelConfig, from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def rcnn_shapes(prefix: str, depth: int, channels: int, num_blocks: int, num_classes: int, fc_dim: int) -> dict:
    """The official Faster R-CNN + DyHead's key -> shape; ``prefix`` is where detectron2's FPN backbone sits."""
    shapes = detectron2_resnet_shapes(f"{prefix}bottom_up.", depth)
    for level, c_in in zip((2, 3, 4, 5), resnet_stage_channels(depth)):
        shapes[f"{prefix}fpn_lateral{level}.weight"], shapes[f"{prefix}fpn_lateral{level}.bias"] = (
            (channels, c_in, 1, 1),
            (channels,),
        )
        shapes[f"{prefix}fpn_output{level}.weight"], shapes[f"{prefix}fpn_output{level}.bias"] = (
            (channels, channels, 3, 3),
            (channels,),
        )
    shapes.update(dyhead_shapes("official", channels, num_blocks))
    rpn, box = "proposal_generator.rpn_head.", "roi_heads."
    shapes[f"{rpn}conv.weight"], shapes[f"{rpn}conv.bias"] = (channels, channels, 3, 3), (channels,)
    shapes[f"{rpn}objectness_logits.weight"], shapes[f"{rpn}objectness_logits.bias"] = (3, channels, 1, 1), (3,)
    shapes[f"{rpn}anchor_deltas.weight"], shapes[f"{rpn}anchor_deltas.bias"] = (12, channels, 1, 1), (12,)
    shapes[f"{box}box_head.fc1.weight"], shapes[f"{box}box_head.fc1.bias"] = (fc_dim, channels * 49), (fc_dim,)
    shapes[f"{box}box_head.fc2.weight"], shapes[f"{box}box_head.fc2.bias"] = (fc_dim, fc_dim), (fc_dim,)
    shapes[f"{box}box_predictor.cls_score.weight"] = (num_classes + 1, fc_dim)
    shapes[f"{box}box_predictor.cls_score.bias"] = (num_classes + 1,)
    shapes[f"{box}box_predictor.bbox_pred.weight"], shapes[f"{box}box_predictor.bbox_pred.bias"] = (
        (4 * num_classes, fc_dim),
        (4 * num_classes,),
    )
    return shapes


def random_values(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (running variances positive), so any mix-up of rows or columns shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        if key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("norm.weight", "bn.weight")):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


PREFIXES = ["backbone.backbone.", "backbone."]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_official_faster_rcnn_r50_dyhead_converts_with_a_strict_load(prefix):
    shapes = rcnn_shapes(prefix, 50, 256, 6, 80, 1024)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    conv = convert_state_dict(state, "official")
    m = conv.model
    assert m["head"] == "faster_rcnn" and m["num_classes"] == 80 and m["class_names"] == list(COCO_CLASSES)
    assert m["fpn"]["levels"] == [2, 3, 4, 5, 6] and m["fpn"]["top_block"] == "maxpool"
    assert m["dyhead"]["num_blocks"] == 6 and m["dyhead"]["offset_mode"] == "official"
    assert m["rcnn"]["fc_dim"] == 1024 and m["head_options"]["nms_thresh"] == 0.5
    assert m["backbone"]["stride_in_1x1"] is True and m["input_format"] == "BGR"  # MSRA R-50, as for ATSS
    assert conv.dropped == {} and conv.gaps == []
    assert conv.reference.size_divisibility == 64  # dyhead.py pads to the last output stride: P6's
    model = build_model(from_dict(ModelConfig, m, "model."))
    model.load_state_dict(conv.state_dict, strict=True)
    renamed = {
        "head.rpn.anchor_deltas.weight": "proposal_generator.rpn_head.anchor_deltas.weight",
        "head.box_head.fc1.weight": "roi_heads.box_head.fc1.weight",
        "head.box_predictor.cls_score.bias": "roi_heads.box_predictor.cls_score.bias",
        "fpn.fpn.inner_blocks.0.0.weight": f"{prefix}fpn_lateral2.weight",
        "fpn.fpn.layer_blocks.3.0.bias": f"{prefix}fpn_output5.bias",
        "backbone.body.layer1.0.conv1.weight": f"{prefix}bottom_up.res2.0.conv1.weight",
    }
    for ours, theirs in renamed.items():
        assert conv.state_dict[ours] is state[theirs]


# ---------------------------------------------------------------------------------------------------
# the detectron2 way, written out from its code (anchors, RPN outputs, proposals, RoI pooling, inference)


def d2_anchors(shape: tuple[int, int], stride: int, size: float) -> torch.Tensor:
    """DefaultAnchorGenerator: cell anchors for (size, ratio) pairs, then shifted over the grid, offset 0."""
    cells = []
    for ratio in (0.5, 1.0, 2.0):
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        cells.append([-w / 2, -h / 2, w / 2, h / 2])
    cells = torch.tensor(cells)
    ys, xs = torch.arange(shape[0]) * float(stride), torch.arange(shape[1]) * float(stride)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([shift_x.reshape(-1), shift_y.reshape(-1)] * 2, dim=1)
    return (shifts.view(-1, 1, 4) + cells.view(1, -1, 4)).reshape(-1, 4)


def d2_apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Box2BoxTransform.apply_deltas: deltas (R, 4k), boxes (R, 4) -> (R, 4k)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=math.log(1000.0 / 16))
    dh = (deltas[:, 3::4] / wh).clamp(max=math.log(1000.0 / 16))
    cx, cy = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    w, h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=2)  # (R, k, 4)
    return out.reshape(deltas.shape)


def clip(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def d2_proposals(state: dict, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """StandardRPNHead + RPN.predict_proposals + find_top_rpn_proposals (test: pre 1000, NMS 0.7, post 1000)."""
    rpn = "proposal_generator.rpn_head."
    scores, boxes, level_ids = [], [], []
    for i, (x, stride) in enumerate(zip(levels, (4, 8, 16, 32, 64))):
        t = F.relu(F.conv2d(x, state[f"{rpn}conv.weight"], state[f"{rpn}conv.bias"], padding=1))
        logits = F.conv2d(t, state[f"{rpn}objectness_logits.weight"], state[f"{rpn}objectness_logits.bias"])
        deltas = F.conv2d(t, state[f"{rpn}anchor_deltas.weight"], state[f"{rpn}anchor_deltas.bias"])
        n, _, hi, wi = logits.shape
        logits = logits.permute(0, 2, 3, 1).flatten(1)[0]  # (Hi*Wi*A,)
        deltas = deltas.view(n, -1, 4, hi, wi).permute(0, 3, 4, 1, 2).flatten(1, -2)[0]  # (Hi*Wi*A, 4)
        decoded = d2_apply_deltas(deltas, d2_anchors((hi, wi), stride, 8.0 * stride), (1.0, 1.0, 1.0, 1.0))
        top = logits.topk(min(1000, len(logits))).indices
        scores.append(logits[top])
        boxes.append(decoded[top])
        level_ids.append(torch.full((len(top),), i))
    scores, boxes, level_ids = torch.cat(scores), clip(torch.cat(boxes), *size), torch.cat(level_ids)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    scores, boxes, level_ids = scores[keep], boxes[keep], level_ids[keep]
    return boxes[batched_nms(boxes, scores, level_ids, 0.7)[:1000]]


def d2_detections(state: dict, levels: list[torch.Tensor], proposals: torch.Tensor, size: tuple[int, int], k: int) -> dict:
    """ROIPooler (ROIAlignV2, levels by assign_boxes_to_levels) + FastRCNNConvFCHead + fast_rcnn_inference."""
    lvl = torch.floor(4 + torch.log2(((proposals[:, 2:] - proposals[:, :2]).prod(1)).sqrt() / 224 + 1e-8)).clamp(2, 5).long() - 2
    rois = torch.cat([torch.zeros(len(proposals), 1), proposals], dim=1)
    pooled = torch.zeros(len(proposals), levels[0].shape[1], 7, 7)
    for i, stride in enumerate((4, 8, 16, 32)):
        index = (lvl == i).nonzero().squeeze(1)
        pooled[index] = roi_align(levels[i], rois[index], 7, 1.0 / stride, sampling_ratio=0, aligned=True)
    b = "roi_heads."
    x = F.relu(F.linear(pooled.flatten(1), state[f"{b}box_head.fc1.weight"], state[f"{b}box_head.fc1.bias"]))
    x = F.relu(F.linear(x, state[f"{b}box_head.fc2.weight"], state[f"{b}box_head.fc2.bias"]))
    scores = F.softmax(F.linear(x, state[f"{b}box_predictor.cls_score.weight"], state[f"{b}box_predictor.cls_score.bias"]), -1)
    deltas = F.linear(x, state[f"{b}box_predictor.bbox_pred.weight"], state[f"{b}box_predictor.bbox_pred.bias"])
    boxes = clip(d2_apply_deltas(deltas, proposals, (10.0, 10.0, 5.0, 5.0)).view(-1, k, 4), *size)
    scores = scores[:, :-1]  # detectron2: background is the last class
    roi, label = (scores > 0.05).nonzero().unbind(1)
    boxes, scores = boxes[roi, label], scores[roi, label]
    keep = batched_nms(boxes, scores, label, 0.5)[:100]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": label[keep]}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_converted_weights_give_detectron2s_proposals_and_detections(prefix):
    k = 5
    state = random_values(rcnn_shapes(prefix, 18, 32, 1, k, 64))
    conv = convert_state_dict(state, "official")
    model = build_model(from_dict(ModelConfig, conv.model, "model."))
    model.load_state_dict(conv.state_dict, strict=True)
    model.eval()
    size = (96, 128)
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        levels = model.features(image)
        outputs = model.head(levels)
        (ours_proposals,) = model.head.proposals(outputs, [size])
        (ours,) = model.head.postprocess(outputs, [size])
        theirs_proposals = d2_proposals(state, levels, size)
        theirs = d2_detections(state, levels, theirs_proposals, size, k)
    assert len(ours_proposals) > 50
    torch.testing.assert_close(ours_proposals, theirs_proposals)
    assert len(ours["boxes"]) > 10
    assert ours["labels"].tolist() == theirs["labels"].tolist()
    torch.testing.assert_close(ours["scores"], theirs["scores"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"])


def test_mmdetection_two_stage_and_mixed_heads_are_refused():
    state = random_values(rcnn_shapes("backbone.backbone.", 18, 32, 1, 3, 16))
    state["head.cls_logits.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(DyheadError, match="both two-stage heads"):
        convert_state_dict(state, "official")
    with pytest.raises(DyheadError, match="MMDetection two-stage"):
        convert_state_dict({"neck.1.dyhead_blocks.0.x": torch.zeros(1), "rpn_head.rpn_conv.weight": torch.zeros(1)}, "mmdet")
