"""FCOS head: points, centre sampling, size ranges, ambiguity, losses and decoding by hand; overfitting; bf16."""

import math

import pytest
import torch
from helpers_detection import overfit, synthetic_batch, tiny_config

from dyhead_cli.models.build import build_model
from dyhead_cli.models.heads.boxes import decode_ltrb, encode_ltrb
from dyhead_cli.models.heads.fcos import FCOSHead, fcos_assign

# Hand-made layout for a 64 x 64 image: P3 8x8 points (stride 8, ids 0..63, centres 4, 12, ..., 60),
# P4 4x4 points (stride 16, ids 64..79, centres 8, 24, 40, 56); id = 8 * row + col (P3), 64 + 4 * row + col (P4).


def tiny_head(size_ranges=((0, 64), (64, math.inf))) -> FCOSHead:
    return FCOSHead(8, 3, (8, 16), num_convs=0, size_ranges=size_ranges)


def zero_features() -> list[torch.Tensor]:
    return [torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)]


def assign(head: FCOSHead, boxes: list[list[float]], radius: float = 1.5) -> torch.Tensor:
    points, strides, ranges = head.locations(head(zero_features()))
    return fcos_assign(points, strides, ranges, torch.tensor(boxes), radius)


def test_points_are_half_stride_grid_with_their_strides_and_ranges():
    head = FCOSHead(8, 3, (8, 16), num_convs=0, size_ranges=((0, 64), (64, math.inf)))
    points, strides, ranges = head.locations(head([torch.zeros(1, 8, 2, 3), torch.zeros(1, 8, 1, 2)]))
    assert points.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert strides.tolist() == [8] * 6 + [16] * 2
    assert ranges[0].tolist() == [0, 64] and ranges[-1].tolist() == [64, math.inf]


def test_centre_sampling_and_smallest_gt_wins():
    head = tiny_head()
    # GT0 [0, 0, 40, 40]: centre region 1.5 * 8 = 12 px -> [8, 32]^2 -> P3 points with x, y in {12, 20, 28}.
    # GT1 [16, 16, 32, 32] (smaller): region clipped to the box -> points {20, 28}^2, which it takes from GT0.
    # P4: the largest ltrb distance (<= 32) is outside (64, inf], so no P4 point.
    matched = assign(head, [[0, 0, 40, 40], [16, 16, 32, 32]])
    expected = torch.full((80,), -1)
    expected[[9, 10, 11, 17, 25]] = 0
    expected[[18, 19, 26, 27]] = 1
    assert torch.equal(matched, expected)
    # Without centre sampling every P3 point inside GT0 (5 x 5) is a candidate; GT1 still takes its 4.
    matched = assign(head, [[0, 0, 40, 40], [16, 16, 32, 32]], radius=0.0)
    assert (matched == 0).sum() == 21 and (matched == 1).sum() == 4


def test_size_ranges_send_big_objects_to_coarse_levels():
    head = tiny_head(size_ranges=((0, 32), (32, math.inf)))
    # GT [0, 0, 64, 48], centre (32, 24). P3 candidates (28|36, 20|28) reach 36 > 32: none.
    # P4 region 24 px -> x in {24, 40}, y in {8, 24, 40}: largest distance 40 in (32, inf]: 6 points.
    matched = assign(head, [[0, 0, 64, 48]])
    expected = torch.full((80,), -1)
    expected[[65, 66, 69, 70, 73, 74]] = 0
    assert torch.equal(matched, expected)
    # Bounds are inclusive (official FCOS): GT [0, 0, 40, 40] has its 9 P3 points (reach <= 28) and the P4
    # points (8, 8), (24, 8), (8, 24) whose reach is exactly 32; (24, 24) reaches 24 only.
    matched = assign(head, [[0, 0, 40, 40]])
    expected = torch.full((80,), -1)
    expected[[9, 10, 11, 17, 18, 19, 25, 26, 27, 64, 65, 68]] = 0
    assert torch.equal(matched, expected)


def test_loss_with_constant_predictions_matches_hand_computation():
    head = tiny_head()
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]]), "labels": torch.tensor([2])}]
    losses = head.loss(head(zero_features()), targets, [(64, 64)])
    # 9 positives (see above); 80 points x 3 classes = 240 entries, 231 negative. p = 0.01.
    pos = 0.25 * 0.99**2 * math.log(100)
    neg = 0.75 * 0.01**2 * -math.log(0.99)
    assert losses["loss_cls"].item() == pytest.approx((9 * pos + 231 * neg) / 9, rel=1e-5)
    # ReLU(0) distances: each prediction is a point inside the GT -> IoU 0, enclosing box = GT -> GIoU loss 1.
    assert losses["loss_box"].item() == pytest.approx(1.0, rel=1e-5)
    assert losses["loss_centerness"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_image_without_objects_gives_cls_loss_only_and_keeps_the_graph():
    head = tiny_head()
    features = [f.requires_grad_() for f in zero_features()]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = head.loss(head(features), targets, [(64, 64)])
    assert losses["loss_cls"].item() == pytest.approx(240 * 0.75 * 0.01**2 * -math.log(0.99), rel=1e-5)
    assert losses["loss_box"].item() == 0 and losses["loss_centerness"].item() == 0
    sum(losses.values()).backward()
    assert features[0].grad is not None and torch.isfinite(features[0].grad).all()


def test_ltrb_coder_inverse_and_values():
    points = torch.tensor([[20.0, 12.0]])
    box = torch.tensor([[12.0, 8.0, 36.0, 20.0]])
    assert encode_ltrb(points, box, torch.tensor([8.0])).tolist() == [[1.0, 0.5, 2.0, 1.0]]
    points = torch.rand(40, 2) * 100
    boxes = torch.cat([points - torch.rand(40, 2) * 50 - 1, points + torch.rand(40, 2) * 50 + 1], 1)
    strides = torch.tensor([8.0, 16.0, 32.0, 64.0] * 10)
    assert torch.allclose(decode_ltrb(points, encode_ltrb(points, boxes, strides), strides), boxes, atol=1e-4)


def test_postprocess_decodes_distances_in_strides():
    head = tiny_head()
    outputs = head(zero_features())
    outputs["cls_logits"] = [torch.full_like(x, -10.0) for x in outputs["cls_logits"]]
    outputs["cls_logits"][0][0, 2, 1, 2] = math.log(0.8 / 0.2)  # class 2 at P3 row 1, col 2: point (20, 12)
    outputs["bbox_reg"][0][0, :, 1, 2] = torch.tensor([1.0, 0.5, 2.0, 1.0])  # l, t, r, b in strides (8 px)
    (result,) = head.postprocess(outputs, [(64, 30)])
    assert result["boxes"].tolist() == [[12.0, 8.0, 30.0, 20.0]]  # [12, 8, 36, 20] clipped to width 30
    assert result["scores"].tolist() == pytest.approx([0.8 * 0.5])
    assert result["labels"].tolist() == [2]


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = build_model(tiny_config("fcos", 1)).train()
    images, targets = synthetic_batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, [(128, 128)] * 2, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_centerness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("num_blocks, num_convs", [(1, 0), (0, 4)], ids=["dyhead", "plain"])
def test_overfit_fcos(num_blocks, num_convs):
    images, targets = synthetic_batch(4)
    cfg = tiny_config("fcos", num_blocks=num_blocks, num_convs=num_convs)
    steps, ap50, seconds = overfit(cfg, images, targets, max_steps=300)
    print(f"\noverfit fcos dyhead={num_blocks}: {steps} steps, AP50 {ap50:.3f}, {seconds:.1f} s")
    assert ap50 > 0.9
