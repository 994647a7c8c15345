"""ATSS head: anchors, assignment, losses and post-processing worked out by hand; overfitting; bf16.

Also covers the post-processing and box coder shared by all heads (heads/boxes.py, heads/postprocess.py).
"""

import math

import pytest
import torch
from helpers_detection import overfit, synthetic_batch, tiny_config

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.models.heads.atss import ATSSHead, atss_assign
from dyhead_cli.models.heads.boxes import BoxCoder
from dyhead_cli.models.heads.postprocess import PostprocessOptions, finalize_detections, postprocess_dense

# Hand-made layout: P3 4x4 (stride 8, 16 px anchors, ids 0..15), P4 2x2 (stride 16, 32 px anchors, ids 16..19).
#   P3 centres x, y in (4, 12, 20, 28): id = 4 * row + col;  P4 centres in (8, 24): id = 16 + 2 * row + col.


def tiny_head(**kwargs) -> ATSSHead:
    return ATSSHead(8, 2, (8, 16), anchor_scale=2.0, topk=3, **kwargs)


def zero_features() -> list[torch.Tensor]:
    """Zero features: every prediction equals its conv bias (cls = -log(99), deltas 0, centerness 0)."""
    return [torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2)]


def layout() -> tuple[torch.Tensor, list[int]]:
    head = tiny_head()
    anchors = head.anchors(head(zero_features()))
    return torch.cat(anchors), [len(a) for a in anchors]


def test_anchors_are_square_8_strides_centred_at_half_stride():
    head = ATSSHead(8, 2, (8, 16))  # default anchor_scale = 8: 64 px on P3, 128 px on P4
    a3, a4 = head.anchors(head([torch.zeros(1, 8, 2, 3), torch.zeros(1, 8, 1, 2)]))
    assert a3.shape == (6, 4) and a4.shape == (2, 4)
    assert a3[0].tolist() == [-28, -28, 36, 36]  # centre (4, 4)
    assert a3[1].tolist() == [-20, -28, 44, 36]  # centre (12, 4): x runs fastest
    assert a3[3].tolist() == [-28, -20, 36, 44]  # centre (4, 12): second row
    assert a4.tolist() == [[-56, -56, 72, 72], [-40, -56, 88, 72]]


def test_assign_one_gt_picks_adaptive_positives():
    anchors, counts = layout()
    # GT [0, 0, 28, 8], centre (14, 4). Closest 3 per level: P3 ids 1 (d 2), 2 (d 6), 5 (d 8.2);
    # P4 ids 16 (7.2), 17 (10.8), 18 (20.9). IoUs: 4/11, 4/11, 2/13 | 2/11, 5/34, 0.
    # mean + std = 0.3422 -> ids 1 and 2 (IoU 0.364), both centres (12, 4), (20, 4) inside the GT.
    matched = atss_assign(anchors, counts, torch.tensor([[0.0, 0.0, 28.0, 8.0]]), topk=3)
    expected = torch.full((20,), -1)
    expected[[1, 2]] = 0
    assert torch.equal(matched, expected)


def test_assign_anchor_claimed_by_two_gts_goes_to_the_higher_iou():
    anchors, counts = layout()
    gt1 = [0.0, 0.0, 28.0, 8.0]  # as above: positives 1 and 2 (IoU 4/11 = 0.36 each)
    # GT2 [13, 0, 29, 14], centre (21, 7): candidates P3 2 (0.6), 6 (0.45), 3 (0.29); P4 17 (0.22),
    # 16 (0.14), 19 (0.08): threshold 0.494 -> only id 2, with IoU 0.6 > 0.36, so id 2 goes to GT2.
    gt2 = [13.0, 0.0, 29.0, 14.0]
    matched = atss_assign(anchors, counts, torch.tensor([gt1, gt2]), topk=3)
    assert matched[1] == 0 and matched[2] == 1
    assert (matched[[i for i in range(20) if i not in (1, 2)]] == -1).all()
    swapped = atss_assign(anchors, counts, torch.tensor([gt2, gt1]), topk=3)
    assert swapped[1] == 1 and swapped[2] == 0  # the IoU decides, not the order


