"""The training losses the dense heads share: target checks, one-hot targets, focal + GIoU + centerness.

Assignment (which anchor or point learns which GT) is each head's own; what happens after it is here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dyhead_cli.errors import DyheadError


def mean_over_processes(value: Tensor) -> float:
    """The value averaged over processes when torch.distributed runs (so every GPU normalises alike)."""
    value = value.detach().float()
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return float(value)


def check_targets(targets: list[dict[str, Tensor]], num_classes: int) -> None:
    """Readable errors instead of index errors deep in a loss: labels in 0..K-1, boxes (N, 4)."""
    for t in targets:
        labels = t["labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DyheadError(
                f"target labels must be in 0..{num_classes - 1} (model.num_classes = {num_classes}), "
                f"got {sorted(set(labels.tolist()))}"
            )
        if t["boxes"].shape != (labels.shape[0], 4):
            raise DyheadError(f"target boxes must be (N, 4) with N = len(labels), got {tuple(t['boxes'].shape)}")


def one_hot_targets(
    matches: list[Tensor], targets: list[dict[str, Tensor]], num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Turn per-image assignments into loss targets.

    matches[i]: (N,) matched GT index per anchor/point of image i (>= 0 positive, < 0 background/ignored).
    Returns one-hot class targets (B, N, K), and for the M positives of the batch: image index (M,),
    anchor index (M,) and GT box (M, 4).
    """
    cls_targets = torch.zeros(len(matches), matches[0].shape[0], num_classes, device=matches[0].device)
    images, anchors, boxes = [], [], []
    for i, (matched, target) in enumerate(zip(matches, targets)):
        pos = (matched >= 0).nonzero().squeeze(1)
        gt = matched[pos]
        cls_targets[i, pos, target["labels"].to(pos.device)[gt]] = 1.0
        images.append(torch.full_like(pos, i))
        anchors.append(pos)
        boxes.append(target["boxes"].to(cls_targets)[gt])
    return cls_targets, torch.cat(images), torch.cat(anchors), torch.cat(boxes)


def num_positives(count: int, device: torch.device) -> float:
    """The loss normaliser: positives averaged over processes, at least 1 (an image may have no objects)."""
    return max(mean_over_processes(torch.tensor(float(count), device=device)), 1.0)


def focal_giou_centerness_losses(
    cls_logits: Tensor,
    cls_targets: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    ctr_logits: Tensor,
    ctr_targets: Tensor,
    focal_alpha: float,
    focal_gamma: float,
    box_loss_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The ATSS/FCOS loss triple.

    cls_logits, cls_targets: (N, K) over every anchor of the batch (one-hot targets, zeros = background);
    pred_boxes, target_boxes (M, 4), ctr_logits, ctr_targets (M,): the M positives.
    Focal loss / positives; GIoU weighted by the centerness targets / their sum; BCE centerness / positives.
    With no positives the box and centerness losses are 0 and still part of the graph.
    """
    num_pos = num_positives(pred_boxes.shape[0], cls_logits.device)
    loss_cls = sigmoid_focal_loss(cls_logits, cls_targets, focal_alpha, focal_gamma, reduction="sum") / num_pos
    ctr_sum = mean_over_processes(ctr_targets.sum())  # called on every process, positives or not
    if pred_boxes.shape[0] == 0:
        return {"loss_cls": loss_cls, "loss_box": pred_boxes.sum() * 0.0, "loss_centerness": ctr_logits.sum() * 0.0}
    giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    loss_box = (giou * ctr_targets).sum() / max(ctr_sum, 1e-6) * box_loss_weight
    loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets, reduction="sum") / num_pos
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_centerness": loss_ctr}
