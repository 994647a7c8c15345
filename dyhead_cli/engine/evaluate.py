"""COCO evaluation with pycocotools' COCOeval: the 12 standard numbers, per-class AP and AP50, precision
and recall at the best-F1 threshold (``engine.analysis``), on one process or sharded over several.

AP values are reported in percent, as papers do.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dyhead_cli.engine.analysis import (
    best_f1,
    confusion_matrix,
    per_class_ap50,
    pr_curves,
)
from dyhead_cli.engine.progress import Reporter
from dyhead_cli.errors import DyheadError

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


# The area range of each of STAT_NAMES, as COCOeval's (px^2; bounds included)
AREAS = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
STAT_AREAS = ["all", "all", "all", "small", "medium", "large", "all", "all", "all", "small", "medium", "large"]


def has_ground_truth(coco_gt: COCO, image_ids: list[int] | None, cat: int | None = None, area: str = "all") -> bool:
    """Whether COCOeval would count a ground-truth box (not crowd, not ignored) of category ``cat`` (any)
    in ``area``'s range on ``image_ids`` (all): where it has none, a number is undefined (-1 there)."""
    lo, hi = AREAS[area]
    images = None if image_ids is None else set(image_ids)
    return any(
        not a.get("iscrowd", 0)
        and not a.get("ignore", 0)
        and (images is None or a["image_id"] in images)
        and (cat is None or a["category_id"] == cat)
        and lo <= a.get("area", 0.0) <= hi
        for a in coco_gt.dataset.get("annotations", [])
    )


def with_countable_ann_ids(coco_gt: COCO) -> COCO:
    """``coco_gt``, or a copy with its annotation ids renumbered 1..N when one is 0 or below, or repeated.

    COCOeval records a match as the matched annotation's id and reads 0 as "no match": a detection of an
    annotation with id 0 counted as a false positive (exports that count from 0 are common), and a repeated
    id loads one annotation twice. The ids mean nothing else to the evaluation.
    """
    ids = [a["id"] for a in coco_gt.dataset.get("annotations", [])]
    if all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids):
        return coco_gt
    fixed = COCO()
    fixed.dataset = dict(coco_gt.dataset)
    fixed.dataset["annotations"] = [{**a, "id": n + 1} for n, a in enumerate(coco_gt.dataset["annotations"])]
    fixed.createIndex()
    return fixed


def coco_evaluate(
    coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None, verbose: bool = False
) -> dict[str, Any]:
    """COCOeval on ``results``: AP..ARl in percent, ``stats`` (12 numbers), ``per_class`` AP,
    ``per_class_AP50``, ``best_f1`` (threshold, precision, recall) and ``pr`` (curves for plotting)."""
    cats = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    names = [c["name"] for c in cats]
    if not results:  # pycocotools cannot load none; 0 where there is ground truth to find, NaN (null) where not
        per_class = {c["name"]: 0.0 if has_ground_truth(coco_gt, image_ids, cat=c["id"]) else math.nan for c in cats}
        stats = [0.0 if has_ground_truth(coco_gt, image_ids, area=area) else math.nan for area in STAT_AREAS]
        return dict(zip(STAT_NAMES, stats)) | {
            "per_class": per_class,
            "per_class_AP50": dict(per_class),
            "stats": stats,
            "best_f1": {"score_thr": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0, "per_class": {}},
            "pr": {"recall": np.linspace(0, 1, 101), "precision": {}},
        }
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = with_countable_ann_ids(coco_gt)
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools says -1 where a number is undefined (no ground truth of that size): NaN here, null in JSON
    stats = [float(s) * 100.0 if s >= 0 else float("nan") for s in evaluator.stats]
    out: dict[str, Any] = dict(zip(STAT_NAMES, stats))
    out["stats"] = stats
    # precision: (T iou thresholds, R recall points, K classes, A areas, M max-dets); area "all", 100 dets
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[name] = float(np.mean(p)) * 100.0 if p.size else float("nan")
    out["per_class"] = per_class
    out["per_class_AP50"] = per_class_ap50(evaluator, names)
    out["best_f1"] = best_f1(evaluator, names)
    out["pr"] = pr_curves(evaluator, names)
    return out


