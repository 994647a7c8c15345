"""Timing, memory and FLOPs of one model: warm-up, CUDA events or perf_counter, per-stage breakdowns."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dyhead_cli.commands.benchmark.settings import PRECISIONS, SAMPLING_FLOPS_PER_VALUE, Candidate, Settings, Timing

# ----------------------------------------------------------------------------------------------------
# running


def make_inputs(batch: int, size: tuple[int, int], device: str, channels_last: bool, seed: int = 0) -> tuple[Tensor, list]:
    """Random (B, 3, H, W) 0..255 images and their sizes."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, 3, *size, generator=g) * 255).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, [tuple(size)] * batch


@contextlib.contextmanager
def run_context(s: Settings) -> Iterator[None]:
    """inference_mode, plus autocast for fp16/bf16."""
    dtype = PRECISIONS[s.precision]
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(s.device, dtype=dtype):
                yield


def prepare(model: nn.Module, c: Candidate, s: Settings) -> nn.Module:
    """Move to the device, set the memory format, compile the stages (post-processing stays eager)."""
    model = model.to(s.device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if s.compile:
        parts = ("backbone", "fpn", "dyhead", "head") if c.ours else ("backbone", "head")
        for name in parts:
            getattr(model, name).compile()
    return model


def forward_fn(model: nn.Module, c: Candidate, images: Tensor, image_sizes: list, s: Settings) -> Callable[[], Any]:
    """One whole eval forward on the given batch, as a no-argument call."""
    if c.ours:

        def call():
            with run_context(s):
                return model(images, image_sizes)
    else:
        image_list = list(images / 255.0)  # torchvision detectors take a list of 0..1 images

        def call():
            with run_context(s):
                return model(image_list)

    return call


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call takes: CUDA events on GPU, ``time.perf_counter`` around a synchronised call otherwise."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], warmup: int, iters: int, device: str) -> Timing:
    """``warmup`` untimed calls, then ``iters`` timed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return Timing([time_call(fn, device) for _ in range(iters)])


def measure_interleaved(fns: dict[str, Callable[[], Any]], iters: int, device: str) -> dict[str, Timing]:
    """``iters`` rounds, each timing every (warm) function once, starting one further along each round,
    so that load from other processes falls on all of them alike."""
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(iters):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            times[k].append(time_call(fns[k], device))
    return {k: Timing(t) for k, t in times.items()}


def stage_functions(model: nn.Module, images: Tensor, image_sizes: list, s: Settings) -> dict[str, Callable[[], Any]]:
    """Each stage of a dyhead ``Detector`` as a call on the previous stage's outputs (computed once here)."""
    with run_context(s):
        c_feats = model.backbone(model.normalize(images))
        p_feats = model.fpn(c_feats)
        d_feats = model.dyhead(p_feats)
        outputs = model.head(d_feats)
    calls = {
        "backbone": lambda: model.backbone(model.normalize(images)),
        "fpn": lambda: model.fpn(c_feats),
        "dyhead": lambda: model.dyhead(p_feats),
        "head": lambda: model.head(d_feats),
        "postprocess": lambda: model.head.postprocess(outputs, image_sizes),
    }

    def in_context(fn):
        def call():
            with run_context(s):
                return fn()

        return call

    return {name: in_context(fn) for name, fn in calls.items()}


def stage_breakdown(models: dict[str, nn.Module], images: Tensor, image_sizes: list, s: Settings) -> dict[str, dict[str, Timing]]:
    """Timings of backbone, FPN, DyHead, head and post-processing of each dyhead model (by key), each stage
    run on its own: warmed up, then every stage of every model timed once per round, interleaved like the
    whole-model calls, so that a ratio between two models' stages (the DyHead tower against the 4-conv head
    towers) sees the same load from other processes."""
    fns = {
        (key, name): fn for key, model in models.items() for name, fn in stage_functions(model, images, image_sizes, s).items()
    }
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    synchronize(s.device)
    timed = measure_interleaved(fns, s.iters, s.device)
    return {key: {name: t for (k, name), t in timed.items() if k == key} for key in models}


# ----------------------------------------------------------------------------------------------------
# memory


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what they are): CUDA max allocated, or the process's peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "CUDA max memory allocated"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process peak RSS (VmHWM) during one call"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS since start (ru_maxrss)"


