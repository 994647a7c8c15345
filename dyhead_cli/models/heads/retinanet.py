"""RetinaNet head as detectron2 (and so the official RetinaNet + DyHead config) runs it.

9 anchors per location: sizes 4 * stride * 2^(0, 1/3, 2/3) x aspect ratios (h/w) 0.5, 1, 2, size-major,
centred at (j * stride, i * stride) (detectron2's default offset 0). IoU >= 0.5 positive, < 0.4 negative,
in between ignored, and each GT's best anchors are positive too (low-quality matches). Deltas use
weights (1, 1, 1, 1); the box loss is GIoU on decoded boxes or smooth L1 on the deltas (the official
DyHead config sets beta = 0, i.e. L1). Losses are divided by this batch's positives (detectron2 divides
by a running average of that count, a training-dynamics detail that does not change the model).
Branches and post-processing: ``heads/dense.py`` (no centerness: the score is sigmoid(cls)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from dyhead_cli.errors import check_choice
from dyhead_cli.models.heads.boxes import BoxCoder
from dyhead_cli.models.heads.dense import AnchorHead, HeadSpec, dense_head_kwargs
from dyhead_cli.models.heads.losses import check_targets, num_positives, one_hot_targets
from dyhead_cli.recipe import ModelConfig

BOX_LOSSES = ("giou", "smooth_l1")  # the recipe key model.head_options.box_loss is checked against this

BACKGROUND, IGNORE = -1, -2


@torch.no_grad()
def retinanet_match(
    anchors: Tensor, gt_boxes: Tensor, fg_iou: float = 0.5, bg_iou: float = 0.4, low_quality: bool = True
) -> Tensor:
    """The matched GT index per anchor for one image; -1 = background, -2 = ignored.

    Each anchor takes its highest-IoU GT. With ``low_quality``, the anchors that reach a GT's highest IoU
    (ties included, IoU > 0) are positive for their own best GT even below ``fg_iou`` (detectron2's Matcher).
    """
    matched = torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.long, device=anchors.device)
    if gt_boxes.shape[0] == 0:
        return matched
    ious = box_iou(gt_boxes, anchors)  # (G, N)
    best_iou, best_gt = ious.max(dim=0)  # (N,)
    matched = torch.where(best_iou >= fg_iou, best_gt, matched)
    matched[(best_iou >= bg_iou) & (best_iou < fg_iou)] = IGNORE
    if low_quality:
        highest = ious.max(dim=1, keepdim=True).values  # (G, 1)
        is_best = ((ious == highest) & (highest > 0)).any(dim=0)  # (N,)
        matched[is_best] = best_gt[is_best]
    return matched


def cell_anchor_sizes(base_size: float, scales: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    """(A, 2) widths and heights: area (base * scale)^2 and h / w = ratio, scale-major (detectron2's order)."""
    sizes = []
    for scale in scales:
        area = (base_size * scale) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            sizes.append((w, ratio * w))
    return torch.tensor(sizes)


class RetinaNetHead(AnchorHead):
    """Class logits (A*K) and box deltas (A*4) per location, A = len(scales) * len(aspect_ratios).

    ``options``: the ``DenseHead`` keyword arguments (towers, predictors, focal loss, post-processing).
    """

    # detectron2's ANCHOR_GENERATOR.OFFSET default 0, 3x3 predictors, 4 tower convs, NMS 0.5
    DEFAULTS = {"anchor_offset": 0.0, "pred_kernel_size": 3, "num_convs": 4, "nms_thresh": 0.5}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        anchor_scale: float = 4.0,
        scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        fg_iou: float = 0.5,
        bg_iou: float = 0.4,
        box_loss: str = "giou",
        smooth_l1_beta: float = 0.0,
        **options: Any,
    ) -> None:
        check_choice("RetinaNet box_loss", box_loss, BOX_LOSSES)
        super().__init__(in_channels, num_classes, strides, num_anchors=len(scales) * len(aspect_ratios), **options)
        self.anchor_scale = anchor_scale
        self.octave_scales, self.aspect_ratios = tuple(scales), tuple(aspect_ratios)
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def cell_sizes(self, stride: int) -> Tensor:
        """(A, 2): ``anchor_scale * stride`` times each octave scale, at each aspect ratio."""
        return cell_anchor_sizes(self.anchor_scale * stride, self.octave_scales, self.aspect_ratios)

    def loss(
        self, outputs: dict[str, list[Tensor]], targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box"}, both divided by the number of positives; ``image_sizes`` is unused."""
        check_targets(targets, self.num_classes)
        anchors = torch.cat(self.anchors(outputs))  # (N, 4)
        cls_logits, bbox_reg, _ = self.flat_outputs(outputs)  # (B, N, K), (B, N, 4)

        matches = [retinanet_match(anchors, t["boxes"].to(anchors), self.fg_iou, self.bg_iou) for t in targets]
        cls_targets, img, idx, gt = one_hot_targets(matches, targets, self.num_classes)
        valid = torch.stack(matches) != IGNORE  # (B, N)
        anchors_pos, deltas = anchors[idx], bbox_reg[img, idx]

        num_pos = num_positives(len(idx), cls_logits.device)
        loss_cls = (
            sigmoid_focal_loss(cls_logits[valid], cls_targets[valid], self.focal_alpha, self.focal_gamma, reduction="sum")
            / num_pos
        )
        if len(idx) == 0:
            loss_box = deltas.sum() * 0.0  # 0, and still part of the graph
        elif self.box_loss == "giou":
            pred_boxes = self.box_coder.decode(deltas, anchors_pos)
            loss_box = generalized_box_iou_loss(pred_boxes, gt, reduction="sum") / num_pos
        else:
            target_deltas = self.box_coder.encode(anchors_pos, gt)
            loss_box = F.smooth_l1_loss(deltas, target_deltas, beta=self.smooth_l1_beta, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box}


def retinanet_options(cfg: ModelConfig, strides: tuple[int, ...]) -> dict[str, Any]:
    o = cfg.head_options
    return {"box_loss": o.box_loss, "smooth_l1_beta": o.smooth_l1_beta, **dense_head_kwargs(o)}


SPEC = HeadSpec(RetinaNetHead, retinanet_options)
