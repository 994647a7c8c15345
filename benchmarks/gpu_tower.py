"""Time the DyHead tower's implementations on CUDA: torchvision's op per conv vs the fused Triton conv and others.

    python benchmarks/gpu_tower.py --json tower.json                # H100: 6 blocks x 256 ch, 800x1333, ~1 min
    python benchmarks/gpu_tower.py --device cpu --small --json t.json   # a smoke test of this script on CPU
    python benchmarks/gpu_tower.py --compile --precisions bf16 --batches 8 --json c.json   # + torch.compile
    python benchmarks/gpu_tower.py --sweep --json s.json   # + the fused kernel's tile configurations

Why: the "fast" DyHead path (``DyHeadBlock.forward_fast``, models/deform.py) is dispatched on CPU only;
this measures whether it should also be on CUDA, and in which form. The tower sees the P3..P7 maps of an
HxW image (strides 8..128, each level ceil(previous / 2)), batch 1 and 8, under fp32 and under bf16 /
fp16 autocast. Variants:

  reference         ``DyHeadBlock.forward`` with impl "reference": torchvision ``deform_conv2d`` per conv
                    (float32 under autocast: torchvision's autocast rule);
  fused             impl "fast" without autograd, CUDA graphs off: one Triton kernel per deformable conv,
                    bilinear sampling inside the GEMM (models/deform_triton.py), in the autocast dtype;
  fused-graph       the same through ``DyHead``'s own CUDA-graph cache;
  fused-folded(-graph)  fused with the block's end folded into two Triton passes per conv output
                    (``dyhead_cuda.EPILOGUE = "folded"``, models/fold_triton.py);
  fused-inline(-graph)  the same with the "high" map upsampled inside those passes (EPILOGUE "inline", the
                    default: fused-inline-graph is what ``dyhead predict/benchmark`` run);
                    "fused" alone runs the GroupNorm modules' end (EPILOGUE "modules");
  sampled           one grid_sample + one GEMM per conv (``deform_conv2d_sampled``, the autograd path from
                    batch 8);
  fast              ``forward_fast`` on each block: one sampling table per block, per conv one
                    ``embedding_bag`` gather of all (positions*9, C) columns and one batched GEMM, float32;
  fast-cl           fast with ``fast_channels_last``: conv outputs channels-last (a GEMM without transpose;
                    GroupNorm on CUDA copies them back to NCHW);
  fast-lowp         fast with ``fast_low_precision``: gather + GEMM in the autocast dtype (bf16/fp16 only);
  fast-tf32         fast in fp32 with TF32 matmuls allowed (what ``torch.set_float32_matmul_precision("high")``
                    gives; fp32 only);
  <v>-graph         <v> captured once in a CUDA graph and replayed (no launch overhead; CUDA only);
  <v>-compile       ``torch.compile`` of the tower running <v> (with --compile; compiling takes a while).

Timing: ``--warmup`` untimed calls, then CUDA-event timed calls until ``--iters`` or ``--budget-s`` seconds
(at least 5); median / p90 / min in ms, images/s = batch / median, peak CUDA memory of one call. Exit 1 when
a variant fails, except the optional -graph and -compile ones (their errors are in the report). Accuracy:
every variant's outputs against the reference's in float32 with TF32 off (``fp32_strict``), and every timed
configuration's outputs against that strict float32 reference of the same batch (the error of the
precision). Offset convs get N(0, 0.02) weights so sampling really moves off the grid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from dyhead_cli.models import deform_triton, dyhead_cuda
from dyhead_cli.models.dyhead import DyHead

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tower_choice.py beside this script
from tower_choice import fused_epilogue  # noqa: E402  (the variant -> block end naming, defined there)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# (fast, fast-lowp, fast-cl and fast-tf32: slower than sampled on an H100, still selectable by --variants)
FUSED = ("fused", "fused-folded", "fused-inline")  # one per block end: fused_epilogue() names it
BASE_VARIANTS = ("reference", "sampled", *(f"{v}{g}" for v in FUSED for g in ("", "-graph")))
# the (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, method) tried by --sweep, per precision, the current default
# first (deform_triton.CONFIG / METHOD; "columns" reads BLOCK_K as its channels per program and ignores
# BLOCK_N and stages); batch 8 first, where the tower's time is
SWEEP = {
    "bf16": [
        (64, 256, 64, 8, 2, "taps"),
        (64, 256, 64, 8, 3, "flat"),
        (64, 128, 64, 4, 3, "flat"),
        (64, 256, 32, 8, 3, "flat"),
        (64, 256, 64, 4, 1, "columns"),
        (128, 256, 128, 8, 1, "columns"),
        (128, 128, 64, 8, 3, "flat"),
        (64, 128, 64, 4, 2, "taps"),
    ],
    "fp32": [
        (32, 128, 32, 4, 2, "taps"),
        (32, 128, 32, 4, 3, "flat"),
        (64, 128, 32, 4, 3, "flat"),
        (64, 128, 64, 4, 1, "columns"),
    ],
}
Features = list[Tensor]


def level_sizes(height: int, width: int, levels: int = 5) -> list[tuple[int, int]]:
    """P3..P7 sizes of an HxW input: ceil(H/8), then ceil(previous / 2) per level (stride-2 convs)."""
    h, w = -(-height // 8), -(-width // 8)
    sizes = []
    for _ in range(levels):
        sizes.append((h, w))
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return sizes


def build_tower(channels: int, blocks: int, mode: str, device: str, seed: int = 0) -> DyHead:
    torch.manual_seed(seed)
    tower = DyHead(channels, blocks, offset_mode=mode).eval()
    for block in tower.blocks:  # move sampling off the grid, as trained weights do
        torch.nn.init.normal_(block.offset.weight, 0.0, 0.02)
    return tower.to(device)


def make_features(batch: int, channels: int, sizes: list[tuple[int, int]], device: str, seed: int = 1) -> Features:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g).to(device) for h, w in sizes]


@contextlib.contextmanager
def strict_fp32(device: str):
    """TF32 off for cuDNN convs and matmuls (restored after): float32 results to float32 rounding."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def tf32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def tower_call(
    tower: DyHead, variant: str, device: str, dtype: torch.dtype | None, cache: bool = True
) -> Callable[[Features], Features]:
    """features -> outputs, running ``tower`` as the base variant says, under inference mode and autocast."""
    low = variant == "fast-lowp"
    fast = variant.startswith("fast")
    channels_last = variant == "fast-cl"
    fused = variant.startswith("fused")
    # "sampled": impl "fast" through forward with the fused convs off, which off CPU is one grid_sample + one
    # GEMM per conv from batch 8 (models/deform_export.deform_conv2d_sampled); "export": the same ops, float32
    impl = {"sampled": "fast", "export": "export"}.get(variant, "fast" if fast or fused else "reference")
    # set up once here, not per call: set_impl drops the tower's CUDA graphs
    # "sampled" at every batch size, "fused" at every batch size (float32 from batch 8 would take grid_sample)
    dyhead_cuda.SAMPLED_MIN_BATCH = 1 if variant == "sampled" else (1 << 30 if fused else 8)
    dyhead_cuda.EPILOGUE = fused_epilogue(variant) if fused else "modules"
    tower.set_impl(impl)
    tower.cuda_graphs = fused and variant.endswith("-graph")  # fused-graph, fused-folded-graph: the tower's own graphs
    for block in tower.blocks:
        block.fast_fused = fused
        block.fast_low_precision = low
        block.fast_channels_last = channels_last

    def run(feats: Features) -> Features:
        tf32 = tf32_matmuls() if variant == "fast-tf32" else contextlib.nullcontext()
        with tf32, torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=cache):
            if not fast:
                return tower(feats)
            for block in tower.blocks:  # forward_fast directly: forward dispatches it on CPU only
                feats = block.forward_fast(feats)
            return feats

    return run


