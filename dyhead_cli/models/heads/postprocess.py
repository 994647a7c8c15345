"""The one dense post-processing every head uses: candidates -> per-level top k -> boxes -> NMS -> best N.

Scores and thresholds (written down here, and only here)
  * A detection's score is sigmoid(cls) * sigmoid(centerness) for the heads with a centerness branch (ATSS,
    FCOS) and sigmoid(cls) for RetinaNet. No square root: the official DyHead ``extra/atss.py`` and
    MMDetection 3.3.0 both multiply (the original ATSS/FCOS repositories reported the square root).
  * ``head_options.score_thresh`` is the head's CANDIDATE threshold: a (location, class) pair is considered
    at all only when sigmoid(cls) > score_thresh, the class probability alone, before the centerness
    factor. Final scores can therefore be lower than it.
  * The user's threshold on FINAL scores (``dyhead predict --score-thr``) is applied afterwards, outside
    the model, to the scores above.

Two orders (``head_options.postprocess``), per image; both take ``pre_nms_top_n`` per level, run
class-wise NMS at ``nms_thresh`` over all levels and keep the ``detections_per_img`` best:
  "official" (the official DyHead code, detectron2's RetinaNet/FCOS order; the default): per level the
      candidates with the highest final score; NMS on the unclipped boxes; then clip to the image and
      drop empty boxes (detectron2 clips when it rescales to the original image: the same boxes).
  "mmdet" (MMDetection 3.3.0 ``BaseDenseHead._predict_by_feat_single`` + ``_bbox_post_process``): per level
      the candidates with the highest sigmoid(cls) alone; boxes clipped to the image while decoding, and
      zero-width/height ones dropped (``min_bbox_size=0``), before NMS; then score *= centerness.
Either way the boxes returned are inside the (resized) image; ``Detector`` rescales them to the original.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from dyhead_cli.errors import check_choice

POSTPROCESS_MODES = ("official", "mmdet")  # the recipe key model.head_options.postprocess is checked against this

Decode = Callable[[int, int, Tensor], Tensor]
"""(level, image index, location rows (M,)) -> (M, 4) boxes xyxy: the head's box decoding."""


@dataclass(frozen=True)
class PostprocessOptions:
    """The ``head_options`` that drive post-processing (see the module docstring for their meaning)."""

    mode: str = "official"
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    labels: tuple[int, ...] | None = None  # only these become candidates (``dyhead predict --classes``)

    def __post_init__(self) -> None:
        check_choice("head post-processing", self.mode, POSTPROCESS_MODES)


def select_topk(ranking: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best (location, class) pairs among ``candidates``, one level of one image.

    ranking, candidates: (P, K) ranking scores and a boolean mask (sigmoid(cls) > score_thresh).
    Returns (location indices (M,), labels (M,)) with M <= k, best first when M = k.
    """
    flat = ranking.flatten()
    index = candidates.flatten().nonzero().squeeze(1)
    if index.numel() > k:
        index = index[flat[index].topk(k).indices]
    num_classes = ranking.shape[1]
    return index // num_classes, index % num_classes


def keep_labels(candidates: Tensor, labels: tuple[int, ...] | None) -> Tensor:
    """candidates (R, K) boolean with the columns of labels outside ``labels`` cleared (None: all kept).

    Filtering classes here, before the top-k, NMS and the ``detections_per_img`` cut, lets the wanted
    classes fill the detections rather than what other classes left of them.
    """
    if labels is None:
        return candidates
    wanted = torch.zeros(candidates.shape[1], dtype=torch.bool, device=candidates.device)
    wanted[[k for k in labels if 0 <= k < candidates.shape[1]]] = True
    return candidates & wanted


def clip_nonempty(boxes: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Boxes (M, 4) clipped to the image (h, w), and the (M,) mask of those with positive width and height."""
    boxes = clip_boxes_to_image(boxes.float(), image_size)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def finalize_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_size: tuple[int, int],
    nms_thresh: float,
    detections_per_img: int,
) -> dict[str, Tensor]:
    """Class-wise NMS, keep the ``detections_per_img`` best, clip to the image (h, w), drop empty boxes.

    boxes (M, 4), scores (M,), labels (M,) of one image. NMS sees the boxes as given: unclipped in the
    "official" order; already clipped in the "mmdet" order, where the clipping here changes nothing.
    """
    keep = batched_nms(boxes.float(), scores.float(), labels, nms_thresh)[:detections_per_img]  # by score
    boxes, nonempty = clip_nonempty(boxes[keep], image_size)
    return {"boxes": boxes[nonempty], "scores": scores[keep][nonempty].float(), "labels": labels[keep][nonempty].long()}


def level_candidates(
    cls: Tensor, ctr: Tensor | None, decode: Callable[[Tensor], Tensor], image_size: tuple[int, int], opts: PostprocessOptions
) -> tuple[Tensor, Tensor, Tensor]:
    """One level of one image: cls (P, K) and ctr (P,) probabilities -> candidate boxes (M, 4), scores, labels."""
    score = cls if ctr is None else cls * ctr[:, None]  # (P, K): the final score
    ranking = score if opts.mode == "official" else cls
    loc, labels = select_topk(ranking, keep_labels(cls > opts.score_thresh, opts.labels), opts.pre_nms_top_n)
    boxes, scores = decode(loc), score[loc, labels]
    if opts.mode == "mmdet":
        boxes, nonempty = clip_nonempty(boxes, image_size)
        boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
    return boxes, scores, labels


def postprocess_dense(
    cls_probs: list[Tensor],
    ctr_probs: list[Tensor] | None,
    decode: Decode,
    image_sizes: list[tuple[int, int]],
    opts: PostprocessOptions,
) -> list[dict[str, Tensor]]:
    """Detections per image {"boxes" (N, 4) xyxy inside image_sizes[i], "scores" (N,), "labels" (N,) int64}.

    Per level: cls_probs (B, P, K) sigmoid(cls), ctr_probs (B, P) sigmoid(centerness) or None (no centerness);
    ``decode`` gives the boxes of chosen locations only, so nothing else is decoded.
    """
    results = []
    for i, image_size in enumerate(image_sizes):
        parts = []
        for level, cls in enumerate(cls_probs):
            ctr = None if ctr_probs is None else ctr_probs[level][i]
            parts.append(level_candidates(cls[i], ctr, partial(decode, level, i), image_size, opts))
        boxes, scores, labels = (torch.cat(t) for t in zip(*parts))
        results.append(finalize_detections(boxes, scores, labels, image_size, opts.nms_thresh, opts.detections_per_img))
    return results
