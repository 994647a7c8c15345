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

import contextlib
import copy
import dataclasses
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dyhead_cli.engine import recipes
from dyhead_cli.engine.machine import cpu_description
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.dyhead import IMPLS
from dyhead_cli.recipe import ModelConfig

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
STAGES = ("backbone", "fpn", "dyhead", "head", "postprocess")
STAGE_TITLES = {"backbone": "backbone", "fpn": "FPN", "dyhead": "DyHead", "head": "head", "postprocess": "post"}
SAMPLING_FLOPS_PER_VALUE = 8  # bilinear: 4 neighbour multiplies + 3 adds, + 1 mask multiply (7 without a mask)
DEFAULT_ITERS = {"cpu": 10, "cuda": 50}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}


@dataclass
class Settings:
    """How to measure; ``iters``/``warmup`` = None take the device's default."""

    device: str = "cpu"  # "cpu" | "cuda"
    size: tuple[int, int] = (800, 1333)  # (H, W) of the input batch
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    iters: int | None = None
    warmup: int | None = None
    impl: str | None = None  # DyHead deformable conv implementation; None = the model config's
    threads: int | None = None
    compare: bool = False
    seed: int = 0
    onnx: Path | None = None  # also time this exported model under onnxruntime (commands/benchmark/onnx.py)


@dataclass
class Timing:
    """Wall times of the timed calls, in seconds."""

    times_s: list[float]

    def percentile(self, q: float) -> float:
        """Linear interpolation between the sorted times (numpy's default), q in 0..100."""
        t = sorted(self.times_s)
        pos = (len(t) - 1) * q / 100.0
        lo = int(pos)
        hi = min(lo + 1, len(t) - 1)
        return t[lo] + (t[hi] - t[lo]) * (pos - lo)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    def to_ms(self) -> dict[str, float]:
        ms = {f"p{q}": self.percentile(q) * 1e3 for q in (50, 90, 99)}
        ms.update(mean=statistics.fmean(self.times_s) * 1e3, min=min(self.times_s) * 1e3, max=max(self.times_s) * 1e3)
        return ms


@dataclass
class Candidate:
    """One model under test: ``build()`` returns it on CPU; ``ours`` = a dyhead ``Detector``."""

    key: str  # "dyhead" | "no_dyhead" | "torchvision_fcos" (| "atss_dyhead" | "torchvision_faster_rcnn")
    name: str
    build: Callable[[], nn.Module]
    ours: bool
    config: dict[str, Any]


# ----------------------------------------------------------------------------------------------------
# parsing the command line


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1333"`` -> (800, 1333) (height x width); ``"640"`` -> (640, 640)."""
    parts = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not parts:
        raise DyheadError(f"--size must look like HxW (e.g. 800x1333) or one number, got {text!r}")
    h = int(parts[1])
    w = int(parts[2] or parts[1])
    if min(h, w) < 32:
        raise DyheadError(f"--size must be at least 32x32, got {h}x{w}")
    return h, w


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> [1, 8]."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DyheadError(f"--batch-sizes must be comma-separated integers, e.g. 1,8; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise DyheadError(f"--batch-sizes needs positive integers, got {text!r}")
    return sizes


def resolve_device(gpu: bool) -> str:
    if not gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise DyheadError("--gpu: no CUDA device is available on this machine")
    return "cuda"


