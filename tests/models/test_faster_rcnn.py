"""Faster R-CNN pieces worked out by hand: anchors, RPN labelling and losses, proposals, RoI sampling,
level assignment, RoIAlign alignment, box coding, class order, and a loss on an image with no boxes."""

import math

import pytest
import torch
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
)

from dyhead_cli.models.heads.faster_rcnn import FasterRCNNHead
from dyhead_cli.models.heads.roi_heads import (
    assign_levels,
    fast_rcnn_inference,
    fast_rcnn_losses,
    pool_rois,
    sample_proposals,
)
from dyhead_cli.models.heads.rpn import (
    cell_anchor_sizes,
    find_top_proposals,
    label_anchors,
    level_anchors,
    rpn_losses,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RPN_MATCHER = Matcher(0.7, 0.3, allow_low_quality_matches=True)
ROI_MATCHER = Matcher(0.5, 0.5, allow_low_quality_matches=False)


def test_anchor_sizes_keep_the_area_with_h_over_w_ratios():
    sizes = cell_anchor_sizes(32.0, (0.5, 1.0, 2.0))
    r = math.sqrt(2.0)
    assert torch.allclose(sizes, torch.tensor([[32 * r, 32 / r], [32.0, 32.0], [32 / r, 32 * r]]))


def test_level_anchors_rows_are_y_x_anchor_centred_at_multiples_of_the_stride():
    sizes = torch.tensor([[4.0, 2.0], [2.0, 4.0]])
    anchors = level_anchors((2, 3), 8, sizes, torch.device("cpu"))  # centres (0|8|16, 0|8)
    assert anchors.shape == (12, 4)
    assert anchors[0].tolist() == [-2, -1, 2, 1]  # (y=0, x=0), anchor 0
    assert anchors[1].tolist() == [-1, -2, 1, 2]  # (y=0, x=0), anchor 1
    assert anchors[2].tolist() == [6, -1, 10, 1]  # (y=0, x=8), anchor 0
    assert anchors[6].tolist() == [-2, 7, 2, 9]  # (y=8, x=0), anchor 0


# RPN labelling. GT 0 = [0, 0, 10, 10], GT 1 = [40, 40, 50, 50]; IoUs worked out:
ANCHORS = torch.tensor(
    [
        [0.0, 0, 10, 8],  # 0: IoU 80/100 = 0.8 with GT 0 -> positive
        [5.0, 0, 15, 10],  # 1: IoU 50/150 = 0.333 -> between 0.3 and 0.7: ignored
        [20.0, 20, 30, 30],  # 2: IoU 0 -> negative
        [0.0, 0, 10, 6.5],  # 3: IoU 0.65 -> between: ignored (not GT 0's best)
        [42.0, 40, 52, 50],  # 4: IoU 80/120 = 0.667 with GT 1, its best anchor -> positive (low-quality rule)
        [60.0, 60, 70, 70],  # 5: negative
        [0.0, 0, 2, 2],  # 6: IoU 0.04 -> negative
    ]
)
GT = torch.tensor([[0.0, 0, 10, 10], [40.0, 40, 50, 50]])


def test_rpn_labels_follow_iou_thresholds_and_the_best_anchor_of_each_gt():
    labels, matched = label_anchors(ANCHORS, GT, RPN_MATCHER, BalancedPositiveNegativeSampler(256, 0.5))
    assert labels.tolist() == [1, -1, 0, -1, 1, 0, 0]
    assert matched[0].tolist() == GT[0].tolist() and matched[4].tolist() == GT[1].tolist()


def test_rpn_sampling_caps_positives_at_half_of_the_batch():
    torch.manual_seed(0)
    labels, _ = label_anchors(ANCHORS, GT, RPN_MATCHER, BalancedPositiveNegativeSampler(2, 0.5))
    assert (labels == 1).sum() == 1 and (labels == 0).sum() == 1
    assert set(labels[[1, 3]].tolist()) == {-1}  # ignored anchors are never sampled


def test_rpn_labels_without_boxes_are_all_negatives():
    labels, _ = label_anchors(ANCHORS, torch.zeros(0, 4), RPN_MATCHER, BalancedPositiveNegativeSampler(4, 0.5))
    assert (labels == 1).sum() == 0 and (labels == 0).sum() == 4 and (labels == -1).sum() == 3


def test_rpn_losses_sum_over_sampled_anchors_divided_by_batch_size_times_images():
    objectness = torch.tensor([[2.0, 0.0, -1.0]])  # (B=1, N=3)
    deltas = torch.tensor([[[1.0, 0, 0, 0], [5.0, 5, 5, 5], [0.0, 0, 0, 2]]])
    labels = torch.tensor([[1, -1, 0]])
    targets = torch.tensor([[[0.5, 0, 0, 1], [0.0, 0, 0, 0], [9.0, 9, 9, 9]]])
    losses = rpn_losses(objectness, deltas, labels, targets, batch_size_per_image=4)
    bce = math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))  # positive at 2, negative at -1
    assert losses["loss_rpn_cls"].item() == pytest.approx(bce / 4)
    assert losses["loss_rpn_loc"].item() == pytest.approx((0.5 + 1.0) / 4)  # only the positive's L1