def load_coco(ann_file: str | Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(str(ann_file))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DyheadError(f"cannot read COCO annotations {ann_file}: {e}") from None


def json_number(value: float, digits: int = 3) -> float | None:
    """A metric for JSON: rounded, or None where pycocotools found it undefined."""
    return None if math.isnan(value) else round(value, digits)


def metrics_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``eval --json`` layout, in percent (null = undefined): the six AP and six AR numbers, per-class
    AP and AP50, and ``best_f1`` (score threshold, mean F1, precision, recall, per class; fractions)."""
    out: dict[str, Any] = {k: json_number(metrics[k], 6) for k in STAT_NAMES}
    out["per_class"] = {name: json_number(v, 6) for name, v in metrics["per_class"].items()}
    out["per_class_AP50"] = {name: json_number(v, 6) for name, v in metrics.get("per_class_AP50", {}).items()}
    if "best_f1" in metrics:
        out["best_f1"] = metrics["best_f1"]
    return out


def write_plots(metrics: dict[str, Any], coco_gt: COCO, results: list[dict], folder: Path, iou_thr: float = 0.5) -> list[Path]:
    """``confusion_matrix.png`` (at the best-F1 score threshold) and ``pr_curves.png`` in ``folder``."""
    from dyhead_cli.engine.plots import plot_confusion_matrix, plot_pr_curves

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DyheadError(f"cannot create {folder}: {e.strerror or e}") from None
    names = [c["name"] for c in coco_gt.loadCats(sorted(coco_gt.getCatIds()))]
    thr = float(metrics["best_f1"]["score_thr"])
    matrix = confusion_matrix(coco_gt, results, thr, iou_thr)
    paths = [folder / "confusion_matrix.png", folder / "pr_curves.png"]
    plot_confusion_matrix(matrix, names, paths[0], thr, iou_thr)
    ap50 = {k: json_number(v, 1) for k, v in metrics["per_class_AP50"].items()}
    plot_pr_curves(metrics["pr"]["recall"], metrics["pr"]["precision"], ap50, paths[1])
    return paths


def predict_shard(
    model,
    dataset,
    recipe,
    device,
    rank: int = 0,
    world: int = 1,
    reporter: Reporter | None = None,
    cat_ids: list[int] | None = None,
) -> list[dict]:
    """COCO results of process ``rank``'s share of ``dataset`` (see ``data.loaders.ShardBatches``); label k
    is category ``cat_ids[k]`` (default: the data set's k-th smallest category id)."""
    from dyhead_cli.data.loaders import clean_worker_errors, val_loader
    from dyhead_cli.engine.inference import predict_coco

    reporter = reporter or Reporter()
    loader, _ = val_loader(recipe, rank, world, dataset)
    share = sum(len(b) for b in loader.batch_sampler)
    reporter.eval_start(share)
    start = time.perf_counter()
    results = predict_coco(
        model,
        clean_worker_errors(loader),
        device,
        cat_ids or list(dataset.cat_ids),
        progress=reporter.eval_advance,
        size_divisibility=recipe.data.size_divisibility,
    )
    reporter.eval_end(time.perf_counter() - start)
    return results


def evaluate_checkpoint(
    recipe_path: Path,
    weights: Path,
    overrides: list[str],
    device: str = "auto",
    reporter: Reporter | None = None,
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """``dyhead eval``'s engine: the checkpoint ``weights`` on the validation set of ``recipe_path``.
    With ``plots_dir`` the confusion matrix and PR curves are written there."""
    from dyhead_cli.data.coco import build_dataset
    from dyhead_cli.engine import recipes
    from dyhead_cli.engine.checkpoint import load_model_weights, load_weights
    from dyhead_cli.engine.inference import choose_device
    from dyhead_cli.engine.recipe_fit import check_recipe_fits, checkpoint_category_ids
    from dyhead_cli.models.build import build_model

    recipe = recipes.load(recipe_path, overrides)
    dev = choose_device(device)
    state, meta = load_weights(weights)
    check_recipe_fits(recipe, meta, recipe_path, weights)
    dataset = build_dataset(recipe.data, "val")
    cat_ids = checkpoint_category_ids(meta, dataset, weights)
    if not recipe.model.class_names:
        recipe.model.class_names = list(dataset.class_names)
        recipe.model.num_classes = len(dataset.class_names)
    model = build_model(recipe.model)
    load_model_weights(model, state, source=str(weights))
    model.to(dev)
    results = predict_shard(model, dataset, recipe, dev, reporter=reporter, cat_ids=cat_ids)
    metrics = coco_evaluate(dataset.coco, results)
    if plots_dir is not None:
        write_plots(metrics, dataset.coco, results, plots_dir)
    return metrics
