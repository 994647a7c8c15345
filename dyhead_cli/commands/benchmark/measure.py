"""``dyhead benchmark``: latency, throughput, memory, parameters and FLOPs of a detector, stage by stage.

What is measured, per model and batch size, on random 0..255 images of exactly the requested size:
- latency of the whole eval forward (normalise -> backbone -> FPN -> DyHead -> head -> post-processing):
  ``warmup`` untimed calls, then ``iters`` timed ones (CUDA events on GPU, ``time.perf_counter`` on CPU);
  p50/p90/p99 (linear interpolation between the sorted times), images/s = batch size / p50;
- the machine: CPU, and with ``--gpu`` the GPU's name, memory, compute capability, NVIDIA driver, CUDA,
  cuDNN and TF32 settings, and torch / torchvision / timm versions;
- peak memory of one call of the warm model: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the
  process's peak RSS (VmHWM, reset first through /proc/self/clear_refs where Linux allows it, else
  ``ru_maxrss`` since the process started), so it includes Python, torch and the weights; with
  ``--compare`` the weights of the other models (held for the interleaved timing) are subtracted;
- a per-stage breakdown: each stage run on its own, on the outputs of the previous ones, with the same
  warm-up and iteration counts; the median of each is reported (their sum is close to, not equal to, p50),
  and the DyHead tower's share of their sum;
- parameters (sum of ``numel``) and FLOPs of one image: ``torch.utils.flop_counter.FlopCounterMode``
  over one fp32 forward of each stage, with torchvision's ``deform_conv2d`` (which it does not know)
  counted by formula, see ``deform_conv_flops``. The DyHead tower is counted with its "reference"
  implementation, so the deformable convs are those torchvision calls and the "fast" path's own GEMMs are
  not counted a second time. As usual for FlopCounterMode, a multiply-add is 2 FLOPs and only matrix
  products and convolutions count (biases, norms, activations and NMS do not).

``--compare`` adds, in the same run, the same detector without DyHead (``dyhead.num_blocks = 0``) and with
the standard 4-conv head towers (``head_options.num_convs = 4``), and torchvision's FCOS-R50-FPN, whose
internal transform is told to keep the input size (min_size/max_size = the benchmark size), so both see
the same pixels; its timed forward includes that transform (normalise, scale factor 1.0, pad to /32).
For a Faster R-CNN model (``head = "faster_rcnn"``) the comparison is the paper's instead: the same
Faster R-CNN without DyHead, ATSS + DyHead on the same backbone (P3..P7, the dense heads' pyramid), and
torchvision's Faster R-CNN-R50-FPN (``fasterrcnn_resnet50_fpn``, same transform settings).
All models are built first; their timed calls are interleaved (each round calls every model once, in
rotating order) so that load from other processes falls on all of them alike; the load average is recorded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dyhead_cli.commands.benchmark.machine import command_line, load_average, machine_info
from dyhead_cli.commands.benchmark.models import build_detector, candidates_for, count_params, weight_bytes
from dyhead_cli.commands.benchmark.report import render_table, to_markdown, write_outputs
from dyhead_cli.commands.benchmark.settings import (
    DEFAULT_ITERS,
    DEFAULT_WARMUP,
    SAMPLING_FLOPS_PER_VALUE,
    Candidate,
    Settings,
    Timing,
    check_settings,
    model_config_from,
    parse_batch_sizes,
    parse_size,
    resolve_device,
)
from dyhead_cli.commands.benchmark.timing import (
    count_flops,
    forward_fn,
    level_shapes,
    make_inputs,
    measure,
    measure_interleaved,
    peak_memory_of,
    prepare,
    stage_breakdown,
    stage_flops,
    tower_share,
)
from dyhead_cli.engine.paths import check_output_file
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import ModelConfig

# ----------------------------------------------------------------------------------------------------
# the run


@dataclass
class Loaded:
    """A candidate built, described (parameters, FLOPs, levels) and prepared for timing."""

    c: Candidate
    model: nn.Module
    info: dict[str, Any]


def load_candidate(c: Candidate, s: Settings, log: Callable[[str], None]) -> Loaded:
    torch.manual_seed(s.seed)
    model = c.build().to(s.device)
    log(f"{c.name}: counting FLOPs")
    info = {
        "name": c.name,
        "params": count_params(model),
        "weights_bytes": weight_bytes(model),
        "flops_per_image": stage_flops(model, c, s.size, s.device),
        "config": c.config,
    }
    if c.ours:
        info["levels"] = level_shapes(model, s.size, s.device)
    return Loaded(c, prepare(model, c, s), info)


def measure_batch(
    loaded: list[Loaded], batch: int, s: Settings, log: Callable[[str], None], onnx: tuple | None = None
) -> list[dict]:
    """One batch size: warm every model up, its peak memory alone, the timed calls interleaved, then the
    stages of the dyhead models, interleaved too."""
    images, image_sizes = make_inputs(batch, s.size, s.device, s.channels_last, s.seed)
    calls = {x.c.key: forward_fn(x.model, x.c, images, image_sizes, s) for x in loaded}
    if onnx is not None:  # the exported model under onnxruntime, timed interleaved with the others
        from dyhead_cli.commands.benchmark.onnx import onnx_call

        calls["onnx"] = onnx_call(onnx[0], images, image_sizes, s.device)
        log(f"{onnx[1]['name']}: batch {batch}, {s.warmup + 1} warm-up calls")
        for _ in range(s.warmup + 1):
            calls["onnx"]()
    memory, memory_reserved = {}, {}
    for x in loaded:
        log(f"{x.c.name}: batch {batch}, {s.warmup} warm-up calls")
        first_call(calls[x.c.key], x.c.name, s)
        for _ in range(s.warmup):
            calls[x.c.key]()
        others = sum(y.info["weights_bytes"] for y in loaded if y is not x)
        memory[x.c.key] = peak_memory_of(calls[x.c.key], s.device, others)
        if s.device == "cuda":
            memory_reserved[x.c.key] = torch.cuda.max_memory_reserved()
    log(f"batch {batch}: {s.iters} timed calls{' of each model, interleaved' if len(loaded) > 1 else ''}")
    timings = measure_interleaved(calls, s.iters, s.device)
    ours = {x.c.key: x.model for x in loaded if x.c.ours}
    if ours:
        log(
            f"batch {batch}: stages of {', '.join(x.c.name for x in loaded if x.c.ours)}{', interleaved' if len(ours) > 1 else ''}"
        )
        stages = stage_breakdown(ours, images, image_sizes, s)
    rows = []
    for x in loaded:
        timing, (peak, peak_kind) = timings[x.c.key], memory[x.c.key]
        row = {
            "model": x.c.name,
            "key": x.c.key,
            "batch_size": batch,
            "latency_ms": timing.to_ms(),
            "times_ms": [t * 1e3 for t in timing.times_s],
            "images_per_s": batch / timing.p50,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
        }
        if s.device == "cuda":
            row["peak_memory_reserved_bytes"] = memory_reserved[x.c.key]
        if x.c.ours:
            row["stages_ms"] = {n: t.p50 * 1e3 for n, t in stages[x.c.key].items()}
            row["dyhead_share"] = tower_share(row["stages_ms"])
        rows.append(row)
    if onnx is not None:
        timing = timings["onnx"]
        rows.append(
            {
                "model": onnx[1]["name"],
                "key": "onnx",
                "batch_size": batch,
                "latency_ms": timing.to_ms(),
                "times_ms": [t * 1e3 for t in timing.times_s],
                "images_per_s": batch / timing.p50,
                "peak_memory_bytes": 0,
                "peak_memory_kind": "not measured",
            }
        )
    return rows


def optional_modes(s: Settings) -> list[str]:
    """The options that not every model or machine supports."""
    modes = [f"--precision {s.precision}"] if s.precision != "fp32" else []
    return modes + (["--compile"] if s.compile else [])


def first_call(call: Callable[[], Any], name: str, s: Settings) -> None:
    """Run once (the first call of a compiled model compiles it); a failure under an optional mode
    (fp16/bf16, --compile) becomes one line, since it means "not supported here", not a bug."""
    modes = optional_modes(s)
    if not modes:
        call()
        return
    try:
        call()
    except Exception as e:  # noqa: BLE001 - backend and kernel errors of any type
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise DyheadError(f"{name} cannot run with {' '.join(modes)} on {s.device}: {type(e).__name__}: {first}") from None


def ratios(rows: list[dict]) -> list[dict]:
    """p50 of the DyHead model over each compared model's, per batch size."""
    out = []
    for main in (r for r in rows if r["key"] == "dyhead"):
        for other in (r for r in rows if r["key"] != "dyhead" and r["batch_size"] == main["batch_size"]):
            a, b = main["latency_ms"]["p50"], other["latency_ms"]["p50"]
            out.append(
                {
                    "batch_size": main["batch_size"],
                    "model": main["model"],
                    "vs": other["model"],
                    "ratio_p50": a / b,
                    "difference_ms": a - b,
                }
            )
    return out