def graphed(fn: Callable[[Features], Features], feats: Features) -> Callable[[], Features]:
    """``fn(feats)`` captured in a CUDA graph (after warm-up on a side stream); returns a replay call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(feats)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(feats)

    def replay() -> Features:
        graph.replay()
        return outs

    return replay


def time_once(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(milliseconds, result) of one call: CUDA events on GPU, perf_counter on CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def measure(fn: Callable[[], Any], device: str, warmup: int, iters: int, budget_s: float) -> tuple[list[float], Any, int]:
    """Warm-up, then timed calls until ``iters`` or ``budget_s`` (at least 5); (times ms, last output, peak bytes)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, out, t0 = [], None, time.perf_counter()
    while len(times) < iters and (len(times) < 5 or time.perf_counter() - t0 < budget_s):
        ms, out = time_once(fn, device)
        times.append(ms)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return times, out, peak


def max_abs_diff(a: Features, b: Features) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def machine(device: str) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        **deform_triton.describe(),
        "dyhead_epilogue": dyhead_cuda.EPILOGUE,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    else:
        info["threads"] = torch.get_num_threads()
    return info


def variant_names(precision: str, device: str, graphs: bool, compile_: bool) -> list[str]:
    """The variants to time; on CPU only those that differ there (torchvision's CPU op has no autocast rule)."""
    if device == "cpu":
        names = ["reference", "fast"] if precision == "fp32" else ["fast"]
        return names + (["fast-compile"] if compile_ else [])
    names = [v for v in BASE_VARIANTS if graphs or not v.endswith("-graph")]
    if graphs:
        # torchvision's op under CUDA-graph capture gave wrong outputs on an H100 (max diff 1.4): not graphed
        names.append("sampled-graph")
    if compile_:
        names += [f"{v}-compile" for v in ("reference", "fast")]
    return names