def test_assign_needs_the_anchor_centre_inside_the_gt():
    anchors, counts = layout()
    # GT [0, 0, 4, 4]: candidate IoUs 1/16 (id 0), 0, 0 | 1/64 (id 16), 0, 0; threshold 0.038.
    # id 0 passes the IoU test but its centre (4, 4) is the GT's corner (distance 0 < 0.01): no positive.
    matched = atss_assign(anchors, counts, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), topk=3)
    assert (matched == -1).all()
    # Grown by 1 px the corner is inside (distance 1): id 0 becomes positive.
    matched = atss_assign(anchors, counts, torch.tensor([[0.0, 0.0, 5.0, 5.0]]), topk=3)
    assert matched[0] == 0 and (matched[1:] == -1).all()


def test_threshold_uses_the_unbiased_std_like_the_reference():
    # One level whose anchors are all candidates: two concentric with the GT [0, 0, 10, 10] (sides 10 and 12:
    # IoU 1 and 100/144) and one far away (IoU 0). mean 0.565; unbiased std 0.512 -> threshold 1.077, so even
    # the exact anchor fails (the biased std, 0.418, would give 0.983 and take it).
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-1.0, -1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    assert (atss_assign(anchors, [3], gt, topk=3) == -1).all()
    # A fourth candidate with IoU 0: mean 0.424, std 0.505 -> threshold 0.928: the exact anchor passes.
    anchors = torch.cat([anchors, torch.tensor([[70.0, 70.0, 80.0, 80.0]])])
    assert atss_assign(anchors, [4], gt, topk=4).tolist() == [0, -1, -1, -1]


def test_loss_matches_hand_computation():
    head = tiny_head()
    outputs = head(zero_features())
    # Anchor 1 ([4, -4, 20, 12], P3 row 0, col 1) predicts the GT [0, 0, 28, 8] exactly: deltas
    # (10 * 2/16, 10 * 0/16, 5 ln(28/16), 5 ln(8/16)) with the (10, 10, 5, 5) weights. Anchor 2 predicts 0.
    outputs["bbox_reg"][0][0, :, 0, 1] = torch.tensor([1.25, 0.0, 5 * math.log(28 / 16), 5 * math.log(8 / 16)])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 28.0, 8.0]]), "labels": torch.tensor([1])}]
    losses = head.loss(outputs, targets, [(32, 32)])
    # Positives: anchors 1 and 2 (class 1). p = 0.01 everywhere: focal(pos) = 0.25 * 0.99^2 * ln(100),
    # focal(neg) = 0.75 * 0.01^2 * -ln(0.99); 2 positive and 38 negative entries over 2 positives.
    pos = 0.25 * 0.99**2 * math.log(100)
    neg = 0.75 * 0.01**2 * -math.log(0.99)
    assert losses["loss_cls"].item() == pytest.approx((2 * pos + 38 * neg) / 2, rel=1e-5)
    # GIoU loss 0 for anchor 1; anchor 2 decodes to itself, [12, -4, 28, 12]: IoU 4/11, enclosing 28 x 16 = 448,
    # union 352 -> 1 - 4/11 + 96/448. Weighted by the centerness targets of the anchor centres (12, 4):
    # sqrt(12/16 * 4/4), and (20, 4): sqrt(8/20), over their sum; times 2 (the official box loss weight).
    c1, c2 = math.sqrt(12 / 16), math.sqrt(8 / 20)
    assert losses["loss_box"].item() == pytest.approx(2 * c2 * (1 - 4 / 11 + 96 / 448) / (c1 + c2), rel=1e-5)
    # Centerness logits 0: BCE = ln 2 whatever the target; sum over 2 positives / 2.
    assert losses["loss_centerness"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_image_without_objects_gives_cls_loss_only_and_keeps_the_graph():
    head = tiny_head()
    features = [f.requires_grad_() for f in zero_features()]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = head.loss(head(features), targets, [(32, 32)])
    # 40 negative entries, normaliser clamped to 1.
    assert losses["loss_cls"].item() == pytest.approx(40 * 0.75 * 0.01**2 * -math.log(0.99), rel=1e-5)
    assert losses["loss_box"].item() == 0 and losses["loss_centerness"].item() == 0
    assert all(v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert head.bbox_pred.weight.grad is not None and torch.isfinite(head.cls_logits.weight.grad).all()


def test_labels_out_of_range_are_a_user_error():
    head = tiny_head()
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([2])}]
    with pytest.raises(DyheadError, match=r"labels must be in 0..1"):
        head.loss(head(zero_features()), targets, [(32, 32)])


