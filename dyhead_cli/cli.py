"""The ``dyhead`` command line: thin Typer commands that parse, call one function and print.

Every user mistake surfaces as a ``DyheadError`` and is printed as one line with exit code 1.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dyhead_cli.errors import DyheadError

app = typer.Typer(
    name="dyhead",
    help="Train, evaluate, run and benchmark Dynamic Head object detectors on any timm backbone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build and check COCO-format data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

NOT_BUILT = 2


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def not_built(what: str) -> None:
    fail(f"'{what}' is not built yet in this version of dyhead", NOT_BUILT)


def run_guarded(fn, *args, **kwargs):
    """Call ``fn``; turn user errors (and Ctrl-C) into one readable line and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except DyheadError as e:
        # Errors raised in DataLoader workers come back with the worker's traceback in front: keep the message.
        lines = [line for line in str(e).splitlines() if line.strip()]
        fail(lines[-1] if lines else type(e).__name__)
    except KeyboardInterrupt:
        fail("interrupted", 130)


RecipeArg = typer.Argument(..., help="Recipe TOML file (see recipes/).")
SetOpt = typer.Option(None, "--set", help="Dotted override, e.g. --set train.lr=0.02 (repeatable).")


@app.command()
def train(
    recipe: Path = RecipeArg,
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe name>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Train a detector from a recipe."""
    from dyhead_cli.engine import train as engine

    run_guarded(engine.train_from_cli, recipe, out, resume, overrides or [])


@app.command("eval")
def evaluate(
    recipe: Path = RecipeArg,
    weights: Path = typer.Option(..., "--weights", help="Checkpoint (.safetensors) to evaluate."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write AP, AP50, ... and per-class AP here."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Evaluate a checkpoint on the recipe's validation set with COCOeval."""
    from dyhead_cli.engine import evaluate as engine

    run_guarded(engine.eval_from_cli, recipe, weights, json_out, overrides or [])


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="Images, folders (recursive) or one COCO annotation file (its image list)."),
    weights: Path = typer.Option(..., "--weights", help="Checkpoint (.safetensors); its metadata carries the recipe."),
    out: Path = typer.Option(Path("preds.json"), "--out", help="COCO results JSON to write (the image list goes to <stem>.images.json)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Use this recipe instead of the checkpoint's."),
    images_dir: Optional[Path] = typer.Option(None, "--images", help="With an annotation file: the folder its file_names are relative to."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (default: the recipe's eval.batch_size)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers (default: the recipe's data.num_workers)."),
    score_thr: Optional[float] = typer.Option(None, "--score-thr", help="Drop detections scoring below this (default: keep all the model gives)."),
    half: bool = typer.Option(False, "--half", help="float16 autocast (CUDA)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (CPU or CUDA)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Run a detector on images and write COCO-format results."""
    from dyhead_cli.predict import predict_from_cli

    run_guarded(
        predict_from_cli, paths, weights, out, recipe, overrides or [], images_dir, device, batch_size, workers, score_thr, half, bf16
    )


@app.command()
def benchmark(
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Benchmark the model of this recipe."),
    model: Optional[str] = typer.Option(None, "--model", help="A timm backbone name (ATSS + DyHead on top)."),
    gpu: bool = typer.Option(False, "--gpu", help="Run on the CUDA device."),
) -> None:
    """Latency report for a detector (CPU, or GPU with --gpu)."""
    if model is not None:
        from dyhead_cli.models.backbone import check_model_name

        run_guarded(check_model_name, model)
    if gpu:
        import torch

        if not torch.cuda.is_available():
            fail("--gpu: no CUDA device is available on this machine")
    not_built("dyhead benchmark")


@app.command()
def visualize(
    images: list[Path] = typer.Argument(..., help="Images to draw on."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint for predictions."),
    out: Path = typer.Option(Path("vis"), "--out", help="Folder for the PNGs."),
) -> None:
    """Draw predictions / ground truth, or DyHead's attention (--attention)."""
    not_built("dyhead visualize")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Reference checkpoint (.pth/.pkl/.safetensors)."),
    dst: Path = typer.Argument(..., help="Our safetensors checkpoint to write."),
    source: str = typer.Option(..., "--from", help="official | mmdet"),
) -> None:
    """Convert an official (detectron2) or MMDetection DyHead checkpoint."""
    not_built("dyhead convert")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write the data set into."),
    num_train: int = typer.Option(200, "--num-train"),
    num_val: int = typer.Option(50, "--num-val"),
    image_size: int = typer.Option(256, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write the built-in synthetic COCO-format data set (coloured shapes on textures)."""
    from dyhead_cli.data.synthetic import make_synthetic_coco

    summary = run_guarded(make_synthetic_coco, out, num_train, num_val, image_size=image_size, seed=seed)
    console.print(
        f"wrote {summary['num_train']} train and {summary['num_val']} val images "
        f"({', '.join(summary['categories'])}) to {out}: annotations in {summary['train_ann']} and {summary['val_ann']}"
    )


@data_app.command("check")
def data_check(
    ann: Path = typer.Argument(..., help="COCO annotation JSON."),
    images: Path = typer.Option(..., "--images", help="Folder with the images."),
) -> None:
    """Report missing/corrupt images, bad boxes, empty images and category problems."""
    from dyhead_cli.data.check import check_dataset

    report = run_guarded(check_dataset, ann, images)
    for line in report.errors:
        console.print(f"[red]error[/]   {line}", highlight=False)
    for line in report.warnings:
        console.print(f"[yellow]warning[/] {line}", highlight=False)
    console.print(f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - entry point for python -m
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