def check_settings(s: Settings) -> None:
    if s.precision not in PRECISIONS:
        raise DyheadError(f"--precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.impl is not None and s.impl not in IMPLS:
        raise DyheadError(f"--impl must be one of {', '.join(IMPLS)}, got {s.impl!r}")
    if s.iters is not None and s.iters < 1:
        raise DyheadError("--iters must be at least 1")
    if s.warmup is not None and s.warmup < 0:
        raise DyheadError("--warmup must be 0 or more")
    if s.threads is not None and s.threads < 1:
        raise DyheadError("--threads must be at least 1")


def model_config_from(recipe: Path | None, model: str | None) -> tuple[ModelConfig, str]:
    """The model to benchmark and where it came from: a recipe's [model] (never downloading weights),
    a timm backbone under the paper's ATSS + 6-block DyHead, or ATSS-R50-DyHead by default."""
    from dyhead_cli.models.backbone import check_model_name

    if recipe is not None and model is not None:
        raise DyheadError("use --recipe or --model, not both")
    if recipe is not None:
        cfg = recipes.load(recipe).model
        cfg.backbone.pretrained, cfg.backbone.pretrained_file = False, ""
        return cfg, f"recipe {recipe}"
    cfg = ModelConfig()
    if model is not None:
        check_model_name(model)
        cfg.backbone.name = model
    return cfg, f"timm backbone {cfg.backbone.name}, ATSS + DyHead defaults"


# ----------------------------------------------------------------------------------------------------
# the models


def short_backbone(name: str) -> str:
    m = re.fullmatch(r"resnet(\d+)", name)
    return f"R{m[1]}" if m else name


HEAD_TITLES = {"faster_rcnn": "Faster R-CNN"}


def model_name(cfg: ModelConfig) -> str:
    base = f"{HEAD_TITLES.get(cfg.head, cfg.head.upper())}-{short_backbone(cfg.backbone.name)}"
    if cfg.dyhead.num_blocks:
        return f"{base}-DyHead"
    return f"{base}, no DyHead"


def without_dyhead(cfg: ModelConfig) -> ModelConfig:
    """The same detector without DyHead blocks and with the standard 4-conv head towers."""
    cfg = copy.deepcopy(cfg)
    cfg.dyhead.num_blocks = 0
    cfg.head_options.num_convs = 4
    return cfg


def build_detector(cfg: ModelConfig) -> nn.Module:
    from dyhead_cli.models.build import build_model

    model = build_model(cfg).eval()
    if hasattr(model.dyhead, "set_impl"):
        model.dyhead.set_impl(cfg.dyhead.impl)
    return model


def as_atss(cfg: ModelConfig) -> ModelConfig:
    """The same backbone and DyHead under the ATSS head and its P3..P7 pyramid (the ATSS recipes' settings)."""
    from dyhead_cli.recipe import FPNConfig, HeadOptions

    cfg = copy.deepcopy(cfg)
    cfg.head, cfg.head_options = "atss", HeadOptions(num_convs=0 if cfg.dyhead.num_blocks else 4)
    cfg.fpn = FPNConfig(channels=cfg.fpn.channels)
    return cfg


def build_torchvision_fcos(num_classes: int, size: tuple[int, int], builder: str = "fcos_resnet50_fpn") -> nn.Module:
    """torchvision's FCOS-R50-FPN (or another ``builder`` of torchvision.models.detection), random weights,
    its transform set to keep an (H, W) input as it is."""
    from torchvision.models import detection

    model = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    model.transform.min_size = (min(size),)  # scale = min(min_size / short side, max_size / long side) = 1
    model.transform.max_size = max(size)
    return model


def candidates_for(cfg: ModelConfig, s: Settings) -> list[Candidate]:
    cfg = copy.deepcopy(cfg)
    if s.impl is not None:
        cfg.dyhead.impl = s.impl
    out = [Candidate("dyhead", model_name(cfg), lambda: build_detector(cfg), True, dataclasses.asdict(cfg))]
    if s.compare:
        base = without_dyhead(cfg)
        out.append(Candidate("no_dyhead", model_name(base), lambda: build_detector(base), True, dataclasses.asdict(base)))
        two_stage = cfg.head == "faster_rcnn"
        if two_stage:
            atss = as_atss(cfg)
            out.append(Candidate("atss_dyhead", model_name(atss), lambda: build_detector(atss), True, dataclasses.asdict(atss)))
        builder, key, title = (
            ("fasterrcnn_resnet50_fpn", "torchvision_faster_rcnn", "Faster R-CNN-R50 (torchvision)")
            if two_stage
            else ("fcos_resnet50_fpn", "torchvision_fcos", "FCOS-R50 (torchvision)")
        )
        num_classes = cfg.num_classes + two_stage  # torchvision's Faster R-CNN counts the background class
        tv = {
            "torchvision": f"{builder}(weights=None, weights_backbone=None)",
            "num_classes": num_classes,
            "transform": {"min_size": min(s.size), "max_size": max(s.size)},
        }
        out.append(Candidate(key, title, lambda: build_torchvision_fcos(num_classes, s.size, builder), False, tv))
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


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


def stage_breakdown(model: nn.Module, images: Tensor, image_sizes: list, s: Settings) -> dict[str, Timing]:
    """Median-ready timings of backbone, FPN, DyHead, head and post-processing, each run on its own."""
    return {name: measure(fn, s.warmup, s.iters, s.device) for name, fn in stage_functions(model, images, image_sizes, s).items()}


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
    """One batch size: warm every model up, its peak memory alone, the timed calls interleaved, then stages."""
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
            log(f"{x.c.name}: batch {batch}, stages")
            row["stages_ms"] = {n: t.p50 * 1e3 for n, t in stage_breakdown(x.model, images, image_sizes, s).items()}
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


def tower_share(stages_ms: dict[str, float]) -> float:
    """The DyHead tower's part of the summed stage medians (0..1)."""
    total = sum(stages_ms.values())
    return stages_ms["dyhead"] / total if total > 0 else 0.0


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


def run_benchmark(cfg: ModelConfig, source: str, s: Settings, log: Callable[[str], None] = lambda m: None) -> dict:
    """Measure the model (and the comparison models) and return the report (see ``to_markdown``)."""
    check_settings(s)
    s = dataclasses.replace(
        s, iters=s.iters or DEFAULT_ITERS[s.device], warmup=DEFAULT_WARMUP[s.device] if s.warmup is None else s.warmup
    )
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    machine_start = machine_info(s.device)
    busy = busy_warning(machine_start)
    if busy:
        log(busy)
    loaded = [load_candidate(c, s, log) for c in candidates_for(cfg, s)]
    onnx = None
    if s.onnx is not None:
        from dyhead_cli.commands.benchmark.onnx import load_onnx

        onnx = load_onnx(s.onnx, torch.get_num_threads())
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
        "stages: each run alone on the previous stage's outputs, median of the timed calls (backbone includes normalisation)",
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


# ----------------------------------------------------------------------------------------------------
# machine and command


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import timm
    import torchvision

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_vector_extensions": " ".join(cpu_description()["vector_extensions"]),  # type: ignore[arg-type]
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_average_start": load_average(),
    }
    if device == "cuda":
        info.update(gpu_info())
    return info


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (e.g. 580.159.04): NVML, else nvidia-smi, else /proc; None if none answers."""
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(OSError):
        m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m[1]
    return None


def gpu_info() -> dict[str, Any]:
    """The CUDA device and its software: name, memory, compute capability, driver, CUDA, cuDNN, TF32 flags."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "gpu_memory_bytes": props.total_memory,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_multiprocessors": props.multi_processor_count,
        "driver": nvidia_driver(),
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def command_line() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


