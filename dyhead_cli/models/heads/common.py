"""What the dense heads (ATSS, FCOS, RetinaNet) share: towers, anchors/points, box coders, post-processing.

Every head follows one small interface, so the ``Detector`` never needs to know which head it runs:

    class <Name>Head(nn.Module):
        def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]
            # raw per-level outputs, P3 first, e.g. {"cls_logits": [(B, A*K, H, W)...],
            #  "bbox_reg": [(B, A*4, H, W)...], "centerness": [(B, A, H, W)...]}
        def loss(self, outputs, targets: list[dict], image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]
            # targets[i] = {"boxes": (N, 4) float xyxy in input pixels, "labels": (N,) int64 in 0..K-1}
        def postprocess(self, outputs, image_sizes) -> list[dict]
            # per image {"boxes": (M, 4) xyxy clipped to image_sizes[i], "scores": (M,), "labels": (M,) int64}

Anchors and points come from the feature shapes and the strides, so a head has no input-size state.
Channel layout of a level's prediction is anchor-major (channel = a * K + k, as in the official code);
``flatten_level`` turns it into rows ordered (y, x, anchor), the order the anchor generators use.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image, generalized_box_iou_loss, sigmoid_focal_loss

from dyhead_cli.errors import DyheadError

__all__ = [
    "BoxCoder",
    "Scale",
    "anchors_from_centers",
    "centerness_target",
    "check_targets",
    "conv_tower",
    "decode_ltrb",
    "encode_ltrb",
    "finalize_detections",
    "flatten_level",
    "focal_giou_centerness_losses",
    "grid_centers",
    "init_conv",
    "mean_over_processes",
    "num_positives",
    "one_hot_targets",
    "postprocess_dense",
    "predictor",
    "select_topk",
]

# ---------------------------------------------------------------------------------------------------
# layers


def init_conv(conv: nn.Conv2d, bias: float = 0.0) -> None:
    """N(0, 0.01) weights and a constant bias: the init of every head conv in ATSS/FCOS/RetinaNet."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)


def common_head_kwargs(options) -> dict:
    """The ``head_options`` every head takes (towers, focal loss, post-processing), as constructor kwargs."""
    return {
        "num_convs": options.num_convs,
        "prior_prob": options.prior_prob,
        "focal_alpha": options.focal_alpha,
        "focal_gamma": options.focal_gamma,
        "score_thresh": options.score_thresh,
        "nms_thresh": options.nms_thresh,
        "pre_nms_top_n": options.pre_nms_top_n,
        "detections_per_img": options.detections_per_img,
        "tower_norm": options.tower_norm,
    }


def head_defaults_overridden(options, *names: str) -> dict:
    """The per-head-default ``head_options`` the recipe sets: ``anchor_offset`` < 0 and ``pred_kernel_size`` 0
    mean "the head's own default" (TOML has no null), so those are left out and the constructor's default holds."""
    unset = {"anchor_offset": lambda v: v < 0, "pred_kernel_size": lambda v: v == 0}
    return {n: getattr(options, n) for n in names if not unset[n](getattr(options, n))}


