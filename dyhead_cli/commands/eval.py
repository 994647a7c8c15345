"""``dyhead eval RECIPE --weights W [--json OUT] [--plots DIR] [--device D]``: the COCO table, per-class
AP and AP50, precision/recall at the best-F1 threshold, a JSON file and analysis plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from dyhead_cli.commands.console import console, say
from dyhead_cli.commands.progress import reporter_for_console
from dyhead_cli.engine import recipes
from dyhead_cli.engine.evaluate import STAT_NAMES, evaluate_checkpoint, metrics_json
from dyhead_cli.engine.paths import check_output_dir, check_output_file, write_text_atomic


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(title="COCO bbox evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in zip(STAT_NAMES, metrics["stats"]):
        table.add_row(name, _num(value))
    console.print(table)
    f1 = metrics.get("best_f1", {})
    per = Table(title=f"per class (precision/recall at the best-F1 score threshold {f1.get('score_thr', 0):.2f})")
    for column in ("class", "AP", "AP50", "precision", "recall"):
        per.add_column(column, justify="left" if column == "class" else "right")
    for name, value in metrics["per_class"].items():
        pr = f1.get("per_class", {}).get(name, {})
        per.add_row(
            name,
            _num(value),
            _num(metrics.get("per_class_AP50", {}).get(name)),
            f"{pr['precision']:.3f}" if pr else "-",
            f"{pr['recall']:.3f}" if pr else "-",
        )
    if f1:
        per.add_row("all", _num(metrics["AP"]), _num(metrics["AP50"]), f"{f1['precision']:.3f}", f"{f1['recall']:.3f}")
    console.print(per)


def run(
    recipe_path: Path, weights: Path, json_out: Path | None, overrides: list[str], device: str = "auto", plots: Path | None = None
) -> dict[str, Any]:
    inputs = [("recipe", recipe_path), ("checkpoint --weights", weights)]
    if json_out is not None or plots is not None:  # the validation data is an input too
        data = recipes.load(recipe_path, overrides).data
        inputs += [
            ("validation annotation file data.val_ann", data.val_ann),
            ("validation images data.val_images", data.val_images),
        ]
    if json_out is not None:  # refused before any work when it would overwrite an input or is a folder
        json_out = check_output_file(json_out, "--json", inputs, suffixes=(".json",))
    if plots is not None:  # likewise a --plots that is a file
        plots = check_output_dir(plots, "--plots", inputs)
    reporter = reporter_for_console("eval")
    try:
        metrics = evaluate_checkpoint(recipe_path, weights, overrides, device, reporter=reporter, plots_dir=plots)
    finally:
        reporter.finish()
    print_metrics(metrics)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(metrics_json(metrics), indent=2))
        say(f"wrote {json_out}")
    if plots is not None:
        say(f"wrote {Path(plots) / 'confusion_matrix.png'} and {Path(plots) / 'pr_curves.png'}")
    return metrics
