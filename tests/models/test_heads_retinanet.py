"""RetinaNet head: anchors, IoU matching, losses and decoding by hand; overfitting; bf16."""

import math

import pytest
import torch
from helpers_detection import overfit, synthetic_batch, tiny_config

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.models.heads.boxes import BoxCoder
from dyhead_cli.models.heads.retinanet import RetinaNetHead, retinanet_match

R2 = math.sqrt(2)


def test_nine_anchors_per_location_size_major():
    head = RetinaNetHead(8, 2, (8, 16), num_convs=0)
    a3, a4 = head.anchors(head([torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 1, 1)]))
    assert a3.shape == (2 * 2 * 9, 4) and a4.shape == (9, 4)
    # Location (0, 0), base 4 * 8 = 32: ratio h/w 0.5 -> 32*sqrt2 x 16*sqrt2; ratio 1 -> 32 x 32; ratio 2.
    assert a3[0].tolist() == pytest.approx([-16 * R2, -8 * R2, 16 * R2, 8 * R2])
    assert a3[1].tolist() == pytest.approx([-16, -16, 16, 16])
    assert a3[2].tolist() == pytest.approx([-8 * R2, -16 * R2, 8 * R2, 16 * R2])
    s = 32 * 2 ** (1 / 3)  # second scale
    assert a3[4].tolist() == pytest.approx([-s / 2, -s / 2, s / 2, s / 2])
    assert torch.allclose(a3[9:18] - a3[:9], torch.tensor([8.0, 0.0, 8.0, 0.0]))  # next location: x + 8 (offset 0)
    assert a4[1].tolist() == pytest.approx([-32, -32, 32, 32])


def test_match_thresholds_ignore_band_and_low_quality():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    anchors = torch.tensor(
        [
            [0, 0, 10, 12],  # IoU 100/120 = 0.83 -> GT 0
            [0, 0, 10, 20],  # 100/200 = 0.5 -> GT 0 (>= 0.5)
            [0, 0, 10, 22.5],  # 100/225 = 0.44 -> ignored
            [5, 0, 15, 10],  # 50/150 = 0.33 -> background
            [50, 50, 70, 70],  # 100/400 = 0.25, but GT 1's best anchor -> GT 1 (low-quality match)
            [52, 50, 72, 70],  # 80/420 = 0.19 -> background
            [100, 100, 110, 110],  # 0 -> background
        ]
    ).float()
    assert retinanet_match(anchors, gt).tolist() == [0, 0, -2, -1, 1, -1, -1]
    assert retinanet_match(anchors, gt, low_quality=False).tolist() == [0, 0, -2, -1, -1, -1, -1]
    assert retinanet_match(anchors, gt[:0]).tolist() == [-1] * 7


def one_anchor_head(box_loss: str) -> RetinaNetHead:
    """One 32 px square anchor per location of a stride-8 map: anchors centred (0,0), (8,0), (0,8), (8,8)."""
    return RetinaNetHead(8, 2, (8,), num_convs=0, scales=(1.0,), aspect_ratios=(1.0,), box_loss=box_loss)


@pytest.mark.parametrize("box_loss, expected", [("smooth_l1", 0.5 / 3), ("giou", 0.8 / 3)])
def test_loss_with_constant_predictions_matches_hand_computation(box_loss, expected):
    head = one_anchor_head(box_loss)
    targets = [{"boxes": torch.tensor([[-16.0, -16.0, 16.0, 16.0]]), "labels": torch.tensor([1])}]
    losses = head.loss(head([torch.zeros(1, 8, 2, 2)]), targets, [(16, 16)])
    # IoUs 1, 0.6, 0.6, 0.39: 3 positives (class 1), 8 - 3 = 5 negative entries.
    pos = 0.25 * 0.99**2 * math.log(100)
    neg = 0.75 * 0.01**2 * -math.log(0.99)
    assert losses["loss_cls"].item() == pytest.approx((3 * pos + 5 * neg) / 3, rel=1e-5)
    # Zero deltas. L1 (the official beta 0): |dx| = 8/32 for one anchor, |dy| = 8/32 for another -> 0.5 / 3.
    # GIoU: 0 for the exact anchor, 1 - 0.6 for the shifted two (enclosing box = union) -> 0.8 / 3.
    assert losses["loss_box"].item() == pytest.approx(expected, rel=1e-5)


