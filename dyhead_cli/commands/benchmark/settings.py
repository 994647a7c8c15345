"""``dyhead benchmark``'s settings, parsed and checked, and what it measures (timings, candidates)."""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dyhead_cli.engine import recipes
from dyhead_cli.errors import DyheadError, check_choice
from dyhead_cli.models.dyhead import IMPLS
from dyhead_cli.recipe import MAX_IMAGE_SIDE, ModelConfig

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
    if min(h, w) < 32 or max(h, w) > MAX_IMAGE_SIDE:
        raise DyheadError(f"--size must be within 32..{MAX_IMAGE_SIDE} on each side, got {h}x{w}")
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
    check_choice("--precision", s.precision, PRECISIONS)
    if s.impl is not None:
        check_choice("--impl", s.impl, IMPLS)
    if s.iters is not None and s.iters < 1:
        raise DyheadError("--iters must be at least 1")
    if s.warmup is not None and s.warmup < 0:
        raise DyheadError("--warmup must be 0 or more")
    if s.threads is not None and s.threads < 1:
        raise DyheadError("--threads must be at least 1")
    cores = os.cpu_count() or 1
    if s.threads is not None and s.threads > 4 * cores:  # 999 threads on 2 cores drove the load to 136
        raise DyheadError(f"--threads {s.threads} is more than 4 per core of this machine's {cores}: use at most {4 * cores}")


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