def test_box_coder_weights_clamp_and_inverse():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # centre +5 px on a 10 px anchor -> 10 * 0.5; twice as wide -> 5 * ln 2
    deltas = coder.encode(anchor, torch.tensor([[5.0, 0.0, 25.0, 10.0]]))
    assert deltas[0].tolist() == pytest.approx([10.0, 0.0, 5 * math.log(2), 0.0])
    anchors = torch.rand(50, 2) * 100
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(50, 2) * 60], 1)
    boxes = torch.rand(50, 2) * 100
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(50, 2) * 200], 1)
    assert torch.allclose(coder.decode(coder.encode(anchors, boxes), anchors), boxes, atol=1e-3)
    # dw is clamped at log(1000 / 16): a 10 px anchor grows to at most 625 px.
    huge = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchor)
    assert huge[0, 2] - huge[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-5)
    # from below only as MMDetection decodes: a 10 px anchor shrinks to 0.16 px, not to exp(-20) of it
    tiny = torch.tensor([[0.0, 0.0, -100.0, 0.0]])
    assert (coder.decode(tiny, anchor)[0, 2] - coder.decode(tiny, anchor)[0, 0]).item() < 1e-7
    small = coder.decode(tiny, anchor, clamp_below=True)
    assert small[0, 2] - small[0, 0] == pytest.approx(10 * 16 / 1000, rel=1e-5)


@pytest.mark.parametrize("mode", ["official", "mmdet"])
def test_postprocess_decodes_as_its_reference_does(mode):
    """A shrinking prediction (dw = -5, below -log(1000/16)): the official order keeps the 0.1 px box that
    detectron2's coder gives; the MMDetection order clamps it to 1.6% of the 16 px anchor, 0.256 px."""
    head = tiny_head(postprocess=mode)
    outputs = head(zero_features())
    outputs["cls_logits"][0] = torch.full((1, 2, 4, 4), -10.0)
    outputs["cls_logits"][0][0, 1, 1, 2] = math.log(0.8 / 0.2)  # anchor [12, 4, 28, 20]
    outputs["cls_logits"][1] = torch.full((1, 2, 2, 2), -10.0)
    outputs["bbox_reg"][0][0, :, 1, 2] = torch.tensor([0.0, 0.0, 5 * -5.0, 0.0])
    (result,) = head.postprocess(outputs, [(32, 32)])
    width = result["boxes"][0, 2] - result["boxes"][0, 0]
    want = 16 * (16 / 1000 if mode == "mmdet" else math.exp(-5))
    assert width.item() == pytest.approx(want, rel=1e-4)


def test_postprocess_decodes_the_firing_anchor_with_cls_times_centerness_score():
    head = tiny_head()
    outputs = head(zero_features())
    outputs["cls_logits"][0] = torch.full((1, 2, 4, 4), -10.0)
    outputs["cls_logits"][0][0, 1, 1, 2] = math.log(0.8 / 0.2)  # class 1 at P3 row 1, col 2: anchor [12, 4, 28, 20]
    outputs["cls_logits"][1] = torch.full((1, 2, 2, 2), -10.0)
    outputs["centerness"][0][0, 0, 1, 2] = math.log(0.5 / 0.5)
    outputs["bbox_reg"][0][0, :, 1, 2] = torch.tensor([2.5, 0.0, 0.0, 5 * math.log(0.5)])  # x + 16/4, half height
    (result,) = head.postprocess(outputs, [(30, 36)])
    assert result["boxes"].tolist() == [pytest.approx([16.0, 8.0, 32.0, 16.0])]
    assert result["scores"].tolist() == pytest.approx([0.8 * 0.5])  # no square root (official and MMDetection)
    assert result["labels"].tolist() == [1]
    (clipped,) = head.postprocess(outputs, [(30, 26)])  # (h, w): x clipped at 26
    assert clipped["boxes"].tolist() == [pytest.approx([16.0, 8.0, 26.0, 16.0])]


