"""What an AP number hides: per-class AP50, precision and recall at the best-F1 score threshold, the
precision-recall curves, and a confusion matrix with a background row and column.

Precision/recall and the curves come from COCOeval's own matching (``evalImgs``) and arrays
(``eval["precision"]``) at IoU 0.5, area "all", 100 detections per image. The confusion matrix needs
matches across classes, which COCOeval never makes (it matches within a category), so it matches
boxes itself: class-agnostic, greedy by IoU, one detection per ground-truth box.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_iou

SCORE_GRID = np.linspace(0.0, 1.0, 101)  # thresholds tried for the best F1


def per_class_ap50(evaluator, names: list[str]) -> dict[str, float]:
    """AP at IoU 0.5 per class in percent (NaN: no ground truth of that class)."""
    precision = evaluator.eval["precision"][0, :, :, 0, -1]  # (R recall points, K classes)
    out = {}
    for k, name in enumerate(names):
        p = precision[:, k]
        p = p[p > -1]
        out[name] = float(np.mean(p)) * 100.0 if p.size else float("nan")
    return out


def pr_curves(evaluator, names: list[str]) -> dict[str, Any]:
    """{"recall": (101,), "precision": {name: (101,)}} at IoU 0.5 for the classes with ground truth."""
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    curves = {name: np.clip(precision[:, k], 0, None) for k, name in enumerate(names) if (precision[:, k] > -1).any()}
    return {"recall": np.asarray(evaluator.params.recThrs), "precision": curves}


def matches_at_iou50(evaluator) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Per category id: (scores, matched 0/1) of its detections that count, and its number of counted
    ground-truth boxes, from COCOeval's per-image matching at IoU 0.5 (area "all", 100 detections)."""
    p = evaluator.params
    num_areas, num_images = len(p.areaRng), len(p.imgIds)
    out = {}
    for k, cat_id in enumerate(p.catIds):
        scores, matched, num_gt = [], [], 0
        for i in range(num_images):
            e = evaluator.evalImgs[k * num_areas * num_images + i]  # area index 0 = "all"
            if e is None:
                continue
            keep = ~np.asarray(e["dtIgnore"][0], dtype=bool)
            scores.append(np.asarray(e["dtScores"])[keep])
            matched.append(np.asarray(e["dtMatches"][0])[keep] > 0)
            num_gt += int((~np.asarray(e["gtIgnore"], dtype=bool)).sum())
        out[cat_id] = (
            np.concatenate(scores) if scores else np.zeros(0),
            np.concatenate(matched) if matched else np.zeros(0, bool),
            num_gt,
        )
    return out


def best_f1(evaluator, names: list[str]) -> dict[str, Any]:
    """The score threshold with the highest mean F1 over the classes that have ground truth, and each
    class's precision and recall there (Ultralytics reports P and R at the same point)."""
    matches = matches_at_iou50(evaluator)
    cat_ids = list(evaluator.params.catIds)
    precision = np.zeros((len(cat_ids), SCORE_GRID.size))
    recall = np.zeros_like(precision)
    has_gt = np.zeros(len(cat_ids), dtype=bool)
    for k, cat_id in enumerate(cat_ids):
        scores, matched, num_gt = matches[cat_id]
        has_gt[k] = num_gt > 0
        kept = scores[None, :] >= SCORE_GRID[:, None]  # (thresholds, detections)
        tp = (kept & matched[None, :]).sum(axis=1)
        n = kept.sum(axis=1)
        precision[k] = np.divide(tp, n, out=np.zeros(SCORE_GRID.size), where=n > 0)
        recall[k] = tp / num_gt if num_gt else 0.0
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0)
    mean_f1 = f1[has_gt].mean(axis=0) if has_gt.any() else np.zeros(SCORE_GRID.size)
    j = SCORE_GRID.size - 1 - int(np.argmax(mean_f1[::-1]))  # of equal F1s, the highest threshold
    per_class = {
        name: {"precision": round(float(precision[k, j]), 4), "recall": round(float(recall[k, j]), 4)}
        for k, name in enumerate(names)
        if has_gt[k]
    }
    return {
        "score_thr": round(float(SCORE_GRID[j]), 2),
        "f1": round(float(mean_f1[j]), 4),
        "precision": round(float(precision[has_gt, j].mean()), 4) if has_gt.any() else 0.0,
        "recall": round(float(recall[has_gt, j].mean()), 4) if has_gt.any() else 0.0,
        "per_class": per_class,
    }


def confusion_matrix(coco_gt: COCO, results: list[dict], score_thr: float, iou_thr: float = 0.5) -> np.ndarray:
    """(K + 1, K + 1) counts: row = true class, column = predicted class, index K = background.

    Per image, detections scoring at least ``score_thr`` are matched to non-crowd ground truth of any
    class, pairs taken by decreasing IoU (at least ``iou_thr``), each box used once. A matched pair counts
    at (true, predicted); a box nothing matched at (true, background); a detection that matched nothing
    at (background, predicted). Classes are the sorted category ids.
    """
    cat_ids = sorted(coco_gt.getCatIds())
    index = {c: i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    dets_by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_thr:
            dets_by_image.setdefault(r["image_id"], []).append(r)
    for image_id in coco_gt.getImgIds():
        gts = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        dets = dets_by_image.get(image_id, [])
        gt_cls = [index[a["category_id"]] for a in gts]
        dt_cls = [index[d["category_id"]] for d in dets]
        used_gt, used_dt = set(), set()
        if gts and dets:
            iou = box_iou(_xyxy([a["bbox"] for a in gts]), _xyxy([d["bbox"] for d in dets]))  # (G, D)
            g, d = torch.nonzero(iou >= iou_thr, as_tuple=True)
            order = torch.argsort(iou[g, d], descending=True, stable=True)
            for gi, di in zip(g[order].tolist(), d[order].tolist()):
                if gi not in used_gt and di not in used_dt:
                    used_gt.add(gi)
                    used_dt.add(di)
                    matrix[gt_cls[gi], dt_cls[di]] += 1
        for gi, c in enumerate(gt_cls):
            if gi not in used_gt:
                matrix[c, bg] += 1
        for di, c in enumerate(dt_cls):
            if di not in used_dt:
                matrix[bg, c] += 1
    return matrix


def _xyxy(boxes: list[list[float]]) -> torch.Tensor:
    """COCO [x, y, w, h] rows -> (N, 4) float64 xyxy."""
    t = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)
