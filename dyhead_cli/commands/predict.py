"""``dyhead predict PATH... --weights W [--out preds.json] ...``: a progress bar, then one summary line.

Exit code 1 when nothing could be predicted (every image unreadable); skipped files alone do not fail the run.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dyhead_cli.commands.console import err_console, note, say
from dyhead_cli.engine.paths import check_distinct, check_output_file
from dyhead_cli.engine.predict import PredictOptions, PredictSummary, predict
from dyhead_cli.engine.results import images_json_path
from dyhead_cli.errors import DyheadError


def run(paths: list[Path], weights: Path, out: Path, options: PredictOptions) -> PredictSummary:
    check_outputs(paths, weights, out, options.recipe_path, options.images_dir)
    progress = Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,  # the summary line replaces it
        disable=not err_console.is_terminal,  # a bar that is never drawn still left an empty line in logs
    )
    task = None

    def on_start(total: int) -> None:
        nonlocal task
        task = progress.add_task("predict", total=total, speed="")

    def on_batch(s: PredictSummary) -> None:
        progress.update(task, completed=s.num_predicted + s.num_skipped, speed=f"{s.images_per_s:.1f} img/s")

    def on_skip(message: str) -> None:
        note("skipped", message, to=progress.console)

    with progress:
        summary = predict(paths, weights, out, options, on_start=on_start, on_batch=on_batch, on_skip=on_skip)
    notes = []
    if summary.num_skipped:
        notes.append(f"{summary.num_skipped} unreadable, skipped")
    if summary.ignored:
        notes.append(f"{len(summary.ignored)} not an image or video")
    noted = f" ({'; '.join(notes)})" if notes else ""
    saved = f", drawn in {summary.save_dir}" if summary.save_dir is not None else ""
    say(
        f"predicted {summary.num_predicted} of {summary.num_images} images{noted}: {summary.num_detections} detections, "
        f"{summary.images_per_s:.1f} images/s -> {summary.out} (image list: {summary.images_json}, ids: {summary.id_rule}){saved}"
    )
    if summary.num_predicted == 0:
        raise DyheadError(f"nothing could be predicted: none of the {summary.num_images} images could be read")
    return summary


def check_outputs(paths: list[Path], weights: Path, out: Path, recipe_path: Path | None, images_dir: Path | None) -> None:
    """Refuse, before any work, a ``--out`` (or its ``.images.json``) that is an input or not a JSON file."""
    inputs = [("checkpoint --weights", weights), ("--recipe", recipe_path), ("--images folder", images_dir)]
    inputs += [("input", p) for p in paths]
    check_output_file(out, "--out", inputs, suffixes=(".json",))
    images_json = images_json_path(out)
    check_output_file(images_json, "--out's image list", inputs, suffixes=(".json",))
    check_distinct({"--out": out, "its image list": images_json})
