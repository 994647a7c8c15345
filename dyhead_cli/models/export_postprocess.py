"""The dense heads' post-processing (``heads/postprocess.py``) as one traceable graph, for ``dyhead export``.

``heads/postprocess.py`` loops over images and levels in Python and keeps tensors of data-dependent
length, which neither ONNX nor torch.export can hold as such. This computes the same detections for a
whole batch with fixed-size tensors:

1. per level: candidates sigmoid(cls) > score_thresh; the ``pre_nms_top_n`` best by the mode's ranking
   (final score for "official", sigmoid(cls) for "mmdet") through one ``topk`` over the scores with the
   non-candidates set to -1 (then last; the flat scores are padded to at least ``pre_nms_top_n``, so
   ``k`` is a constant); boxes decoded by the head's own ``priors`` / ``decode``; "mmdet" clips them to the
   image and drops empty ones here, as the PyTorch path does;
2. every valid candidate of the batch goes through ONE ``torchvision.ops.nms`` (ONNX NonMaxSuppression):
   images are kept apart by shifting boxes in y, classes by shifting them in x (the coordinate trick of
   torchvision's ``batched_nms``, in two axes so that the shifts stay small: K * image span, not B * K);
3. per image the ``detections_per_img`` best survivors (NMS returns them by descending score), clipped
   to the image, empty boxes dropped, packed to the front of fixed (B, D) outputs with a valid count.

The results equal ``head.postprocess`` up to the order of exactly tied scores.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

from dyhead_cli.models.heads.layers import flatten_level


def clip_to_sizes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes (B, N, 4) xyxy clipped to each image's (h, w) of image_sizes (B, 2)."""
    hw = image_sizes.to(boxes.dtype)
    upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1)[:, None, :]  # (B, 1, 4): w, h, w, h
    return torch.minimum(boxes.clamp(min=0), upper)


def nonempty(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def level_topk(head, outputs: dict[str, list[Tensor]], level: int, prior: Tensor, image_sizes: Tensor):
    """One level, whole batch: (boxes (B, k, 4), scores (B, k), labels (B, k), valid (B, k)), k = pre_nms_top_n."""
    opts, num_classes = head.post, head.num_classes
    cls = flatten_level(outputs["cls_logits"][level], num_classes).float().sigmoid()  # (B, P, K)
    score = cls
    if "centerness" in outputs:
        score = cls * flatten_level(outputs["centerness"][level], 1).float().sigmoid()  # (B, P, 1) broadcast
    ranking = score if opts.mode == "official" else cls
    b = cls.shape[0]
    k = opts.pre_nms_top_n
    masked = torch.where(cls > opts.score_thresh, ranking, -1.0).flatten(1)  # (B, P*K)
    masked = torch.cat([masked, masked.new_full((b, k), -1.0)], dim=1)  # at least k columns
    top, index = masked.topk(k, dim=1)  # (B, k), best first
    valid = top > -0.5  # candidates rank >= 0, the rest -1
    index = torch.where(valid, index, 0)
    loc, labels = index // num_classes, index % num_classes
    scores = score.flatten(1).gather(1, index)
    deltas = flatten_level(outputs["bbox_reg"][level], 4).float()  # (B, P, 4)
    deltas = deltas.gather(1, loc[..., None].expand(b, k, 4))
    priors = prior[loc.flatten()]  # (B*k, D)
    boxes = head.decode(deltas.reshape(b * k, 4), priors, level).reshape(b, k, 4)
    if opts.mode == "mmdet":
        boxes = clip_to_sizes(boxes, image_sizes)
        valid = valid & nonempty(boxes)
    return boxes, scores, labels, valid


def batch_nms(boxes: Tensor, scores: Tensor, labels: Tensor, images: Tensor, num_classes: int, iou: float) -> Tensor:
    """Class-wise, image-wise NMS over M boxes (M, 4) in one call: indices kept, by descending score."""
    flat = torch.cat([boxes.flatten(), boxes.new_zeros(1)])  # never empty: min/max of nothing is undefined
    low = flat.min()
    span = flat.max() - low + 1.0
    shift = torch.stack([labels, images, labels, images], dim=1).to(boxes.dtype) * span
    return nms(boxes - low + shift, scores, iou)


def pack(values: Tensor, slot: Tensor, size: int, fill: float) -> Tensor:
    """Rows ``values`` (M, ...) written to the distinct rows ``slot`` (M,) of a (size, ...) tensor of ``fill``."""
    return values.new_full((size, *values.shape[1:]), fill).index_put((slot,), values)


def postprocess_padded(head, outputs: dict[str, list[Tensor]], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A dense head's outputs -> boxes (B, D, 4) xyxy inside image_sizes (B, 2) (h, w), scores (B, D),
    labels (B, D) int64 (-1 on padding rows), num_detections (B,) int64; D = detections_per_img."""
    opts = head.post
    priors = head.priors(outputs)
    parts = [level_topk(head, outputs, level, priors[level], image_sizes) for level in range(len(priors))]
    boxes, scores, labels, valid = (torch.cat(t, dim=1) for t in zip(*parts))  # (B, N, ...)
    b, n = scores.shape
    images = torch.arange(b, device=scores.device)[:, None].expand(b, n)
    picked = valid.flatten().nonzero().squeeze(1)  # (M,)
    boxes, scores = boxes.reshape(b * n, 4)[picked], scores.flatten()[picked]
    labels, images = labels.flatten()[picked], images.flatten()[picked]
    keep = batch_nms(boxes, scores, labels, images, head.num_classes, opts.nms_thresh)
    boxes, scores, labels, images = boxes[keep], scores[keep], labels[keep], images[keep]

    # rank of each survivor within its image (survivors come by descending score)
    d = opts.detections_per_img
    same = (images[:, None] == torch.arange(b, device=images.device)[None, :]).long()  # (S, B)
    rank = same.cumsum(0).gather(1, images[:, None]).squeeze(1) - 1
    top = (rank < d).nonzero().squeeze(1)
    slot = images[top] * d + rank[top]
    boxes = pack(boxes[top], slot, b * d, 0.0).reshape(b, d, 4)
    scores = pack(scores[top], slot, b * d, 0.0).reshape(b, d)
    labels = pack(labels[top], slot, b * d, -1).reshape(b, d)

    # clip, drop empty boxes, move the rest to the front
    boxes = clip_to_sizes(boxes, image_sizes)
    ok = nonempty(boxes) & (labels >= 0)  # (B, D)
    rank = ok.long().cumsum(1) - 1 + torch.arange(b, device=ok.device)[:, None] * d
    kept = ok.flatten().nonzero().squeeze(1)
    slot = rank.flatten()[kept]
    boxes = pack(boxes.reshape(b * d, 4)[kept], slot, b * d, 0.0).reshape(b, d, 4)
    scores = pack(scores.flatten()[kept], slot, b * d, 0.0).reshape(b, d)
    labels = pack(labels.flatten()[kept], slot, b * d, -1).reshape(b, d)
    return boxes, scores, labels, ok.long().sum(1)