def tower_ratios(rows: list[dict]) -> list[dict]:
    """Per batch size, the DyHead model's DyHead stage over the head stage of the same model without DyHead
    (``--compare``: the DyHead tower against the standard 4-conv head towers and predictors), from the stage
    medians, which are timed interleaved."""
    out = []
    for main in (r for r in rows if r["key"] == "dyhead" and "stages_ms" in r):
        for other in (r for r in rows if r["key"] == "no_dyhead" and r["batch_size"] == main["batch_size"]):
            a, b = main["stages_ms"]["dyhead"], other["stages_ms"]["head"]
            out.append({"batch_size": main["batch_size"], "model": main["model"], "vs": other["model"], "ratio_p50": a / b})
    return out


def run_benchmark(cfg: ModelConfig, source: str, s: Settings, log: Callable[[str], None] = lambda m: None) -> dict:
    """Measure the model (and the comparison models) and return the report (see ``to_markdown``)."""
    check_settings(s)
    s = dataclasses.replace(
        s, iters=s.iters or DEFAULT_ITERS[s.device], warmup=DEFAULT_WARMUP[s.device] if s.warmup is None else s.warmup
    )
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    onnx = None
    if s.onnx is not None:  # first: a file of another model is refused before anything is measured
        from dyhead_cli.commands.benchmark.onnx import check_same_model, load_onnx

        onnx = load_onnx(s.onnx, torch.get_num_threads())
        check_same_model(cfg, source, onnx[0])
    machine_start = machine_info(s.device)
    busy = busy_warning(machine_start)
    if busy:
        log(busy)
    loaded = [load_candidate(c, s, log) for c in candidates_for(cfg, s)]
    rows = [row for batch in s.batch_sizes for row in measure_batch(loaded, batch, s, log, onnx)]
    models = {x.c.key: x.info for x in loaded} | ({"onnx": onnx[1]} if onnx is not None else {})
    settings = dataclasses.asdict(s)
    settings.update(
        size=list(s.size),
        onnx=None if s.onnx is None else str(s.onnx),
        threads=torch.get_num_threads(),
        impl=cfg.dyhead.impl if s.impl is None else s.impl,
        source=source,
        images="random 0..255, exactly HxW, no padding",
        timer="CUDA events" if s.device == "cuda" else "time.perf_counter",
    )
    machine = machine_start | {"load_average_end": load_average()}
    return {
        "command": command_line(),
        "machine": machine,
        "settings": settings,
        "models": models,
        "results": rows,
        "ratios": ratios(rows),
        "tower_ratios": tower_ratios(rows),
        "notes": notes(s) + ([busy] if busy else []),
    }