def run_variant(tower: DyHead, name: str, feats: Features, args, dtype: torch.dtype | None) -> Callable[[], Features]:
    """A no-argument call for variant ``name`` (built, captured or compiled here)."""
    base = name.removesuffix("-graph").removesuffix("-compile")
    if name.endswith("-graph") and not base.startswith("fused"):  # fused*-graph: the tower's own graph cache
        with torch.inference_mode():
            return graphed(tower_call(tower, base, args.device, dtype, cache=False), feats)
    if name.endswith("-compile"):
        compiled = torch.compile(tower_call(tower, base, args.device, dtype))
        return lambda: compiled(feats)
    fn = tower_call(tower, name, args.device, dtype)
    return lambda: fn(feats)


def time_variant(
    tower: DyHead, name: str, feats: Features, args, precision: str, batch: int, reference: Features, report: dict, ref_ms
) -> dict[str, Any] | None:
    """Time one variant, append its row (or its error) to ``report`` and print it; the row, None on failure."""
    where = f"{precision} batch {batch} {name}"
    own_graphs = name.startswith("fused") and name.split(" ")[0].endswith("-graph")  # the tower's graph cache
    try:
        tower.graphs.disabled = False  # an earlier variant's failed capture must not make this one eager
        replays = tower.graphs.replays
        with torch.inference_mode():
            fn = run_variant(tower, name.split(" ")[0], feats, args, PRECISIONS[precision])
            times, out, peak = measure(fn, args.device, args.warmup, args.iters, args.budget_s)
            diff = max_abs_diff(out, reference)
        if name.startswith("fused") and deform_triton.unavailable_reason is not None:  # torchvision's op ran
            raise RuntimeError(f"the fused kernel failed, so torchvision's op ran: {deform_triton.unavailable_reason}")
        if own_graphs and args.device == "cuda" and tower.graphs.replays == replays:
            raise RuntimeError("its CUDA graph was never replayed (capture failed?): timed eagerly, not reported")
    except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        report["errors"].append(f"{where}: {type(e).__name__}: {first[:300]}")
        print(f"{where}: FAILED {type(e).__name__}: {first[:200]}", flush=True)
        return None
    median = statistics.median(times)
    srt = sorted(times)
    row = {
        "precision": precision,
        "batch": batch,
        "variant": name,
        "median_ms": median,
        "p90_ms": srt[min(len(srt) - 1, round(0.9 * (len(srt) - 1)))],
        "min_ms": srt[0],
        "calls": len(times),
        "images_per_s": batch / median * 1e3,
        "peak_memory_mb": peak / 2**20,
        "speedup_vs_reference": (ref_ms / median) if ref_ms and name != "reference" else (1.0 if name == "reference" else None),
        "max_abs_diff_vs_fp32_strict_reference": diff,
    }
    report["results"].append(row)
    print(
        f"{precision:>4} b{batch:<2} {name:<34} median {median:8.2f} ms  p90 {row['p90_ms']:8.2f}  "
        f"{row['images_per_s']:7.1f} img/s  peak {row['peak_memory_mb']:7.0f} MB  "
        f"x{row['speedup_vs_reference'] or float('nan'):5.2f} vs ref  diff {diff:.1e}",
        flush=True,
    )
    return row


