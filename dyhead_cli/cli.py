"""The ``dyhead`` command line: Typer wiring only. Each command parses its options and calls one function
in ``commands/`` (which calls the engine and prints).

Every user mistake surfaces as a ``DyheadError`` and is printed as one line with exit code 1.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from dyhead_cli.commands.console import fail
from dyhead_cli.engine.paths import describe_os_error
from dyhead_cli.errors import DyheadError, Terminated

app = typer.Typer(
    name="dyhead",
    help="Train, evaluate, run and benchmark Dynamic Head object detectors on any timm backbone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build and check COCO-format data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
recipes_app = typer.Typer(help="The built-in recipes: list them, or print one to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


def _version(value: bool) -> None:
    if value:
        from dyhead_cli import __version__

        typer.echo(f"dyhead {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train, evaluate, run and benchmark Dynamic Head object detectors on any timm backbone."""
    from dyhead_cli.engine.allocator import keep_freed_memory

    keep_freed_memory()  # repeated forward passes reuse their memory (DYHEAD_MALLOC=system: off)


def run_guarded(fn, *args, **kwargs):
    """Call ``fn``; turn every failure into one readable line on stderr and a non-zero exit, never a traceback.

    ``DyheadError`` (the user's mistake): exit 1. ``OSError`` (a full disk, a read-only folder, a file that
    vanished): exit 1, naming the path. Ctrl-C: exit 130; SIGTERM the same way (``Terminated``), exit 143.
    Anything else is our bug: one line asking for a report, exit 2; ``DYHEAD_DEBUG=1`` re-raises it with its
    traceback.
    """
    previous = terminate_as_interrupt()
    quiet_killed_workers()
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except DyheadError as e:
        fail(last_line(e))
    except Terminated:
        fail("terminated (SIGTERM)", 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as e:
        if debug():
            raise
        fail(describe_os_error(e))
    except MemoryError:
        if debug():
            raise
        fail("out of memory: use smaller images or batches")
    except RecursionError:
        if debug():
            raise
        fail("input nested too deeply to read (recursion limit)")
    except Exception as e:  # noqa: BLE001 - the last line of defence: never show a traceback to a user
        signalled = WORKER_SIGNALLED.search(str(e)) if isinstance(e, RuntimeError) else None
        if signalled:  # the signal sent to the whole group reached a DataLoader worker first
            if signalled.group(1) == "Terminated":
                fail("terminated (SIGTERM)", 128 + signal.SIGTERM)
            fail("interrupted", 130)
        if debug():
            raise
        fail(
            f"internal error ({type(e).__name__}: {last_line(e)}); please report it with the command you ran "
            f"(DYHEAD_DEBUG=1 shows the traceback)",
            2,
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# PyTorch's words when a DataLoader worker died of a signal; a SIGTERM or Ctrl-C sent to the whole process
# group (timeout, Slurm, kill -- -PGID, a terminal) reaches the workers too.
WORKER_SIGNALLED = re.compile(r"DataLoader worker \(pid.*?\) is killed by signal: (Terminated|Interrupt)")


def quiet_killed_workers() -> None:
    """Drop the "Exception ignored in ... _MultiProcessingDataLoaderIter.__del__" report of a worker that a
    group-wide signal ended: the command already says "terminated" or "interrupted" in its one line. Any
    other unraisable exception still goes to the hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "dyhead_quiet_workers", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and WORKER_SIGNALLED.search(str(unraisable.exc_value)):
            return
        previous(unraisable)

    hook.dyhead_quiet_workers = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def terminate_as_interrupt():
    """SIGTERM raises ``Terminated`` (a ``KeyboardInterrupt``) until ``run_guarded`` returns: a command's
    cleanup runs as after Ctrl-C. Returns the handler to put back (None outside the main thread)."""

    def raise_terminated(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave the signal alone
        return None


def debug() -> bool:
    return os.environ.get("DYHEAD_DEBUG", "") not in ("", "0")


def last_line(e: BaseException) -> str:
    """The message of ``e``, without what DataLoader workers put in front of it.

    An error raised in a worker comes back as "Caught X in DataLoader worker process 0. Original Traceback
    ... dyhead_cli.errors.DyheadError: <message>": keep the message, drop the traceback and the class path.
    """
    text = str(e)
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t"))]
        text = lines[-1] if lines else ""
        text = re.sub(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt)\s*:\s*", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(e).__name__


RecipeArg = typer.Argument(..., help="Recipe TOML file, or a built-in recipe name (dyhead recipes lists them).")
SetOpt = typer.Option(None, "--set", help="Dotted override, e.g. --set train.lr=0.02 (repeatable).")
# engine.inference.DEVICES, spelled out here so that `dyhead --help` does not import torch
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
RecipeOpt = typer.Option(None, "--recipe", help="Use this recipe instead of the checkpoint's.")


@app.command()
def train(
    recipe: Optional[Path] = typer.Argument(
        None,
        help="Recipe TOML file (see recipes/); with --resume, optional: where it differs from the run's own recipe, only --resume's safe keys (train.epochs, train.lr...) may, and they apply.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Run directory (default runs/<recipe name>-<timestamp>); a new or empty folder."
    ),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last checkpoint, with its recipe."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Start over in an --out folder that holds a run (its checkpoints and logs are replaced) or other files.",
    ),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Train a detector from a recipe (or continue a run with --resume)."""
    from dyhead_cli.commands import train as command

    run_guarded(command.run, recipe, out, resume, overrides or [], force)


@app.command("eval")
def evaluate(
    recipe: Path = RecipeArg,
    weights: Path = typer.Option(..., "--weights", help="Checkpoint (.safetensors) to evaluate."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Write AP/AR numbers, per-class AP and AP50, precision/recall at the best-F1 threshold here."
    ),
    plots: Optional[Path] = typer.Option(
        None, "--plots", help="Write a confusion matrix and per-class precision-recall curves (PNG) into this folder."
    ),
    device: str = DeviceOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Evaluate a checkpoint on the recipe's validation set with COCOeval."""
    from dyhead_cli.commands import eval as command

    run_guarded(command.run, recipe, weights, json_out, overrides or [], device, plots)


@app.command()
def predict(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(
        ..., help="Images, videos, folders (recursive) or one COCO annotation file (its image list)."
    ),
    weights: Path = typer.Option(
        ...,
        "--weights",
        help="Checkpoint (.safetensors; its metadata carries the recipe) or a model from dyhead export (.onnx, run by onnxruntime).",
    ),
    out: Path = typer.Option(
        Path("preds.json"),
        "--out",
        help="COCO results JSON to write (the image list beside it: preds.json -> preds.images.json; a name not ending in .json gets .images.json added).",
    ),
    recipe: Optional[Path] = RecipeOpt,
    images_dir: Optional[Path] = typer.Option(
        None, "--images", help="With an annotation file: the folder its file_names are relative to."
    ),
    device: str = DeviceOpt,
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Images per batch (default: the recipe's eval.batch_size)."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers (default: the recipe's data.num_workers)."),
    score_thr: Optional[float] = typer.Option(
        None, "--score-thr", help="Drop detections scoring below this (default: keep all the model gives)."
    ),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Keep only these classes: comma-separated names or category ids."
    ),
    iou: Optional[float] = typer.Option(
        None, "--iou", help="NMS IoU threshold (default: the recipe's model.head_options.nms_thresh)."
    ),
    max_det: Optional[int] = typer.Option(
        None, "--max-det", help="Detections kept per image (default: the recipe's detections_per_img)."
    ),
    tile: int = typer.Option(
        0, "--tile", help="Tiled inference for large images: crops of SIZE pixels (plus the whole image), merged by NMS."
    ),
    tile_overlap: float = typer.Option(
        0.2, "--tile-overlap", help="With --tile: how much neighbouring crops overlap (fraction of SIZE)."
    ),
    vid_stride: int = typer.Option(1, "--vid-stride", help="Videos: predict every N-th frame."),
    save: Optional[Path] = typer.Option(
        None, "--save", help="Folder for annotated images (videos: an annotated video); boxes scoring >= --score-thr, else 0.3."
    ),
    half: bool = typer.Option(False, "--half", help="float16 autocast (CUDA)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (CPU or CUDA)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Run a detector on images and videos and write COCO-format results."""
    from dyhead_cli.commands import predict as command
    from dyhead_cli.engine.predict import PredictOptions

    if not tile and given_on_command_line(ctx, "tile_overlap"):
        fail(f"--tile-overlap {tile_overlap} applies to tiled inference only: give --tile SIZE too")
    wanted = None if classes is None else [c for c in classes.split(",") if c.strip()]
    options = PredictOptions(
        recipe_path=recipe,
        overrides=overrides or [],
        images_dir=images_dir,
        device=device,
        batch_size=batch_size,
        workers=workers,
        score_thr=score_thr,
        half=half,
        bf16=bf16,
        vid_stride=vid_stride,
        save_dir=save,
        classes=wanted,
        iou=iou,
        max_det=max_det,
        tile=tile,
        tile_overlap=tile_overlap,
    )
    run_guarded(command.run, paths, weights, out, options)


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed (not left at its default). By the source's name: Typer may carry
    its own copy of Click, whose ParameterSource is another enum than ``click.core``'s."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


@app.command()
def benchmark(
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="Benchmark the model of this recipe (pretrained weights are not loaded)."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="A timm backbone name, with ATSS + 6-block DyHead on top (default resnet50)."
    ),
    gpu: bool = typer.Option(False, "--gpu", help="Run on the CUDA device."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma-separated batch sizes, e.g. 1,8."),
    size: str = typer.Option("800x1333", "--size", help="Input HxW (or one number for a square)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 (autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Model and inputs in channels-last memory format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone, FPN, DyHead and head."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Timed iterations (default 10 on CPU, 50 on GPU)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Untimed warm-up iterations (default 2 on CPU, 10 on GPU)."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Write the full report (machine, command, settings, figures) as JSON."
    ),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the report as Markdown."),
    compare: bool = typer.Option(
        False, "--compare", help="Also measure the model without DyHead (4-conv towers) and torchvision FCOS-R50."
    ),
    impl: Optional[str] = typer.Option(None, "--impl", help="DyHead deformable convs: fast | reference (default: the model's)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    onnx: Optional[Path] = typer.Option(
        None, "--onnx", help="Also time this model from 'dyhead export' under onnxruntime (CPU, same threads), in the same run."
    ),
) -> None:
    """Latency, throughput, memory, parameters and FLOPs of a detector, stage by stage (CPU, or GPU with --gpu)."""
    options = dict(locals())  # the parameters, named as commands.benchmark.run takes them
    from dyhead_cli.commands import benchmark as command

    run_guarded(command.run, **options)


@app.command()
def export(
    weights: Path = typer.Argument(..., help="Checkpoint (.safetensors) whose metadata carries the recipe."),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torch-export (a .pt2 program)."),
    out: Optional[Path] = typer.Option(None, "--out", help="File to write (default: WEIGHTS with .onnx / .pt2)."),
    size: str = typer.Option("640x640", "--size", help="Example input HxW, multiples of 128 (the fixed size without --dynamic)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Symbolic batch and image size (multiples of 128, at least 256)."),
    batch: int = typer.Option(1, "--batch", help="Fixed batch size (without --dynamic)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17 or later)."),
    no_postprocess: bool = typer.Option(
        False, "--no-postprocess", help="Export the raw per-level head outputs instead of detections."
    ),
    half: bool = typer.Option(False, "--half", help="float16 weights and activations (inputs and outputs stay float32)."),
) -> None:
    """Export a detector to ONNX or torch.export, deformable convolutions in standard ops."""
    from dyhead_cli.commands import export as command

    run_guarded(command.run, weights, fmt, out, size, dynamic, batch, opset, no_postprocess, half)


@app.command()
def visualize(
    images: Optional[list[Path]] = typer.Argument(
        None, help="Images or folders to draw on (default: the --ann / --preds image list)."
    ),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Checkpoint: draw its predictions (or, with --attention, its attention)."
    ),
    preds: Optional[Path] = typer.Option(
        None, "--preds", help="COCO results from 'dyhead predict' to draw (ids via its .images.json, or --ann)."
    ),
    ann: Optional[Path] = typer.Option(
        None, "--ann", help="COCO annotation file: draw its ground truth (side by side with predictions)."
    ),
    images_dir: Optional[Path] = typer.Option(None, "--images", help="With --ann: the folder its file_names are relative to."),
    out: Path = typer.Option(Path("vis"), "--out", help="Folder for the PNGs."),
    score_thr: float = typer.Option(0.3, "--score-thr", help="Draw predictions scoring at least this."),
    size: int = typer.Option(512, "--size", help="Longer side of each drawn image, in pixels."),
    limit: int = typer.Option(0, "--limit", help="Draw at most this many images (0 = all)."),
    device: str = DeviceOpt,
    attention: bool = typer.Option(
        False, "--attention", help="Draw DyHead's scale/spatial attention and feature activity for one image (needs --weights)."
    ),
    point: Optional[str] = typer.Option(
        None, "--point", help="x,y in image pixels for the spatial attention (default: the top detection's centre)."
    ),
    level: str = typer.Option(
        "P3", "--level", help="Pyramid level for the spatial attention and activity maps (P3..P7; P2..P6 for Faster R-CNN)."
    ),
    block: Optional[int] = typer.Option(None, "--block", help="DyHead block (1..N) for the spatial attention (default: all)."),
    recipe: Optional[Path] = RecipeOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Draw predictions / ground truth, or DyHead's attention (--attention)."""
    options = dict(locals(), images=images or [], overrides=overrides or [])  # named as commands.visualize.run takes them
    from dyhead_cli.commands import visualize as command

    run_guarded(command.run, **options)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Reference checkpoint (.pth/.pkl/.safetensors)."),
    dst: Path = typer.Argument(..., help="Our safetensors checkpoint to write."),
    source: str = typer.Option(..., "--from", help="official | mmdet"),
    recipe: Optional[Path] = typer.Option(
        None,
        "--recipe",
        help="Convert into this recipe's model (and keep its data/train/eval) instead of the one read from the checkpoint.",
    ),
    offset_mode: Optional[str] = typer.Option(
        None,
        "--offset-mode",
        help="official | mmdet | aligned: the DyHead offset behaviour the weights were trained with (default: read from the checkpoint).",
    ),
    resnet_style: str = typer.Option(
        "auto",
        "--resnet-style",
        help="auto | caffe | pytorch: where the ResNet's stride sits (caffe: 1x1 conv, BGR input) when the checkpoint does not say.",
    ),
    approximate: bool = typer.Option(
        False,
        "--approximate",
        help="Convert even where our model cannot express the reference architecture (listed); for fine-tuning, not for the published AP.",
    ),
    recipe_out: Optional[Path] = typer.Option(
        None, "--recipe-out", help="Where to write the recipe TOML (default: DST with .toml)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing DST (and its recipe TOML)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Convert an official (detectron2) or MMDetection DyHead checkpoint."""
    from dyhead_cli.commands import convert as command

    run_guarded(command.run, src, dst, source, recipe, offset_mode, resnet_style, approximate, overrides or [], recipe_out, force)


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the built-in recipes (run one with: dyhead train NAME)."""
    if ctx.invoked_subcommand is None:
        from dyhead_cli.commands import recipes as command

        run_guarded(command.list_recipes)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Built-in recipe name, e.g. quickstart.")) -> None:
    """Print a built-in recipe's TOML (dyhead recipes show quickstart > my.toml)."""
    from dyhead_cli.commands import recipes as command

    run_guarded(command.show, name)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write the data set into."),
    num_train: int = typer.Option(200, "--num-train"),
    num_val: int = typer.Option(50, "--num-val"),
    image_size: int = typer.Option(256, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
    colour_by_class: bool = typer.Option(
        False, "--colour-by-class", help="Each class keeps to its own band of hues (as the quickstart's data)."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Write into a non-empty folder that holds no synthetic data set, or replace one made with other settings.",
    ),
) -> None:
    """Write the built-in synthetic COCO-format data set (coloured shapes on textures)."""
    from dyhead_cli.commands import data as command

    run_guarded(command.synth, out, num_train, num_val, image_size, seed, colour_by_class, force)


@data_app.command("check")
def data_check(
    ann: Path = typer.Argument(..., help="COCO annotation JSON."),
    images: Path = typer.Option(..., "--images", help="Folder with the images."),
) -> None:
    """Report missing/corrupt images, bad boxes, empty images and category problems."""
    from dyhead_cli.commands import data as command

    run_guarded(command.check, ann, images)


def main() -> None:  # pragma: no cover - entry point for python -m
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