# ----------------------------------------------------------------------------------------------------
# output


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _g(n: int) -> str:
    return f"{n / 1e9:.2f}"


RESULT_HEADERS = ["model", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "peak MB"]
STAGE_HEADERS = ["model", "batch"] + [f"{STAGE_TITLES[n]} ms" for n in STAGES] + ["sum ms", "DyHead share"]
MODEL_HEADERS = ["model", "params M", "GFLOPs/img", "backbone", "FPN", "DyHead (deformable)", "head"]


def result_cells(r: dict) -> list[str]:
    lat = r["latency_ms"]
    return [
        r["model"],
        str(r["batch_size"]),
        f"{lat['p50']:.1f}",
        f"{lat['p90']:.1f}",
        f"{lat['p99']:.1f}",
        f"{r['images_per_s']:.2f}",
        _mb(r["peak_memory_bytes"]),
    ]


def stage_cells(r: dict) -> list[str]:
    st = r["stages_ms"]
    share = r.get("dyhead_share", tower_share(st))
    return [r["model"], str(r["batch_size"])] + [f"{st[n]:.1f}" for n in STAGES] + [f"{sum(st.values()):.1f}", f"{share:.0%}"]


def model_cells(m: dict) -> list[str]:
    f = m["flops_per_image"]
    if not f:  # an exported model (--onnx): no parameter or FLOP count
        return [m["name"]] + [""] * 6
    if "backbone" not in f:
        return [m["name"], f"{m['params'] / 1e6:.2f}", _g(f["total"]), "", "", "", ""]
    return [
        m["name"],
        f"{m['params'] / 1e6:.2f}",
        _g(f["total"]),
        _g(f["backbone"]),
        _g(f["fpn"]),
        f"{_g(f['dyhead'])} ({_g(f['dyhead_deformable'])})",
        _g(f["head"]),
    ]


