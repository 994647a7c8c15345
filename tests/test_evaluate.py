import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dyhead_cli.engine.evaluate import coco_evaluate, metrics_json
from dyhead_cli.engine.inference import detections_to_coco


def small_case():
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    cats = [{"id": 2, "name": "cat"}, {"id": 9, "name": "dog"}]
    boxes = {1: [(10, 10, 30, 20, 2), (50, 40, 40, 30, 9)], 2: [(5, 5, 60, 50, 9)], 3: [(20, 30, 10, 10, 2)]}
    anns = []
    for image_id, items in boxes.items():
        for x, y, w, h, c in items:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "categories": cats, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    dets = [
        {"image_id": 1, "category_id": 2, "bbox": [11, 10, 30, 21], "score": 0.9},
        {"image_id": 1, "category_id": 9, "bbox": [52, 45, 40, 30], "score": 0.8},
        {"image_id": 1, "category_id": 9, "bbox": [0, 0, 20, 20], "score": 0.7},
        {"image_id": 2, "category_id": 9, "bbox": [5, 5, 40, 50], "score": 0.6},
        {"image_id": 3, "category_id": 9, "bbox": [20, 30, 10, 10], "score": 0.95},
        {"image_id": 3, "category_id": 2, "bbox": [21, 31, 10, 10], "score": 0.5},
    ]
    return gt, dets


def test_numbers_equal_pycocotools_own():
    gt, dets = small_case()
    ours = coco_evaluate(gt, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert ours["stats"] == pytest.approx([s * 100 if s >= 0 else float("nan") for s in e.stats], nan_ok=True)
    assert ours["APl"] != ours["APl"] and e.stats[5] == -1  # undefined (no large boxes): NaN, null in JSON
    assert ours["AP"] == pytest.approx(e.stats[0] * 100) and ours["AP50"] == pytest.approx(e.stats[1] * 100)
    assert 0 < ours["AP"] < 100
    # per-class AP: COCOeval's precision for that category, area "all", 100 detections
    for k, name in enumerate(["cat", "dog"]):
        p = e.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class"][name] == pytest.approx(float(np.mean(p[p > -1])) * 100)
    out = metrics_json(ours)
    assert set(out) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert out["APl"] is None and out["AP"] == pytest.approx(e.stats[0] * 100)
    json.dumps(out, allow_nan=False)


def test_perfect_and_empty_detections():
    gt, _ = small_case()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    assert coco_evaluate(gt, perfect)["AP"] == pytest.approx(100.0)
    empty = coco_evaluate(gt, [])
    assert empty["AP"] == 0.0 and empty["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_detections_to_coco_maps_labels_to_category_ids():
    det = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    (row,) = detections_to_coco(det, 7, [2, 9])
    assert row == {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}
