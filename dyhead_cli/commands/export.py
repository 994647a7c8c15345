"""``dyhead export WEIGHTS --format onnx|torch-export ...``: a status line while tracing, then one summary line."""

from __future__ import annotations

from pathlib import Path

from dyhead_cli.commands.console import err_console, say
from dyhead_cli.engine.export import ExportOptions, export_model, parse_size


def run(
    weights: Path,
    fmt: str,
    out: Path | None,
    size: str,
    dynamic: bool,
    batch: int,
    opset: int,
    no_postprocess: bool,
    half: bool,
) -> None:
    opts = ExportOptions(
        format=fmt, size=parse_size(size), dynamic=dynamic, batch=batch, opset=opset, postprocess=not no_postprocess, half=half
    )
    opts.check()
    with err_console.status(f"exporting {weights} to {fmt} (tracing takes a while)"):
        summary = export_model(weights, opts, out)
    shape = "dynamic batch and size" if dynamic else f"batch {batch}, {opts.size[0]}x{opts.size[1]}"
    opset_text = f", opset {summary.opset}" if summary.opset is not None else ""
    what = "detections" if opts.postprocess else "raw head outputs"
    say(
        f"exported {weights} -> {summary.out} ({fmt}{opset_text}, {shape}, {what}: {', '.join(summary.outputs[:4])}{'...' if len(summary.outputs) > 4 else ''})"
    )