def test_ignored_anchors_do_not_count_in_the_cls_loss():
    head = RetinaNetHead(8, 2, (8,), num_convs=0, scales=(1.0,), aspect_ratios=(1.0,), prior_prob=0.5)
    # GT [-8, -16, 24, 20] vs the anchors: 768/1408 = 0.55, 1024/1152 = 0.89, 672/1504 = 0.45 (ignored),
    # 896/1280 = 0.7: 3 positives; the ignored anchor's 2 entries drop out -> 3 positive + 3 negative entries.
    targets = [{"boxes": torch.tensor([[-8.0, -16.0, 24.0, 20.0]]), "labels": torch.tensor([0])}]
    losses = head.loss(head([torch.zeros(1, 8, 2, 2)]), targets, [(16, 16)])
    # prior 0.5: logits 0, p = 0.5 -> focal(pos) = 0.25 * 0.25 * ln 2, focal(neg) = 0.75 * 0.25 * ln 2
    pos, neg = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    assert losses["loss_cls"].item() == pytest.approx((3 * pos + 3 * neg) / 3, rel=1e-5)


def test_image_without_objects_gives_cls_loss_only_and_keeps_the_graph():
    head = RetinaNetHead(8, 2, (8, 16), num_convs=0)
    features = [torch.zeros(1, 8, 2, 2, requires_grad=True), torch.zeros(1, 8, 1, 1, requires_grad=True)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = head.loss(head(features), targets, [(16, 16)])
    assert losses["loss_cls"].item() == pytest.approx(45 * 2 * 0.75 * 0.01**2 * -math.log(0.99), rel=1e-5)
    assert losses["loss_box"].item() == 0 and losses["loss_box"].requires_grad
    sum(losses.values()).backward()
    assert torch.isfinite(features[0].grad).all()


def test_unit_weight_coder_inverse():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    assert coder.encode(torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[8.0, 0.0, 40.0, 64.0]])).tolist() == [
        pytest.approx([0.25, 0.5, 0.0, math.log(2)])
    ]
    anchors = torch.rand(30, 2) * 100
    anchors = torch.cat([anchors, anchors + 4 + torch.rand(30, 2) * 100], 1)
    boxes = torch.rand(30, 2) * 100
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(30, 2) * 100], 1)
    assert torch.allclose(coder.decode(coder.encode(anchors, boxes), anchors), boxes, atol=1e-3)


def test_postprocess_scores_are_plain_sigmoid_and_boxes_the_decoded_anchor():
    head = RetinaNetHead(8, 2, (8, 16), num_convs=0)
    outputs = head([torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 1, 1)])
    outputs["cls_logits"] = [torch.full_like(x, -10.0) for x in outputs["cls_logits"]]
    # Location (row 1, col 1) = centre (8, 8); anchor 1 (32 x 32), class 0: channel 1 * K + 0 = 2.
    outputs["cls_logits"][0][0, 2, 1, 1] = math.log(0.7 / 0.3)
    outputs["bbox_reg"][0][0, 4:8, 1, 1] = torch.tensor([0.25, 0.0, 0.0, math.log(0.5)])  # x + 8 px, half height
    (result,) = head.postprocess(outputs, [(100, 100)])
    # anchor [-8, -8, 24, 24]: centre (8, 8) -> (16, 8), 32 x 16 -> [0, 0, 32, 16]
    assert result["boxes"].tolist() == [pytest.approx([0.0, 0.0, 32.0, 16.0])]
    assert result["scores"].tolist() == pytest.approx([0.7])
    assert result["labels"].tolist() == [0]


def test_unknown_box_loss_is_a_user_error():
    with pytest.raises(DyheadError, match="box_loss"):
        RetinaNetHead(8, 2, (8,), box_loss="l2")


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = build_model(tiny_config("retinanet", 1)).train()
    images, targets = synthetic_batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, [(128, 128)] * 2, targets)
    assert set(losses) == {"loss_cls", "loss_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("num_blocks, num_convs", [(1, 0), (0, 4)], ids=["dyhead", "plain"])
def test_overfit_retinanet(num_blocks, num_convs):
    images, targets = synthetic_batch(4)
    cfg = tiny_config("retinanet", num_blocks=num_blocks, num_convs=num_convs)
    steps, ap50, seconds = overfit(cfg, images, targets, max_steps=300)
    print(f"\noverfit retinanet dyhead={num_blocks}: {steps} steps, AP50 {ap50:.3f}, {seconds:.1f} s")
    assert ap50 > 0.9