def busy_warning(machine: dict[str, Any]) -> str | None:
    """A warning when other processes already keep the CPU cores busy (CPU timings will be noisy)."""
    load, cores = machine.get("load_average_start"), machine.get("cpu_cores_usable") or 1
    if not load or load[0] <= 0.5 * cores:
        return None
    return (
        f"warning: the machine is busy (1-minute load average {load[0]} on {cores} cores): CPU timings will be noisy "
        "and slower; compare only models measured in the same run"
    )


def notes(s: Settings) -> list[str]:
    out = [
        "latency: whole eval forward incl. post-processing; p50/p90/p99 over the timed calls; images/s = batch / p50",
        "stages: each run alone on the previous stage's outputs, median of the timed calls (backbone includes normalisation); "
        "with several dyhead models, each round times every stage of every model once, like the whole-model calls",
        "FLOPs: one fp32 image, FlopCounterMode (multiply-add = 2), DyHead counted with its reference implementation; "
        "deform_conv2d by formula 2*C_in*9*C_out*H_out*W_out + 8*9*C_in*H_out*W_out (bilinear sampling with mask)",
        "DyHead share: the DyHead stage's median over the sum of the stage medians",
        "peak memory: during one call of the warm model, "
        + ("CUDA max memory allocated" if s.device == "cuda" else "process peak RSS (includes Python and torch)")
        + ("; the other compared models' weights are subtracted" if s.compare else ""),
        "timed calls: with several models, each round times every model once (rotating the order), so load from other "
        "processes hits them alike",
    ]
    if s.compare:
        out.append(
            "no DyHead: the same detector with dyhead.num_blocks = 0 and head_options.num_convs = 4 "
            "(the standard 3x3 conv + GroupNorm + ReLU head towers)"
        )
        out.append(
            f"torchvision FCOS: transform min_size={min(s.size)}, max_size={max(s.size)} so the {s.size[0]}x{s.size[1]} "
            "input is not rescaled (scale 1.0); its forward also normalises and pads to a multiple of 32"
        )
    return out


