"""Recipes: TOML files that map 1:1 onto the dataclasses below.

A recipe has four tables, ``[model]``, ``[data]``, ``[train]`` and ``[eval]`` (plus a top-level ``name``).
Every key is a dataclass field; an unknown key is an error that suggests the closest field. Dotted
overrides (``train.lr=0.02``) are applied on top of the file before the dataclasses are built, so they
get the same checks.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyhead_cli.errors import DyheadError, suggest


@dataclass
class BackboneConfig:
    """A timm model used through ``features_only``; we take its stride 8/16/32 features."""

    name: str = "resnet50"
    pretrained: bool = False
    pretrained_file: str = ""  # a local weight file (safetensors or a weights-only torch file)
    img_size: list[int] = field(default_factory=list)  # [H, W] for models that need it (Swin); [] = none
    frozen_stages: int = 0  # stem + this many stages get requires_grad=False (detectron2's freeze_at)
    norm_eval: bool = False  # keep BatchNorm in eval mode while training (frozen statistics)
    # MSRA/caffe ResNets (detectron2's STRIDE_IN_1X1, MMDetection style='caffe') put each stage's stride in
    # the first 1x1 conv of its first bottleneck; timm puts it in the 3x3. Bottleneck ResNets/ResNeXts only.
    stride_in_1x1: bool = False
    out_norm: bool = False  # a LayerNorm on each output level C3..C5 (detection Swins: norm1..norm3)


@dataclass
class FPNConfig:
    channels: int = 256
    extra_from: str = "p5"  # P6 is computed from "p5" (FCOS/ATSS, DyHead) or "c5" (RetinaNet)
    p7_relu: bool = True  # P7 = conv(relu(P6)) as torchvision/detectron2; false: conv(P6) (MMDetection)


@dataclass
class DyHeadConfig:
    num_blocks: int = 6
    offset_mode: str = "official"  # "official" | "mmdet" | "aligned": see docs/dyhead-design.md
    zero_init_offset: bool = False  # mmdet's "simple" recipe
    impl: str = "fast"  # "fast" | "reference": same numbers, the reference is torchvision's op as-is


@dataclass
class HeadOptions:
    """Knobs of the detector heads; each head reads the ones it uses.

    ``None`` means "the head's own default" (declared in the head's module, filled in by
    ``models.build.resolve_model_config``); TOML has no null, so a missing key is None and ``dump_toml``
    leaves None out. Scores and thresholds: ``models/heads/postprocess.py``.
    """

    num_convs: int = 0  # extra tower convs before the predictors (0 with DyHead, 4 for the baselines)
    prior_prob: float = 0.01
    anchor_scale: float = 8.0  # ATSS: one anchor of size anchor_scale * stride per location
    atss_topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "giou"  # RetinaNet: "giou" | "smooth_l1"
    smooth_l1_beta: float = 0.0  # RetinaNet with box_loss = "smooth_l1" (0 = L1, the official DyHead config)
    box_loss_weight: float = 2.0  # ATSS: weight of the GIoU loss (the official REG_LOSS_WEIGHT)
    center_sampling_radius: float = 1.5  # FCOS
    # The head's CANDIDATE threshold: a (location, class) is considered only when sigmoid(cls) > score_thresh
    # (before the centerness factor). Not a threshold on final scores: that is predict's --score-thr.
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    pre_nms_top_n: int = 1000  # candidates kept per level before NMS
    detections_per_img: int = 100
    postprocess: str = "official"  # "official" | "mmdet": the candidate ranking and clipping order of that code
    anchor_offset: float | None = None  # prior centres at (i + offset) * stride; None = head default (ATSS 0.5, RetinaNet 0)
    pred_kernel_size: int | None = None  # predictor conv kernel; None = head default (ATSS 1, FCOS/RetinaNet 3)
    tower_norm: str = "gn"  # norm in the num_convs tower convs: "gn" | "none" (detectron2's RetinaNet)


@dataclass
class ModelConfig:
    num_classes: int = 80
    class_names: list[str] = field(default_factory=list)
    head: str = "atss"  # "atss" | "fcos" | "retinanet"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    dyhead: DyHeadConfig = field(default_factory=DyHeadConfig)
    head_options: HeadOptions = field(default_factory=HeadOptions)
    # Images enter the detector as 0..255 RGB; these say how the backbone wants them.
    input_format: str = "RGB"  # "RGB" | "BGR" (detectron2's caffe ResNets)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class DataConfig:
    train_images: str = "data/coco/train2017"
    train_ann: str = "data/coco/annotations/instances_train2017.json"
    val_images: str = "data/coco/val2017"
    val_ann: str = "data/coco/annotations/instances_val2017.json"
    synthetic: bool = False  # create the built-in data set at the paths above when missing
    synthetic_num_train: int = 200
    synthetic_num_val: int = 50
    synthetic_image_size: int = 256
    synthetic_seed: int = 0
    synthetic_colour_by_class: bool = False  # each class keeps to its own hues (the quickstart's setting)
    min_sizes: list[int] = field(default_factory=lambda: [800])  # several = multi-scale training
    max_size: int = 1333
    test_min_size: int = 800
    hflip_prob: float = 0.5
    color_jitter: float = 0.0  # 0 = off; else the strength of brightness/contrast/saturation jitter
    size_divisibility: int = 128
    num_workers: int = 2
    skip_corrupt: bool = False  # skip (and count) unreadable images instead of stopping


@dataclass
class TrainConfig:
    epochs: int = 12
    max_steps: int = 0  # > 0 caps the run at this many optimizer steps
    batch_size: int = 2  # per process
    grad_accum: int = 1
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # "step" | "cosine"
    lr_steps: list[float] = field(default_factory=lambda: [0.667, 0.889])  # fractions of the run
    lr_gamma: float = 0.1
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 = off
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    ema_decay: float = 0.0  # 0 = no EMA
    seed: int = 42
    log_every: int = 20
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    device: str = "auto"  # "auto" | "cpu"


@dataclass
class EvalConfig:
    batch_size: int = 4


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------
# dict -> dataclass, with errors that name the key


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types are ``DyheadError``s."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{where}{key}"
        if key not in names:
            raise DyheadError(f"unknown recipe key '{dotted}'{suggest(key, names)}")
        kwargs[key] = _convert(hints[key], value, dotted)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, dotted: str) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]: None stays None (only code makes it: TOML has no null)
        (hint,) = [a for a in args if a is not type(None)]
        if value is None:
            return None
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise DyheadError(f"recipe key '{dotted}' must be a table, got {value!r}")
        return from_dict(hint, value, dotted + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise DyheadError(f"recipe key '{dotted}' must be a list, got {value!r}")
        return [_convert(item, v, dotted) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise DyheadError(f"recipe key '{dotted}' must be true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise DyheadError(f"recipe key '{dotted}' must be of type {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise DyheadError(f"recipe key '{dotted}' must be a finite number, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.02"`` -> (["train", "lr"], 0.02). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise DyheadError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DyheadError(f"override '{text}': '{part}' is not a table")
        node[path[-1]] = value
    return values


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise DyheadError(f"recipe file not found: {path}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DyheadError(f"recipe {path} is not valid TOML: {e}") from None
    values = apply_overrides(values, overrides or [])
    values.setdefault("name", path.stem)
    return validate(from_dict(Recipe, values))


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    return validate(from_dict(Recipe, values))


CHOICES = {
    "model.head": ("atss", "fcos", "retinanet"),
    "model.input_format": ("RGB", "BGR"),
    "model.fpn.extra_from": ("p5", "c5"),
    "model.dyhead.offset_mode": ("official", "mmdet", "aligned"),
    "model.dyhead.impl": ("fast", "reference", "export"),
    "model.head_options.box_loss": ("giou", "smooth_l1"),
    "model.head_options.tower_norm": ("gn", "none"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("step", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
}


def validate(recipe: Recipe) -> Recipe:
    """Check values that have a fixed set of choices or a range."""
    for dotted, choices in CHOICES.items():
        obj: Any = recipe
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            raise DyheadError(
                f"recipe key '{dotted}' = {obj!r} is not one of {', '.join(choices)}{suggest(str(obj), choices)}"
            )
    m = recipe.model
    if m.num_classes < 1:
        raise DyheadError("recipe key 'model.num_classes' must be at least 1")
    if m.class_names and len(m.class_names) != m.num_classes:
        raise DyheadError(
            f"model.class_names has {len(m.class_names)} names but model.num_classes = {m.num_classes}"
        )
    if m.dyhead.num_blocks < 0:
        raise DyheadError("recipe key 'model.dyhead.num_blocks' must be >= 0")
    o = m.head_options
    if o.smooth_l1_beta < 0:
        raise DyheadError("model.head_options.smooth_l1_beta must be >= 0")
    if len(m.pixel_mean) != 3 or len(m.pixel_std) != 3:
        raise DyheadError("model.pixel_mean and model.pixel_std need 3 values each")
    if recipe.train.batch_size < 1 or recipe.train.grad_accum < 1:
        raise DyheadError("train.batch_size and train.grad_accum must be at least 1")
    if not recipe.data.min_sizes:
        raise DyheadError("data.min_sizes needs at least one size")
    return recipe


# ----------------------------------------------------------------------------------------------------
# dataclass -> TOML (tomllib only reads)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def dump_toml(values: dict[str, Any]) -> str:
    """Write a nested dict of str/int/float/bool/list values as TOML (scalars before tables); None is left out."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(values, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dump_toml(to_dict(recipe)))
