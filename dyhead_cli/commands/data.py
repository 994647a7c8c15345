"""``dyhead data synth`` and ``dyhead data check``: write the synthetic set, or report a data set's problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dyhead_cli.commands.console import note, say
from dyhead_cli.data.check import CheckReport, check_dataset
from dyhead_cli.data.synthetic import (
    describe_settings,
    generator_settings,
    holds_synthetic_set,
    make_synthetic_coco,
    synthetic_settings,
)
from dyhead_cli.engine.paths import check_output_dir
from dyhead_cli.errors import DyheadError


def synth(
    out: Path, num_train: int, num_val: int, image_size: int, seed: int, colour_by_class: bool, force: bool = False
) -> dict[str, Any]:
    check_output_dir(out, "OUT")
    if not force and Path(out).is_dir() and any(Path(out).iterdir()) and not holds_synthetic_set(Path(out)):
        raise DyheadError(
            f"{out} is not empty and holds no synthetic data set: its train/, val/ or annotations/ files could be "
            "overwritten; choose an empty or new folder, or pass --force"
        )
    if not force and holds_synthetic_set(Path(out)):  # the same settings again: made again, the same files
        for split, count in (("train", num_train), ("val", num_val)):
            ann = Path(out) / "annotations" / f"{split}.json"
            if ann.is_file():
                made = synthetic_settings(ann)
                if made != generator_settings(count, image_size, seed, colour_by_class):
                    raise DyheadError(
                        f"{out} holds a synthetic set made with other settings ({split}: {describe_settings(made)}); a run trained on "
                        "it would lose its data: choose another folder, or pass --force to replace it"
                    )
    summary = make_synthetic_coco(out, num_train, num_val, image_size=image_size, seed=seed, colour_by_class=colour_by_class)
    say(
        f"wrote {summary['num_train']} train and {summary['num_val']} val images "
        f"({', '.join(summary['categories'])}) to {out}: annotations in {summary['train_ann']} and {summary['val_ann']}"
    )
    return summary


def check(ann: Path, images: Path) -> CheckReport:
    report = check_dataset(ann, images)
    for line in report.errors:
        note("error  ", line, style="red")
    for line in report.warnings:
        note("warning", line)
    say(f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    if not report.ok:
        raise typer.Exit(1)
    return report
