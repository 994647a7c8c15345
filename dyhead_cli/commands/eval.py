"""``dyhead eval RECIPE --weights W [--json OUT] [--device D]``: the COCO table, per-class AP, a JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from dyhead_cli.commands.console import console, say
from dyhead_cli.engine.evaluate import STAT_NAMES, evaluate_checkpoint, metrics_json


def print_metrics(metrics: dict[str, Any]) -> None:
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
        per.add_row(name, "-" if math.isnan(value) else f"{value:.1f}", )
    console.print(per)


def run(recipe_path: Path, weights: Path, json_out: Path | None, overrides: list[str], device: str = "auto") -> dict[str, Any]:
    metrics = evaluate_checkpoint(recipe_path, weights, overrides, device)
    print_metrics(metrics)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(metrics_json(metrics), indent=2))
        say(f"wrote {json_out}")
    return metrics