def benchmark_from_cli(
    recipe: Path | None = None,
    model: str | None = None,
    gpu: bool = False,
    batch_sizes: str = "1",
    size: str = "800x1333",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    iters: int | None = None,
    warmup: int | None = None,
    json_out: Path | None = None,
    markdown_out: Path | None = None,
    compare: bool = False,
    impl: str | None = None,
    threads: int | None = None,
    onnx: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Parse the options, run, write --json/--markdown; returns the report for the CLI to print."""
    settings = Settings(
        device=resolve_device(gpu),
        size=parse_size(size),
        batch_sizes=parse_batch_sizes(batch_sizes),
        precision=precision,
        channels_last=channels_last,
        compile=compile,
        iters=iters,
        warmup=warmup,
        impl=impl,
        threads=threads,
        compare=compare,
        onnx=onnx,
    )
    check_settings(settings)
    inputs = [("--recipe", recipe)]
    if json_out is not None:  # checked before any timing: never an input, a folder, or another kind of file
        json_out = check_output_file(json_out, "--json", inputs, suffixes=(".json",))
    if markdown_out is not None:
        markdown_out = check_output_file(markdown_out, "--markdown", inputs, suffixes=(".md", ".markdown"))
    cfg, source = model_config_from(recipe, model)
    report = run_benchmark(cfg, source, settings, log)
    write_outputs(report, json_out, markdown_out)
    return report


# what tests and scripts import from here (the names live in the modules beside this one)
__all__ = [
    "SAMPLING_FLOPS_PER_VALUE",
    "Settings",
    "Timing",
    "benchmark_from_cli",
    "build_detector",
    "count_flops",
    "first_call",
    "measure",
    "measure_interleaved",
    "parse_batch_sizes",
    "parse_size",
    "render_table",
    "run_benchmark",
    "to_markdown",
]