def test_proposals_top_n_per_level_clip_and_nms_within_levels_only():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    a0 = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60]])  # level 0
    a1 = torch.tensor([[0.0, 0, 10, 10], [90.0, 90, 130, 130]])  # level 1: a copy of a0[0], one crossing the border
    objectness = [torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0.5, 0.7]])]
    deltas = [torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)]
    (p,) = find_top_proposals(
        [a0, a1], objectness, deltas, [(100, 120)], coder, pre_nms_top_n=2, post_nms_top_n=10, nms_thresh=0.7
    )
    # level 0 keeps its top 2 (a0[0], a0[1]: IoU 0.82 -> a0[1] suppressed); level 1 both, the
    # border one clipped to (h, w) = (100, 120); a1[0] equals a0[0] but NMS is per level.
    assert p.tolist() == [[0, 0, 10, 10], [90, 90, 120, 100], [0, 0, 10, 10]]
    (p,) = find_top_proposals([a0, a1], objectness, deltas, [(100, 120)], coder, 2, 2, 0.7)
    assert len(p) == 2  # post_nms_top_n


def test_roi_sampling_adds_gt_labels_by_iou_and_caps_foreground():
    proposals = torch.tensor([[0.0, 0, 10, 9], [0.0, 0, 10, 4], [30.0, 30, 40, 40], [41.0, 40, 50, 50]])
    gt, labels = GT, torch.tensor([2, 0])
    # IoUs: 0.9 with GT 0 -> class 2; 0.4 -> background; 0 -> background; 0.9 with GT 1 -> class 0;
    # the GT boxes themselves (appended) are foreground too.
    boxes, classes, matched = sample_proposals(proposals, gt, labels, 3, ROI_MATCHER, BalancedPositiveNegativeSampler(64, 0.25))
    assert sorted(classes.tolist()) == [0, 0, 2, 2, 3, 3]  # K = 3 is background
    assert classes[:4].tolist().count(3) == 0  # foreground first
    for _, c, m in zip(boxes, classes, matched):
        if c == 2:
            assert m.tolist() == GT[0].tolist()
    torch.manual_seed(0)
    _, classes, _ = sample_proposals(proposals, gt, labels, 3, ROI_MATCHER, BalancedPositiveNegativeSampler(4, 0.25))
    assert (classes < 3).sum() == 1 and (classes == 3).sum() == 2  # 1 = 25% of 4 foreground, the rest: 2 bg exist


def test_roi_sampling_without_boxes_is_background_only():
    _, classes, _ = sample_proposals(
        torch.tensor([[0.0, 0, 5, 5]]),
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        3,
        ROI_MATCHER,
        BalancedPositiveNegativeSampler(8, 0.25),
    )
    assert classes.tolist() == [3]


def test_level_assignment_is_floor_of_4_plus_log2_size_over_224_clamped():
    sides = torch.tensor([224.0, 112.0, 111.0, 447.0, 448.0, 1000.0, 10.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], dim=1)
    # 224 -> P4, 112 -> P3, 111 -> floor(2.987) = P2, 447 -> P4, 448 -> P5, 1000 -> P5 (clamped), 10 -> P2 (clamped)
    assert (assign_levels(boxes, 2, 5) + 2).tolist() == [4, 3, 2, 4, 5, 5, 2]
    # a 100 x 400 box: sqrt(area) = 200 -> P3
    assert assign_levels(torch.tensor([[0.0, 0, 100, 400]]), 2, 5).tolist() == [1]


