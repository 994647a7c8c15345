"""COCO evaluation with pycocotools' COCOeval: the 12 standard numbers and a per-class AP table.

AP values are reported in percent, as papers do.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dyhead_cli.errors import DyheadError

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_evaluate(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None, verbose: bool = False) -> dict[str, Any]:
    """COCOeval on ``results``; returns AP..ARl in percent, ``stats`` (12 numbers) and ``per_class`` AP."""
    cats = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    empty = {name: 0.0 for name in STAT_NAMES} | {"per_class": {c["name"]: 0.0 for c in cats}, "stats": [0.0] * 12}
    if not results:
        return empty
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
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
    for k, cat in enumerate(cats):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[cat["name"]] = float(np.mean(p)) * 100.0 if p.size else float("nan")
    out["per_class"] = per_class
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
    """The ``eval --json`` layout: the six AP numbers and per-class AP, in percent (null = undefined)."""
    out: dict[str, Any] = {k: json_number(metrics[k], 6) for k in STAT_NAMES[:6]}
    out["per_class"] = {name: json_number(v, 6) for name, v in metrics["per_class"].items()}
    return out


def evaluate_checkpoint(recipe_path: Path, weights: Path, overrides: list[str], device: str = "auto") -> dict[str, Any]:
    """``dyhead eval``'s engine: the checkpoint ``weights`` on the validation set of ``recipe_path``."""
    from dyhead_cli.data.loaders import val_loader
    from dyhead_cli.engine.checkpoint import load_model_weights, load_weights
    from dyhead_cli.engine.inference import choose_device, predict_coco
    from dyhead_cli.models.build import build_model
    from dyhead_cli.engine import recipes

    recipe = recipes.load(recipe_path, overrides)
    dev = choose_device(device)
    state, _ = load_weights(weights)
    loader, dataset = val_loader(recipe)
    if not recipe.model.class_names:
        recipe.model.class_names = list(dataset.class_names)
        recipe.model.num_classes = len(dataset.class_names)
    model = build_model(recipe.model)
    load_model_weights(model, state, source=str(weights))
    model.to(dev)
    results = predict_coco(model, loader, dev, list(dataset.cat_ids))
    return coco_evaluate(dataset.coco, results)
