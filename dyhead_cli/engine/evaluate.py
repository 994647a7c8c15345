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
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from dyhead_cli.errors import DyheadError

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@torch.no_grad()
def predict_coco(model: nn.Module, loader, device: torch.device, cat_of_label: list[int], autocast_dtype=None, progress=None) -> list[dict]:
    """Run ``model`` over a loader of the data set's collated batches; return COCO result dicts."""
    model.eval()
    results: list[dict] = []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            detections = model(images, batch["image_sizes"], original_sizes=batch["orig_sizes"])
        for image_id, det in zip(batch["image_ids"], detections):
            results.extend(detections_to_coco(det, int(image_id), cat_of_label))
        if progress is not None:
            progress(len(batch["image_ids"]))
    return results


def detections_to_coco(det: dict, image_id: int, cat_of_label: list[int]) -> list[dict]:
    boxes = det["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = det["scores"].float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    return [
        {"image_id": image_id, "category_id": int(cat_of_label[label]), "bbox": [round(v, 2) for v in box], "score": round(score, 5)}
        for box, score, label in zip(xywh, scores, labels)
    ]


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


def print_metrics(metrics: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title="COCO bbox evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in zip(STAT_NAMES, metrics["stats"]):
        table.add_row(name, "-" if math.isnan(value) else f"{value:.1f}")
    console.print(table)
    per = Table(title="per-class AP")
    per.add_column("class")
    per.add_column("AP", justify="right")
    for name, value in metrics["per_class"].items():
        per.add_row(name, "-" if math.isnan(value) else f"{value:.1f}")
    console.print(per)


def eval_from_cli(recipe_path: Path, weights: Path, json_out: Path | None, overrides: list[str]) -> dict[str, Any]:
    """``dyhead eval RECIPE --weights W [--json OUT]``."""
    from rich.console import Console

    from dyhead_cli.engine.checkpoint import load_model_weights, load_weights
    from dyhead_cli.engine.train import build_val_loader, choose_device
    from dyhead_cli.models.build import build_model
    from dyhead_cli.recipe import load_recipe

    console = Console()
    recipe = load_recipe(recipe_path, overrides)
    state, meta = load_weights(weights)
    loader, dataset = build_val_loader(recipe)
    if not recipe.model.class_names:
        recipe.model.class_names = list(dataset.class_names)
        recipe.model.num_classes = len(dataset.class_names)
    model = build_model(recipe.model)
    load_model_weights(model, state, source=str(weights))
    device = choose_device(recipe.train.device)
    model.to(device)
    results = predict_coco(model, loader, device, list(dataset.cat_ids))
    metrics = coco_evaluate(dataset.coco, results)
    print_metrics(metrics, console)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(metrics_json(metrics), indent=2))
        console.print(f"wrote {json_out}")
    return metrics