def peak_memory_of(call: Callable[[], Any], device: str, others_bytes: int) -> tuple[int, str]:
    """Peak memory of one call, less ``others_bytes`` (the weights of the other models held in memory)."""
    synchronize(device)
    reset_peak_memory(device)
    call()
    synchronize(device)
    peak, kind = peak_memory(device)
    if others_bytes:
        kind += ", less the other compared models' weights"
    return peak - others_bytes, kind


# ----------------------------------------------------------------------------------------------------
# FLOPs


def deform_conv_flops(input_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one ``torchvision::deform_conv2d`` call (the signature FlopCounterMode passes shapes to).

    2 * C_in/groups * kh * kw * C_out * H_out * W_out * B for the convolution (as for a plain conv), plus
    the bilinear sampling of every input value it reads: B * C_in * kh * kw * H_out * W_out values, each
    4 neighbour multiplies + 3 adds + 1 mask multiply (SAMPLING_FLOPS_PER_VALUE). Biases are not counted.
    """
    b, c_in = input_shape[0], input_shape[1]
    c_out, c_in_per_group, kh, kw = weight_shape
    h_out, w_out = out_shape[-2:]
    use_mask = bool(args[-1]) if args else True
    conv = 2 * b * c_in_per_group * kh * kw * c_out * h_out * w_out
    sampling = b * c_in * kh * kw * h_out * w_out * (SAMPLING_FLOPS_PER_VALUE if use_mask else SAMPLING_FLOPS_PER_VALUE - 1)
    return conv + sampling


@dataclass
class Flops:
    total: int
    deformable: int  # the part from torchvision's deform_conv2d (counted by ``deform_conv_flops``)


def count_flops(fn: Callable[[], Any]) -> Flops:
    """FLOPs of one call of ``fn`` (FlopCounterMode + the deformable conv formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    dcn = torch.ops.torchvision.deform_conv2d
    with FlopCounterMode(display=False, custom_mapping={dcn: deform_conv_flops}) as counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    return Flops(counter.get_total_flops(), int(per_op.get(dcn, 0)))


@contextlib.contextmanager
def reference_dyhead(model: nn.Module) -> Iterator[None]:
    """Run the DyHead tower with torchvision's deform_conv2d (countable), then restore its implementation."""
    tower = getattr(model, "dyhead", None)
    if tower is None or not hasattr(tower, "set_impl") or not len(getattr(tower, "blocks", [])):
        yield
        return
    previous = getattr(tower.blocks[0], "impl", "fast")
    tower.set_impl("reference")
    try:
        yield
    finally:
        tower.set_impl(previous)


def stage_flops(model: nn.Module, c: Candidate, size: tuple[int, int], device: str) -> dict[str, int]:
    """FLOPs of one fp32 image: per stage for our detectors (+ ``dyhead_deformable``), the total for others."""
    images, image_sizes = make_inputs(1, size, device, False)
    fp32 = Settings(device=device)
    with reference_dyhead(model):
        if not c.ours:
            return {"total": count_flops(forward_fn(model, c, images, image_sizes, fp32)).total}
        counts = {name: count_flops(fn) for name, fn in stage_functions(model, images, image_sizes, fp32).items()}
    flops = {name: f.total for name, f in counts.items()}
    flops["dyhead_deformable"] = counts["dyhead"].deformable
    flops["total"] = sum(f.total for f in counts.values())
    return flops


def level_shapes(model: nn.Module, size: tuple[int, int], device: str) -> list[list[int]]:
    """(H, W) of each pyramid level the DyHead tower sees for one image of ``size``."""
    images, _ = make_inputs(1, size, device, False)
    with torch.inference_mode():
        return [list(p.shape[-2:]) for p in model.fpn(model.backbone(model.normalize(images)))]


def tower_share(stages_ms: dict[str, float]) -> float:
    """The DyHead tower's part of the summed stage medians (0..1)."""
    total = sum(stages_ms.values())
    return stages_ms["dyhead"] / total if total > 0 else 0.0