def test_pool_rois_reads_each_box_from_its_level_with_aligned_half_pixel_centres():
    # P2..P5 of a 256-px image; level l holds 100 * l + x (x = column index): the pooled values tell the
    # level a box was read from and where the samples were taken.
    strides = (4, 8, 16, 32)
    features = [(100.0 * l + torch.arange(64.0 // 2**l)).expand(1, 2, 64 // 2**l, 64 // 2**l).contiguous() for l in range(4)]
    boxes = [torch.tensor([[0.0, 0, 56, 56], [0.0, 0, 224, 224]])]  # -> P2 (56 px), P4 (224 px)
    pooled = pool_rois(features, boxes, strides, output_size=7)
    assert pooled.shape == (2, 2, 7, 7)
    # box 0 on P2 (stride 4) spans 14 cells: 7 bins of 2 cells, 2 samples per bin (sampling ratio 0 = adaptive)
    # at 2j + 0.5 and 2j + 1.5, shifted by -0.5 with aligned=True: the bin's mean is 2j + 0.5 (2j + 1 unaligned).
    assert torch.allclose(pooled[0, 0, 0], torch.arange(7.0) * 2 + 0.5)
    assert torch.allclose(pooled[1, 0, 0], 200 + torch.arange(7.0) * 2 + 0.5)  # P4: 224 / 16 = 14 cells as well


def test_box_coder_round_trip_with_weights_10_10_5_5():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposal, gt = torch.tensor([[0.0, 0, 10, 20]]), torch.tensor([[2.0, 4, 12, 28]])
    deltas = coder.encode_single(gt, proposal)
    # centres (5, 10) -> (7, 16), sizes (10, 20) -> (10, 24): dx = 10 * 2/10, dy = 10 * 6/20, dw = 0, dh = 5 log 1.2
    assert torch.allclose(deltas, torch.tensor([[2.0, 3.0, 0.0, 5 * math.log(1.2)]]))
    assert torch.allclose(coder.decode_single(deltas, proposal), gt)


def test_inference_drops_background_last_and_uses_each_class_own_deltas():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[10.0, 10, 30, 30], [50.0, 50, 70, 70]])
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 9.0]])  # K = 2: RoI 0 is class 1, RoI 1 background (last)
    deltas = torch.zeros(2, 8)
    deltas[0, 4] = 10.0  # class 1's dx of RoI 0 = 1 box width: shift right by 20
    deltas[0, 0] = -10.0  # class 0's dx (must not be used for the class-1 detection)
    out = fast_rcnn_inference(logits, deltas, proposals, (100, 100), coder, 0.5, 0.5, 100)
    assert out["labels"].tolist() == [1]
    assert out["boxes"].tolist() == [[30.0, 10.0, 50.0, 30.0]]
    assert out["scores"].item() == pytest.approx(math.exp(5) / (math.exp(5) + 2))


def test_inference_keeps_only_the_wanted_labels_before_the_cap():
    """``--classes``: the wanted label's best fill ``detections_per_img``; the others never become candidates."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [40.0, 40, 50, 50]])
    logits = torch.tensor([[9.0, 5.0, 0.0], [9.0, 4.0, 0.0], [0.0, 3.0, 0.0]])  # class 0 best in RoIs 0 and 1
    deltas = torch.zeros(3, 8)
    capped = fast_rcnn_inference(logits, deltas, proposals, (100, 100), coder, 0.001, 0.5, 2)
    assert capped["labels"].tolist() == [0, 0]
    only = fast_rcnn_inference(logits, deltas, proposals, (100, 100), coder, 0.001, 0.5, 2, labels=(1,))
    assert only["labels"].tolist() == [1, 1] and only["boxes"][:, 0].tolist() == [40.0, 0.0]  # RoI 2, then 0


def test_fast_rcnn_losses_ce_mean_and_l1_of_the_own_class_over_sampled_count():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # K = 2
    deltas = torch.arange(16.0).view(2, 8)
    classes = torch.tensor([1, 2])  # RoI 0 class 1, RoI 1 background
    targets = torch.tensor([[4.0, 5.0, 6.0, 8.0], [99.0, 99, 99, 99]])
    losses = fast_rcnn_losses(logits, deltas, classes, targets, num_classes=2)
    ce0 = -math.log(math.exp(0) / (math.exp(2) + 2))
    ce1 = -math.log(math.exp(1) / (math.exp(1) + 2))
    assert losses["loss_cls"].item() == pytest.approx((ce0 + ce1) / 2)
    assert losses["loss_box_reg"].item() == pytest.approx(1.0 / 2)  # deltas[0, 4:8] = 4, 5, 6, 7 vs 4, 5, 6, 8


def tiny_head(**kwargs) -> FasterRCNNHead:
    return FasterRCNNHead(8, 3, (4, 8, 16, 32, 64), fc_dim=16, **kwargs)


def levels(batch: int = 1, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 8, size // s, size // s, generator=g) for s in (4, 8, 16, 32, 64)]


def test_loss_is_finite_on_an_image_without_boxes():
    head = tiny_head().train()
    feats = [f.requires_grad_() for f in levels(2)]
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[4.0, 4, 40, 30]]), "labels": torch.tensor([2])},
    ]
    losses = head.loss(head(feats), targets, [(64, 64), (64, 64)])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    only_empty = head.loss(head(levels(1)), targets[:1], [(64, 64)])
    assert only_empty["loss_rpn_loc"].item() == 0 and only_empty["loss_box_reg"].item() == 0
    assert torch.isfinite(only_empty["loss_cls"]) and only_empty["loss_rpn_cls"].item() > 0


def test_postprocess_boxes_inside_each_image_at_most_detections_per_img():
    head = tiny_head(score_thresh=0.0, detections_per_img=7).eval()
    out = head.postprocess(head(levels(2)), [(64, 64), (40, 50)])
    assert len(out) == 2 and all(len(d["boxes"]) <= 7 for d in out)
    b = out[1]["boxes"]
    assert (b[:, 0::2] <= 50).all() and (b[:, 1::2] <= 40).all() and (b >= 0).all()
    assert all(d["labels"].max() < 3 for d in out if len(d["labels"]))