def conv_tower(channels: int, num_convs: int, norm: str = "gn") -> nn.Sequential:
    """``num_convs`` x [3x3 conv, GroupNorm(32) (``norm="gn"``; ``"none"`` for detectron2's RetinaNet), ReLU].

    Empty (the identity) when ``num_convs`` is 0: with DyHead the official ATSS has no tower, the DyHead
    blocks are the tower; the plain detectors use 4.
    """
    if norm not in ("gn", "none"):
        raise DyheadError(f"head tower norm must be 'gn' or 'none', got {norm!r}")
    if num_convs > 0 and norm == "gn" and channels % 32 != 0:
        raise DyheadError(f"head_options.num_convs > 0 needs fpn.channels divisible by 32 (GroupNorm), got {channels}")
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        init_conv(conv)
        layers += [conv, nn.GroupNorm(32, channels), nn.ReLU()] if norm == "gn" else [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def predictor(in_channels: int, out_channels: int, kernel_size: int, bias: float = 0.0) -> nn.Conv2d:
    """A prediction conv (1x1 in the official ATSS/DyHead head, 3x3 elsewhere), N(0, 0.01) init."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    init_conv(conv, bias)
    return conv


class Scale(nn.Module):
    """A learnable scalar per pyramid level: lets one shared regressor output different ranges per level."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def flatten_level(x: Tensor, per_anchor: int) -> Tensor:
    """(B, A*C, H, W) -> (B, H*W*A, C) with C = ``per_anchor``; rows ordered (y, x, anchor)."""
    b, _, h, w = x.shape
    x = x.view(b, -1, per_anchor, h, w)  # (B, A, C, H, W)
    return x.permute(0, 3, 4, 1, 2).reshape(b, -1, per_anchor)


# ---------------------------------------------------------------------------------------------------
# anchors and points


def grid_centers(size: tuple[int, int], stride: int, offset: float, device: torch.device | None = None) -> Tensor:
    """Centres (x, y) = ((j + offset) * stride, (i + offset) * stride) of an (H, W) map -> (H*W, 2), row-major."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32, device=device) + offset) * stride
    xs = (torch.arange(w, dtype=torch.float32, device=device) + offset) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def anchors_from_centers(centers: Tensor, sizes_wh: Tensor) -> Tensor:
    """Boxes of widths/heights ``sizes_wh`` (A, 2) around every centre (P, 2) -> (P*A, 4) xyxy, anchor fastest."""
    half = sizes_wh.to(centers) / 2  # (A, 2)
    lo = centers[:, None, :] - half[None]  # (P, A, 2)
    hi = centers[:, None, :] + half[None]
    return torch.cat([lo, hi], dim=2).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------------
# box coders


class BoxCoder:
    """Anchor-relative deltas (dx, dy, dw, dh), detectron2's ``Box2BoxTransform`` (widths = x2 - x1).

    ``weights`` scale the deltas ((10, 10, 5, 5) in ATSS, (1, 1, 1, 1) in detectron2's RetinaNet);
    dw/dh are clamped at log(1000/16) when decoding so exp() cannot blow up early in training.
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """(N, 4) anchors, (N, 4) target boxes -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
        return torch.stack(
            [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=1
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """(N, 4) deltas, (N, 4) anchors -> (N, 4) boxes xyxy (always x2 >= x1, y2 >= y1)."""
        deltas = deltas.float()
        anchors = anchors.to(deltas)
        wx, wy, ww, wh = self.weights
        aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3] / wh).clamp(max=self.scale_clamp)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def encode_ltrb(points: Tensor, boxes: Tensor, norm: Tensor | float = 1.0) -> Tensor:
    """FCOS targets: distances (l, t, r, b) from points (N, 2) to boxes (N, 4), divided by ``norm`` (the stride)."""
    if isinstance(norm, Tensor):
        norm = norm[:, None]
    lt = points - boxes[:, :2]
    rb = boxes[:, 2:] - points
    return torch.cat([lt, rb], dim=1) / norm


def decode_ltrb(points: Tensor, distances: Tensor, norm: Tensor | float = 1.0) -> Tensor:
    """Inverse of ``encode_ltrb``: (N, 2) points and (N, 4) distances -> (N, 4) boxes xyxy."""
    if isinstance(norm, Tensor):
        norm = norm[:, None]
    d = distances.float() * norm
    points = points.to(d)
    return torch.cat([points - d[:, :2], points + d[:, 2:]], dim=1)


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for points (N, 2) strictly inside boxes (N, 4)."""
    ltrb = encode_ltrb(points, boxes)
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values)
    return ratio.clamp(min=0).sqrt()


# ---------------------------------------------------------------------------------------------------
# losses


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


# ---------------------------------------------------------------------------------------------------
# post-processing


def select_topk(scores: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best (location, class) pairs among ``candidates``, one level of one image.

    scores, candidates: (P, K) ranking scores and a boolean mask (e.g. sigmoid(cls) > score_thresh).
    Returns (scores (M,), location indices (M,), labels (M,)) with M <= k.
    """
    flat = scores.flatten()
    index = candidates.flatten().nonzero().squeeze(1)
    if index.numel() > k:
        index = index[flat[index].topk(k).indices]
    num_classes = scores.shape[1]
    return flat[index], index // num_classes, index % num_classes


def postprocess_dense(
    scores: list[Tensor],
    candidates: list[Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    pre_nms_top_n: int,
    nms_thresh: float,
    detections_per_img: int,
) -> list[dict[str, Tensor]]:
    """Per level top-``pre_nms_top_n`` candidates, then per image class-wise NMS, cap and clip.

    Per level: scores (B, P, K) used for ranking, candidates (B, P, K) bool (score threshold),
    boxes (B, P, 4) decoded for every location. Returns per image {"boxes", "scores", "labels"}.
    """
    results = []
    for i, image_size in enumerate(image_sizes):
        picked = [select_topk(s[i], c[i], pre_nms_top_n) for s, c in zip(scores, candidates)]
        level_boxes = [b[i][loc] for b, (_, loc, _) in zip(boxes, picked)]
        results.append(
            finalize_detections(
                torch.cat(level_boxes),
                torch.cat([p[0] for p in picked]),
                torch.cat([p[2] for p in picked]),
                image_size,
                nms_thresh,
                detections_per_img,
            )
        )
    return results


def finalize_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_size: tuple[int, int],
    nms_thresh: float,
    detections_per_img: int,
) -> dict[str, Tensor]:
    """Class-wise NMS, keep the ``detections_per_img`` best, clip to the image (h, w), drop empty boxes.

    The order is detectron2's (the official DyHead code): NMS sees the unclipped boxes.
    """
    keep = batched_nms(boxes.float(), scores.float(), labels, nms_thresh)[:detections_per_img]  # by score
    boxes = clip_boxes_to_image(boxes[keep].float(), image_size)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[nonempty], "scores": scores[keep][nonempty].float(), "labels": labels[keep][nonempty].long()}
