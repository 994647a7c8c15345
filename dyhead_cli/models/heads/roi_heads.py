"""Second stage of Faster R-CNN, as detectron2's ``StandardROIHeads`` (the official DyHead R-CNN config).

Each proposal is pooled from one level of P2..P5, chosen by its size (``floor(4 + log2(sqrt(area) / 224))``,
clamped), with RoIAlign 7x7, ``aligned=True`` (detectron2's ROIAlignV2: pixel centres at +0.5) and an
adaptive sampling ratio (0); a 2-fc box head (1024 wide by default) feeds a class-score layer (K + 1
classes, **background last** as in detectron2) and class-specific box deltas (K x 4, class-major, weights
(10, 10, 5, 5)). Training: the GT boxes join the proposals; IoU >= 0.5 is foreground; 512 RoIs per image
with at most 25% foreground; cross-entropy (mean) and L1 deltas of the foreground RoIs' own class (sum over
the sampled count). Test: softmax, per-class boxes clipped to the image, score > 0.05, per-class NMS, top 100.

torchvision's ``MultiScaleRoIAlign`` would do the pooling but with ``aligned=False`` and a level rule with
its eps outside the log; we follow detectron2 (``torchvision.ops.roi_align`` with ``aligned=True``).
torchvision's ``RoIHeads`` puts background at class 0 and uses smooth-L1 (beta 1/9); we follow detectron2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
)
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align

from dyhead_cli.models.heads.postprocess import keep_labels

CANONICAL_BOX_SIZE = 224
CANONICAL_LEVEL = 4


def assign_levels(boxes: Tensor, min_level: int, max_level: int) -> Tensor:
    """(R, 4) boxes -> (R,) index into [P<min_level> .. P<max_level>] (detectron2's ``assign_boxes_to_levels``)."""
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    levels = torch.floor(CANONICAL_LEVEL + torch.log2(sizes / CANONICAL_BOX_SIZE + 1e-8))
    return levels.clamp(min=min_level, max=max_level).long() - min_level


def pool_rois(features: list[Tensor], boxes: list[Tensor], strides: tuple[int, ...], output_size: int = 7) -> Tensor:
    """RoIAlign each box from its level: features per level (B, C, H, W) finest first, boxes per image
    (R_i, 4) in input pixels -> (sum R_i, C, output_size, output_size), rows in image then box order."""
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])  # (R, 5)
    min_level = int(strides[0]).bit_length() - 1
    levels = assign_levels(rois[:, 1:], min_level, min_level + len(features) - 1)
    order = levels.argsort(stable=True)  # RoIs grouped by level; pooled per level, then put back in order
    counts = torch.bincount(levels, minlength=len(features)).tolist()
    pooled = [
        roi_align(feature, level_rois.to(feature.dtype), output_size, 1.0 / stride, sampling_ratio=0, aligned=True)
        for feature, stride, level_rois in zip(features, strides, rois[order].split(counts))
    ]
    return torch.cat(pooled)[order.argsort()]


class BoxHead(nn.Module):
    """detectron2's ``FastRCNNConvFCHead`` with two fcs: (R, C, 7, 7) -> flatten -> fc1, ReLU -> fc2, ReLU -> (R, D)."""

    def __init__(self, in_features: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)  # detectron2's c2_xavier_fill
            nn.init.constant_(fc.bias, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """detectron2's ``FastRCNNOutputLayers``: ``cls_score`` (R, K+1), background last; ``bbox_pred`` (R, 4K),
    deltas of class k in columns 4k..4k+3."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0.0)
        nn.init.constant_(self.bbox_pred.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


@torch.no_grad()
def sample_proposals(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    matcher: Matcher,
    sampler: BalancedPositiveNegativeSampler,
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's training RoIs: proposals (P, 4) plus the GT boxes (G, 4), labelled and subsampled.

    Returns boxes (S, 4), classes (S,) in 0..K (K = background) and each RoI's matched GT box (S, 4);
    foreground RoIs first. IoU >= 0.5 with its best GT is foreground, anything else background.
    """
    boxes = torch.cat([proposals, gt_boxes])
    if gt_boxes.shape[0] == 0:
        classes = torch.full((boxes.shape[0],), num_classes, dtype=torch.long, device=boxes.device)
        matched = torch.zeros_like(boxes)
    else:
        matches = matcher(box_iou(gt_boxes, boxes))  # (P+G,): GT index, or -1 below 0.5
        classes = torch.where(matches >= 0, gt_labels[matches.clamp(min=0)], num_classes)
        matched = gt_boxes[matches.clamp(min=0)]
    (pos,), (neg,) = sampler([(classes < num_classes).long()])  # 1 = foreground, 0 = background
    keep = torch.cat([pos.nonzero().squeeze(1), neg.nonzero().squeeze(1)])
    return boxes[keep], classes[keep], matched[keep]


def fast_rcnn_losses(
    cls_logits: Tensor, box_deltas: Tensor, classes: Tensor, target_deltas: Tensor, num_classes: int
) -> dict[str, Tensor]:
    """Cross-entropy over the S sampled RoIs (mean); L1 between each foreground RoI's deltas for its own
    class and its targets, summed and divided by S. cls_logits (S, K+1), box_deltas (S, 4K), classes (S,),
    target_deltas (S, 4) (only foreground rows are read)."""
    loss_cls = F.cross_entropy(cls_logits.float(), classes, reduction="mean") if len(classes) else cls_logits.sum() * 0.0
    fg = (classes < num_classes).nonzero().squeeze(1)
    pred = box_deltas.float().view(len(classes), num_classes, 4)[fg, classes[fg]]  # (F, 4)
    loss_box = F.l1_loss(pred, target_deltas[fg], reduction="sum") / max(len(classes), 1)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


@torch.no_grad()
def fast_rcnn_inference(
    cls_logits: Tensor,
    box_deltas: Tensor,
    proposals: Tensor,
    image_size: tuple[int, int],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    labels: tuple[int, ...] | None = None,
) -> dict[str, Tensor]:
    """One image's detections from its R RoIs: cls_logits (R, K+1), box_deltas (R, 4K), proposals (R, 4).

    detectron2's order: per-class boxes clipped first, then score > ``score_thresh`` (of ``labels`` only,
    when given), per-class NMS, the ``detections_per_img`` best. Returns {"boxes" (M, 4), "scores" (M,),
    "labels" (M,) in 0..K-1}.
    """
    num_classes = cls_logits.shape[1] - 1
    scores = F.softmax(cls_logits.float(), dim=1)[:, :-1]  # (R, K): background (last) dropped
    boxes = box_coder.decode_single(box_deltas.float(), proposals.float())  # (R, 4K)
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    scores, boxes = scores[finite], boxes[finite]
    boxes = clip_boxes_to_image(boxes.view(-1, num_classes, 4), image_size)  # (R, K, 4)
    roi, label = keep_labels(scores > score_thresh, labels).nonzero().unbind(1)
    boxes, scores = boxes[roi, label], scores[roi, label]
    keep = batched_nms(boxes, scores, label, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": label[keep]}