def ratio_line(x: dict) -> str:
    sign = "+" if x["difference_ms"] >= 0 else "-"
    return (
        f"batch {x['batch_size']}: {x['model']} / {x['vs']} = {x['ratio_p50']:.2f}x p50 ({sign}{abs(x['difference_ms']):.1f} ms)"
    )


def _rich_table(title: str, headers: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def render_table(report: dict):
    """The report as rich tables (latency, stages, model sizes) and the ratio lines."""
    from rich.console import Group
    from rich.text import Text

    s, m = report["settings"], report["machine"]
    title = (
        f"dyhead benchmark: {s['size'][0]}x{s['size'][1]}, {s['precision']}, {s['device']}"
        f"{', channels-last' if s['channels_last'] else ''}{', compiled' if s['compile'] else ''}, "
        f"{s['threads']} threads, {s['iters']} timed after {s['warmup']} warm-up"
    )
    rows = report["results"]
    parts: list[Any] = [_rich_table(title, RESULT_HEADERS, [result_cells(r) for r in rows])]
    staged = [r for r in rows if "stages_ms" in r]
    if staged:
        parts.append(_rich_table("stages (median, each run alone)", STAGE_HEADERS, [stage_cells(r) for r in staged]))
    parts.append(_rich_table("size (GFLOPs per image)", MODEL_HEADERS, [model_cells(x) for x in report["models"].values()]))
    parts += [Text(ratio_line(x)) for x in report["ratios"]]
    gpu = f", {m['gpu']} (driver {m.get('driver') or '?'}, CUDA {m['cuda']})" if m["gpu"] else ""
    parts.append(
        Text(
            f"{m['cpu']} ({m['cpu_cores_usable']} cores; {m.get('cpu_vector_extensions') or 'vector extensions unknown'}; "
            f"torch kernels {m.get('torch_cpu_capability')}){gpu}; torch {m['torch']}, "
            f"torchvision {m['torchvision']}; {s.get('timer', 'timer ?')}; load average {m['load_average_start']} -> "
            f"{m['load_average_end']}",
            style="dim",
        )
    )
    return Group(*parts)


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def to_markdown(report: dict) -> str:
    """The report as a Markdown document: command, machine, settings, results, stages, ratios, notes."""
    models = report["models"]
    out = ["# dyhead benchmark", "", "```", report["command"], "```", "", "## Machine", ""]
    out += _md_table(["", ""], [[k, str(v)] for k, v in report["machine"].items()])
    out += ["", "## Settings", ""]
    out += _md_table(["", ""], [[k, str(v)] for k, v in report["settings"].items()])
    out += ["", "## Results", ""]
    out += _md_table(RESULT_HEADERS, [result_cells(r) for r in report["results"]])
    staged = [r for r in report["results"] if "stages_ms" in r]
    if staged:
        out += ["", "## Stages (median ms, each run alone)", ""]
        out += _md_table(STAGE_HEADERS, [stage_cells(r) for r in staged])
    if report["ratios"]:
        out += ["", "## Ratios", ""] + [f"- {ratio_line(x)}" for x in report["ratios"]]
    out += ["", "## Models (GFLOPs per image)", ""]
    out += _md_table(
        MODEL_HEADERS + ["levels"],
        [model_cells(m) + [" ".join(f"{h}x{w}" for h, w in m.get("levels", []))] for m in models.values()],
    )
    out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def write_outputs(report: dict, json_out: Path | None, markdown_out: Path | None) -> None:
    for path, text in ((json_out, lambda: json.dumps(report, indent=2) + "\n"), (markdown_out, lambda: to_markdown(report))):
        if path is None:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text())
        except OSError as e:
            raise DyheadError(f"cannot write {path}: {e.strerror or e}") from None


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
    cfg, source = model_config_from(recipe, model)
    report = run_benchmark(cfg, source, settings, log)
    write_outputs(report, json_out, markdown_out)
    return report
