"""The shared dense post-processing in its two orders ("official", "mmdet"), worked out by hand.

Candidate selection (threshold on sigmoid(cls) alone; per-level top k by the final score or by cls alone),
the clipping order around NMS, and scores without a square root.
"""

import math

import pytest
import torch

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.heads.atss import ATSSHead
from dyhead_cli.models.heads.postprocess import PostprocessOptions, postprocess_dense

# One image, one level, 4 locations x 2 classes; class 0 only (class 1 never passes the threshold).
#   location:  0     1     2     3
#   cls (k=0): 0.9   0.6   0.04  0.5
#   ctr:       0.1   0.9   1.0   0.02
#   cls x ctr: 0.09  0.54  0.04  0.01
CLS = torch.tensor([[[0.9, 0.01], [0.6, 0.01], [0.04, 0.01], [0.5, 0.01]]])  # (B, P, K)
CTR = torch.tensor([[0.1, 0.9, 1.0, 0.02]])  # (B, P)
FAR_APART = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]).float()


def run(mode: str, boxes: torch.Tensor, top_n: int = 1000, cls=CLS, ctr=CTR, size=(64, 100)) -> dict:
    opts = PostprocessOptions(mode, score_thresh=0.05, pre_nms_top_n=top_n, nms_thresh=0.6, detections_per_img=100)
    (out,) = postprocess_dense([cls], None if ctr is None else [ctr], lambda level, i, loc: boxes[loc], [size], opts)
    return out


@pytest.mark.parametrize("mode", ["official", "mmdet"])
def test_candidates_are_cls_above_threshold_and_scores_are_cls_times_centerness(mode):
    out = run(mode, FAR_APART)
    # Location 2 (cls 0.04 <= 0.05) is no candidate although its final score 0.04 beats location 3's 0.01;
    # location 3 is one (cls 0.5) and keeps its final score 0.01, below score_thresh. No square root.
    assert out["scores"].tolist() == pytest.approx([0.54, 0.09, 0.01])
    assert out["boxes"].tolist() == [[20, 0, 30, 10], [0, 0, 10, 10], [60, 0, 70, 10]]
    assert out["labels"].tolist() == [0, 0, 0]


def test_per_level_top_k_ranks_by_the_final_score_officially_and_by_cls_in_mmdet():
    # Top 1: official ranks by cls x ctr (location 1, 0.54); MMDetection by cls alone (location 0, cls 0.9),
    # which then scores 0.9 x 0.1.
    official, mmdet = run("official", FAR_APART, top_n=1), run("mmdet", FAR_APART, top_n=1)
    assert official["boxes"].tolist() == [[20, 0, 30, 10]] and official["scores"].tolist() == pytest.approx([0.54])
    assert mmdet["boxes"].tolist() == [[0, 0, 10, 10]] and mmdet["scores"].tolist() == pytest.approx([0.09])