def profile_fused(tower, args, batches, precisions, sizes, rows: int = 20) -> list[dict[str, Any]]:
    """Where the fused tower's GPU time goes, with each block end (``FUSED``): torch.profiler
    over 3 eager calls per (variant, precision, batch) after a warm-up, the ``rows`` kernels with the most CUDA
    time (ms per tower call, calls per tower call, share)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    runs = [(v, q, b) for v in FUSED for q in precisions for b in batches]
    for variant, precision, batch in runs:
        feats = make_features(batch, args.channels, sizes, args.device)
        with torch.inference_mode():
            fn = tower_call(tower, variant, args.device, PRECISIONS[precision])
            fn(feats)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn(feats)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        total = sum(getattr(e, key) for e in events) or 1.0
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
        kernels = [
            {
                "name": e.key[:120],
                "ms_per_call": getattr(e, key) / 3e3,
                "calls": e.count / 3,
                "share": getattr(e, key) / total,
            }
            for e in top
        ]
        out.append(
            {"variant": variant, "precision": precision, "batch": batch, "gpu_ms_per_call": total / 3e3, "kernels": kernels}
        )
        print(f"profile {variant} {precision} b{batch}: {total / 3e3:.2f} ms of GPU time per tower call", flush=True)
        for k in kernels[:8]:
            print(f"  {k['ms_per_call']:7.2f} ms  {k['share']:5.1%}  x{k['calls']:<5.0f} {k['name'][:90]}", flush=True)
        del feats
    return out


def sweep(tower, args, batches, precisions, sizes, references, report, start) -> None:
    """fused-graph under each kernel configuration of SWEEP (rows named "fused-graph (BM, BN, BK, warps,
    stages, method)"); the module's configuration is restored afterwards."""
    for precision in sorted((q for q in precisions if q in SWEEP), key=lambda q: q != "bf16"):  # bf16: the goal
        dtype = PRECISIONS[precision] or torch.float32
        default, default_loop = deform_triton.CONFIG[dtype], deform_triton.METHOD[dtype]
        single = deform_triton.SINGLE[dtype]
        deform_triton.SINGLE[dtype] = None  # each candidate at batch 1 too
        try:
            for batch in sorted(batches, reverse=True):
                feats = make_features(batch, args.channels, sizes, args.device)
                for config in SWEEP[precision]:
                    if time.perf_counter() - start > args.max_seconds:
                        report["skipped"].append(f"sweep {precision} b{batch} {config}")
                        continue
                    deform_triton.CONFIG[dtype], deform_triton.METHOD[dtype] = config[:5], config[5]
                    name = "fused-graph " + "(" + ", ".join(map(str, config)) + ")"
                    errors = len(report["errors"])
                    time_variant(tower, name, feats, args, precision, batch, references[batch], report, None)
                    deform_triton.unavailable_reason = None  # a configuration that failed to build: try the next
                    for i in range(errors, len(report["errors"])):
                        report["errors"][i] += " (not fatal)"  # a candidate, not the default
                del feats
        finally:
            deform_triton.CONFIG[dtype], deform_triton.METHOD[dtype] = default, default_loop
            deform_triton.SINGLE[dtype] = single


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="2 blocks x 64 ch at 128x160, batches 1,2 (a quick check)")
    p.add_argument("--size", default="800x1333", help="input HxW; the tower sees its P3..P7 sizes")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--mode", default="official", choices=("official", "mmdet", "aligned"))
    p.add_argument("--iters", type=int, default=25, help="timed calls per variant at most")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=1.0, help="stop timing a variant after this (>= 5 calls)")
    p.add_argument("--max-seconds", type=float, default=85.0, help="skip what is left after this many seconds")
    p.add_argument("--no-graphs", action="store_true", help="leave out the CUDA-graph variants")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants (slow to compile)")
    p.add_argument("--variants", default="", help="comma-separated variants to time (default: all that apply)")
    p.add_argument("--sweep", action="store_true", help="time fused-graph under each tile configuration of SWEEP")
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler of the fused tower (eager) at each batch: kernels by GPU time"
    )
    p.add_argument("--profile-precisions", default="bf16", help="the precisions --profile looks at (of --precisions)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_tower: no CUDA device here; use --device cpu for a smoke test")
        return 2
    if args.small:
        args.size, args.blocks, args.channels = "128x160", 2, 64
        if args.batches == "1,8":
            args.batches = "1,2"
    if args.device == "cpu" and args.precisions == "fp32,bf16,fp16":
        args.precisions = "fp32,bf16"
    height, width = (int(v) for v in args.size.lower().split("x"))
    sizes = level_sizes(height, width)
    batches = [int(b) for b in args.batches.split(",")]
    precisions = [q.strip() for q in args.precisions.split(",") if q.strip()]
    start = time.perf_counter()
    tower = build_tower(args.channels, args.blocks, args.mode, args.device)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": machine(args.device),
        "settings": {
            "device": args.device,
            "size": [height, width],
            "levels": [list(s) for s in sizes],
            "blocks": args.blocks,
            "channels": args.channels,
            "offset_mode": args.mode,
            "batches": batches,
            "precisions": precisions,
            "warmup": args.warmup,
            "iters": args.iters,
            "budget_s": args.budget_s,
        },
        "fp32_strict": {},
        "results": [],
        "errors": [],
        "skipped": [],
    }
    print(
        f"DyHead tower {args.blocks} x {args.channels} ch on {report['machine'].get('gpu', args.device)}, levels "
        f"{' '.join(f'{h}x{w}' for h, w in sizes)} ({height}x{width}), offset mode {args.mode}",
        flush=True,
    )

    references: dict[int, Features] = {}  # per batch: the reference in float32 with TF32 off
    with torch.inference_mode(), strict_fp32(args.device):
        for batch in sorted({1, *batches}):
            feats = make_features(batch, args.channels, sizes, args.device)
            references[batch] = tower_call(tower, "reference", args.device, None)(feats)
        feats = make_features(1, args.channels, sizes, args.device)
        scale = max(r.abs().max().item() for r in references[1])
        for name in (*FUSED, "sampled") if args.device == "cuda" else ("fast",):
            try:  # a path that fails here is reported and left out (tower_choice then never picks it)
                out = tower_call(tower, name, args.device, None)(feats)
                if name.startswith("fused") and deform_triton.unavailable_reason is not None:
                    raise RuntimeError(f"the fused kernel failed: {deform_triton.unavailable_reason}")
            except Exception as e:  # noqa: BLE001 - one failing path must not lose the whole report
                first = next((line for line in str(e).splitlines() if line.strip()), "")
                report["errors"].append(f"fp32 strict check {name}: {type(e).__name__}: {first[:300]}")
                print(f"fp32 strict check {name}: FAILED {type(e).__name__}: {first[:200]}", flush=True)
                deform_triton.unavailable_reason = None
                continue
            report["fp32_strict"][name] = {
                "batch": 1,
                "max_abs_diff_vs_reference": max_abs_diff(out, references[1]),
                "max_abs_reference": scale,
            }
    for name, acc in report["fp32_strict"].items():
        print(
            f"fp32, TF32 off, batch 1: {name} vs reference max abs diff {acc['max_abs_diff_vs_reference']:.2e} "
            f"(largest |output| {acc['max_abs_reference']:.2f})",
            flush=True,
        )

    for precision in precisions:
        for batch in batches:
            feats = make_features(batch, args.channels, sizes, args.device)
            ref_ms = None
            wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
            for name in variant_names(precision, args.device, not args.no_graphs, args.compile):
                if wanted and name not in wanted:
                    continue
                where = f"{precision} batch {batch} {name}"
                if time.perf_counter() - start > args.max_seconds:
                    report["skipped"].append(where)
                    continue
                row = time_variant(tower, name, feats, args, precision, batch, references[batch], report, ref_ms)
                if row is not None and name == "reference":
                    ref_ms = row["median_ms"]
            del feats
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.sweep and args.device == "cuda":
        sweep(tower, args, batches, precisions, sizes, references, report, start)
    if args.profile and args.device == "cuda":
        try:
            wanted = [q for q in args.profile_precisions.split(",") if q in precisions]
            report["profile"] = profile_fused(tower, args, batches, wanted, sizes)
        except Exception as e:  # noqa: BLE001 - a diagnostic: its failure must not hide the timings
            report["errors"].append(f"profile: {type(e).__name__}: {str(e)[:300]} (not fatal)")
    report["seconds"] = round(time.perf_counter() - start, 1)
    best = {}
    for r in report["results"]:
        key = (r["precision"], r["batch"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    report["fastest"] = [
        {
            "precision": k[0],
            "batch": k[1],
            "variant": r["variant"],
            "median_ms": r["median_ms"],
            "speedup_vs_reference": r["speedup_vs_reference"],
        }
        for k, r in best.items()
    ]
    for b in report["fastest"]:
        print(
            f"fastest {b['precision']} b{b['batch']}: {b['variant']} {b['median_ms']:.2f} ms "
            f"(x{b['speedup_vs_reference'] or float('nan'):.2f} vs reference)"
        )
    if report["skipped"]:
        print(f"skipped after {args.max_seconds:.0f} s: {', '.join(report['skipped'])}")
    print(f"gpu_tower: {report['seconds']} s, {len(report['errors'])} errors")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    # graph capture and compilation are optional ways of running: their failures are reported, not fatal
    essential = [e for e in report["errors"] if not any(f"-{x}:" in e for x in ("graph", "compile")) and "(not fatal)" not in e]
    return 1 if essential else 0


if __name__ == "__main__":
    sys.exit(main())
