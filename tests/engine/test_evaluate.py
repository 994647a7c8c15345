import contextlib
import io
import json
import math

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
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )
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
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(out)
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
    # undefined numbers (no large box here) are NaN, as pycocotools gives them for a detection that finds nothing
    junk = coco_evaluate(gt, [{"image_id": 1, "category_id": 2, "bbox": [90, 70, 5, 5], "score": 0.1}])
    assert [math.isnan(s) for s in empty["stats"]] == [math.isnan(s) for s in junk["stats"]]
    assert math.isnan(empty["APl"]) and empty["APs"] == 0.0 and junk["AP"] == 0.0
    only_dogs = coco_evaluate(gt, [], image_ids=[2])
    assert only_dogs["per_class"]["dog"] == 0.0 and math.isnan(only_dogs["per_class"]["cat"])


def test_an_annotation_id_of_zero_still_counts_as_matched():
    """COCOeval stores a match as the annotation's id and reads 0 as none: a perfect detection of the
    annotation with id 0 was a false positive (AP 0 on this one-box case). Ids are renumbered for it."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    found = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}]
    out = coco_evaluate(gt, found)
    assert out["AP"] == pytest.approx(100.0) and out["best_f1"]["recall"] == pytest.approx(1.0)
    assert gt.dataset["annotations"][0]["id"] == 0  # the caller's object is left as it was


def test_detections_to_coco_maps_labels_to_category_ids():
    det = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    (row,) = detections_to_coco(det, 7, [2, 9])
    assert row == {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}


# ----------------------------------------------------------------------------------------------------
# analysis: best-F1 precision/recall, confusion matrix, the --json layout


def make_gt(images, cats, boxes):
    anns = []
    for image_id, items in boxes.items():
        for x, y, w, h, c in items:
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in images],
        "categories": cats,
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_best_f1_threshold_precision_and_recall_by_hand():
    # one class, two boxes; detections: 0.9 hits, 0.8 misses, 0.6 hits
    gt = make_gt([1, 2], [{"id": 1, "name": "a"}], {1: [(10, 10, 20, 20, 1)], 2: [(50, 50, 20, 20, 1)]})
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.6},
    ]
    f1 = coco_evaluate(gt, dets)["best_f1"]
    # >= 0.9: P 1, R 1/2, F1 2/3;  >= 0.8: P 1/2, R 1/2, F1 1/2;  >= 0.6: P 2/3, R 1, F1 0.8 (the best; highest such threshold)
    assert f1["score_thr"] == 0.6 and f1["f1"] == pytest.approx(0.8, abs=1e-4)
    assert f1["precision"] == pytest.approx(2 / 3, abs=1e-4) and f1["recall"] == 1.0
    assert f1["per_class"] == {"a": {"precision": pytest.approx(2 / 3, abs=1e-4), "recall": 1.0}}


def test_confusion_matrix_counts_by_hand():
    from dyhead_cli.engine.analysis import confusion_matrix

    cats = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 9, "name": "c"}]
    gt = make_gt(
        [1, 2],
        cats,
        {
            1: [(0, 0, 20, 20, 3), (50, 50, 20, 20, 7), (80, 0, 10, 10, 9)],  # a, b, c (c is never found)
            2: [(0, 0, 30, 30, 3)],
        },
    )
    dets = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 20, 20], "score": 0.9},  # a on a: (a, a)
        {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "score": 0.8},  # a on b: (b, a)
        {"image_id": 1, "category_id": 7, "bbox": [30, 80, 10, 10], "score": 0.7},  # b on nothing: (bg, b)
        {"image_id": 1, "category_id": 9, "bbox": [0, 0, 20, 20], "score": 0.1},  # below the threshold: ignored
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 30, 30], "score": 0.6},  # b on a: (a, b)
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 29, 30], "score": 0.5},  # a on a, but the box is taken: (bg, a)
    ]
    m = confusion_matrix(gt, dets, score_thr=0.3)
    expected = np.array(
        [
            # predicted a, b, c, background
            [1, 1, 0, 0],  # true a: one found as a (image 1), one as b (image 2: IoU 1.0 beats 0.967)
            [1, 0, 0, 0],  # true b: found as a
            [0, 0, 0, 1],  # true c: missed
            [1, 1, 0, 0],  # background: the spare a on image 2, b on nothing
        ]
    )
    np.testing.assert_array_equal(m, expected)


def test_eval_json_has_ar_per_class_ap50_and_best_f1():
    gt, dets = small_case()
    out = metrics_json(coco_evaluate(gt, dets))
    assert {"AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "per_class_AP50", "best_f1"} <= set(out)
    assert set(out["per_class_AP50"]) == {"cat", "dog"} and 0 <= out["best_f1"]["score_thr"] <= 1
    json.dumps(out, allow_nan=False)


def test_plots_are_written(tmp_path):
    from dyhead_cli.engine.evaluate import write_plots

    gt, dets = small_case()
    paths = write_plots(coco_evaluate(gt, dets), gt, dets, tmp_path / "plots")
    assert [p.name for p in paths] == ["confusion_matrix.png", "pr_curves.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_results_png_of_a_run_evaluated_before_its_first_logged_step_warns_nothing(tmp_path):
    # an empty legend was a matplotlib UserWarning on stderr in short runs
    import warnings

    from dyhead_cli.engine.plots import plot_results

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_results([{"event": "eval", "step": 1, "AP": None, "AP50": None}], tmp_path / "results.png")
        plot_results([], tmp_path / "empty.png")
    assert (tmp_path / "results.png").stat().st_size > 1000