def test_official_clips_after_nms_mmdet_before():
    # Two candidates in a 100 px wide image (scores 0.54 and 0.09, same class):
    #   A [90, 0, 200, 10] (0.54), B [95, 0, 195, 10] (0.09): unclipped IoU 100 / 110 = 0.91 -> official NMS
    #   drops B; clipped to [90, 0, 100, 10] and [95, 0, 100, 10] the IoU is 5 / 10 = 0.5 -> MMDetection keeps both.
    cls, ctr = CLS[:, :2], CTR[:, :2]
    boxes = torch.tensor([[95, 0, 195, 10], [90, 0, 200, 10]]).float()  # location 0 = B, location 1 = A
    official = run("official", boxes, cls=cls, ctr=ctr)
    mmdet = run("mmdet", boxes, cls=cls, ctr=ctr)
    assert official["boxes"].tolist() == [[90, 0, 100, 10]] and official["scores"].tolist() == pytest.approx([0.54])
    assert mmdet["boxes"].tolist() == [[90, 0, 100, 10], [95, 0, 100, 10]]
    assert mmdet["scores"].tolist() == pytest.approx([0.54, 0.09])
    # The other way round: C [-50, 0, 10, 10] (0.54) and D [0, 0, 10, 10] (0.09): unclipped IoU 1/6 keeps both
    # (official), then both clip to the same box; clipped first they are one box and NMS keeps C alone.
    boxes = torch.tensor([[0, 0, 10, 10], [-50, 0, 10, 10]]).float()
    official = run("official", boxes, cls=cls, ctr=ctr)
    mmdet = run("mmdet", boxes, cls=cls, ctr=ctr)
    assert official["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]]
    assert official["scores"].tolist() == pytest.approx([0.54, 0.09])
    assert mmdet["boxes"].tolist() == [[0, 0, 10, 10]] and mmdet["scores"].tolist() == pytest.approx([0.54])


def test_boxes_outside_the_image_are_dropped_before_nms_in_mmdet_after_in_official():
    # E [100, 0, 200, 10] (0.54) lies right of the 100 px image: empty once clipped. F [60, 0, 160, 10] (0.09):
    # unclipped IoU(E, F) = 60 / 140 = 0.43 -> both survive NMS in either order; official then drops E (empty).
    # With a lower NMS threshold (0.4) official NMS lets E suppress F and returns nothing; MMDetection dropped
    # E before NMS, so F survives.
    cls, ctr = CLS[:, :2], CTR[:, :2]
    boxes = torch.tensor([[60, 0, 160, 10], [100, 0, 200, 10]]).float()
    for mode in ("official", "mmdet"):
        out = run(mode, boxes, cls=cls, ctr=ctr)
        assert out["boxes"].tolist() == [[60, 0, 100, 10]] and out["scores"].tolist() == pytest.approx([0.09])
    opts = dict(score_thresh=0.05, pre_nms_top_n=1000, nms_thresh=0.4, detections_per_img=100)
    decode = lambda level, i, loc: boxes[loc]  # noqa: E731
    (official,) = postprocess_dense([cls], [ctr], decode, [(64, 100)], PostprocessOptions("official", **opts))
    (mmdet,) = postprocess_dense([cls], [ctr], decode, [(64, 100)], PostprocessOptions("mmdet", **opts))
    assert len(official["boxes"]) == 0
    assert mmdet["boxes"].tolist() == [[60, 0, 100, 10]]


def test_without_centerness_the_score_is_sigmoid_cls():
    out = run("mmdet", FAR_APART, ctr=None)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6, 0.5])
    (official,) = postprocess_dense([CLS], None, lambda level, i, loc: FAR_APART[loc], [(64, 100)], PostprocessOptions())
    assert official["scores"].tolist() == pytest.approx([0.9, 0.6, 0.5])


def test_atss_head_in_mmdet_order_decodes_clips_and_multiplies():
    head = ATSSHead(8, 2, (8, 16), anchor_scale=2.0, postprocess="mmdet")
    outputs = head([torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2)])
    outputs["cls_logits"] = [torch.full_like(x, -10.0) for x in outputs["cls_logits"]]
    outputs["cls_logits"][0][0, 1, 1, 2] = math.log(0.8 / 0.2)  # class 1 at P3 row 1, col 2: anchor [12, 4, 28, 20]
    outputs["centerness"][0][0, 0, 1, 2] = math.log(0.25 / 0.75)
    outputs["bbox_reg"][0][0, :, 1, 2] = torch.tensor([2.5, 0.0, 0.0, 5 * math.log(0.5)])  # x + 16/4, half height
    (result,) = head.postprocess(outputs, [(30, 26)])  # (h, w): x clipped at 26
    assert result["boxes"].tolist() == [pytest.approx([16.0, 8.0, 26.0, 16.0])]
    assert result["scores"].tolist() == pytest.approx([0.8 * 0.25])
    assert result["labels"].tolist() == [1]


def test_unknown_mode_is_a_user_error():
    with pytest.raises(DyheadError, match="official, mmdet"):
        PostprocessOptions("detectron2")