def test_reference_variants_tower_norm_kernel_and_offset():
    head = ATSSHead(32, 2, (8,), num_convs=2, tower_norm="none", pred_kernel_size=3, anchor_offset=0.0)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())
    assert len(head.cls_tower) == 4 and head.cls_logits.weight.shape == (2, 32, 3, 3)
    (anchors,) = head.anchors(head([torch.zeros(1, 32, 1, 1)]))
    assert anchors.tolist() == [[-32, -32, 32, 32]]
    gn = ATSSHead(32, 2, (8,), num_convs=2)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in gn.modules()) == 4
    assert gn.cls_logits.weight.shape == (2, 32, 1, 1)  # official: 1x1 predictors
    with pytest.raises(DyheadError, match="divisible by 32"):
        ATSSHead(48, 2, (8,), num_convs=1)


def test_nms_same_class_suppressed_other_class_kept_and_cap():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60], [70, 70, 80, 80]]).float()
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 1, 0, 0])
    # IoU(box 0, box 1) = 90 / 110 > 0.6: box 1 goes; box 2 overlaps as much but is another class.
    out = finalize_detections(boxes, scores, labels, (100, 100), nms_thresh=0.6, detections_per_img=100)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5])
    assert out["labels"].tolist() == [0, 1, 0, 0]
    capped = finalize_detections(boxes, scores, labels, (100, 100), nms_thresh=0.6, detections_per_img=2)
    assert capped["scores"].tolist() == pytest.approx([0.9, 0.7])
    # Lower IoU than the threshold: both stay.
    kept = finalize_detections(boxes[:2], scores[:2], labels[:2], (100, 100), nms_thresh=0.9, detections_per_img=100)
    assert len(kept["boxes"]) == 2


def test_nms_runs_on_unclipped_boxes_then_clips_and_drops_empty_ones():
    # Unclipped IoU([-50, 0, 10, 10], [0, 0, 10, 10]) = 100 / 600: both stay (detectron2's order), although
    # they are the same box once clipped; [120, 0, 130, 10] is empty inside the 100 px wide image.
    boxes = torch.tensor([[-50, 0, 10, 10], [0, 0, 10, 10], [120, 0, 130, 10]]).float()
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long)
    out = finalize_detections(boxes, scores, labels, (50, 100), nms_thresh=0.6, detections_per_img=100)
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.8])


def test_postprocess_dense_threshold_and_per_level_top_n():
    # One image, two levels with 3 locations x 2 classes each; boxes far apart so NMS keeps everything.
    s1 = torch.tensor([[[0.9, 0.01], [0.3, 0.04], [0.2, 0.7]]])  # (B, P, K)
    s2 = torch.tensor([[[0.06, 0.5], [0.02, 0.03], [0.4, 0.0]]])
    b1 = torch.tensor([[[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]]).float()
    b2 = torch.tensor([[[0, 40, 10, 50], [20, 40, 30, 50], [40, 40, 50, 50]]]).float()
    boxes = [b1[0], b2[0]]
    opts = PostprocessOptions(score_thresh=0.05, pre_nms_top_n=2, nms_thresh=0.6, detections_per_img=100)
    (out,) = postprocess_dense([s1, s2], None, lambda level, i, loc: boxes[level][loc], [(64, 64)], opts)
    # Level 1 keeps its best 2 of {0.9, 0.3, 0.2, 0.7}; level 2 its best 2 of {0.06, 0.5, 0.4}.
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.4])
    assert out["labels"].tolist() == [0, 1, 1, 0]
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [40, 0, 50, 10], [0, 40, 10, 50], [40, 40, 50, 50]]


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = build_model(tiny_config("atss", 1)).train()
    images, targets = synthetic_batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, [(128, 128)] * 2, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_centerness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_overfit_atss_with_dyhead():
    images, targets = synthetic_batch(4)
    steps, ap50, seconds = overfit(tiny_config("atss", num_blocks=1), images, targets, max_steps=200)
    print(f"\noverfit atss dyhead=1: {steps} steps, AP50 {ap50:.3f}, {seconds:.1f} s")
    assert ap50 > 0.9


@pytest.mark.slow
def test_overfit_atss_without_dyhead():
    images, targets = synthetic_batch(4)
    steps, ap50, seconds = overfit(tiny_config("atss", num_blocks=0, num_convs=4), images, targets, max_steps=300)
    print(f"\noverfit atss dyhead=0: {steps} steps, AP50 {ap50:.3f}, {seconds:.1f} s")
    assert ap50 > 0.9
