"""Recipes: TOML files that map 1:1 onto the dataclasses below.

A recipe has four tables, ``[model]``, ``[data]``, ``[train]`` and ``[eval]`` (plus a top-level ``name``).
Every key is a dataclass field; an unknown key is an error that suggests the closest field. Dotted
overrides (``train.lr=0.02``) are applied on top of the file before the dataclasses are built, so they
get the same checks.

Built-in recipes ship inside the package (``dyhead_cli/recipes/NAME.toml``), so they work after a plain
``pip install``: ``load_recipe("quickstart")`` names one. A missing ``recipes/NAME.toml`` (the README's
paths, and the repository's layout before the recipes moved into the package) is the built-in ``NAME``.
A recipe may start from another with a top-level ``extends = "NAME"`` (a built-in) or
``extends = "base.toml"`` (relative to the extending file): its tables are merged key by key over the
base's (lists and scalars replace), and ``name`` is never inherited.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dyhead_cli.errors import DyheadError, suggest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]


# Sizes beyond these exhaust memory long before they help: refused with the limit named.
MAX_IMAGE_SIDE = 4096  # px, any image side a recipe or command asks for
MAX_SYNTHETIC_SIZE = 2048  # px, the synthetic data set's images
MAX_SYNTHETIC_IMAGES = 100_000  # per split


@dataclass(frozen=True)
class Range:
    """The allowed values of a number (or of each number of a list), declared next to its field by ``ranged``.

    ``also``: sentinel values allowed outside the range (``-1``: "the head's default").
    ``length``: (min, max) items of a list field. ``multiple_of``: an int field's step.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[float, ...] = ()
    length: tuple[int, int] | None = None
    multiple_of: int | None = None

    def allows(self, v: float) -> bool:
        if v in self.also:
            return True
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
            and (self.multiple_of is None or v % self.multiple_of == 0)
        )

    def describe(self) -> str:
        parts = []
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        parts.append(" and ".join(p for p in (low, high) if p))
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        text = ", ".join(p for p in parts if p)
        if self.also:
            text += " (or " + " or ".join(f"{a:g}" for a in self.also) + ")"
        return text


def ranged(default: Any, *, length: tuple[int, int] | None = None, **bounds: Any) -> Any:
    """A dataclass field with its allowed range as metadata (checked by ``check_ranges``).

    ``default``: a value, or a callable for lists (``lambda: [800]``, ``list``).
    """
    meta = {"range": Range(length=length, **bounds)}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class BackboneConfig:
    """A timm model used through ``features_only``; we take its stride 8/16/32 features."""

    name: str = "resnet50"
    pretrained: bool = False
    pretrained_file: str = ""  # a local weight file (safetensors or a weights-only torch file)
    img_size: list[int] = ranged(
        list, ge=32, le=MAX_IMAGE_SIDE, length=(0, 2)
    )  # [H, W] (or [S]: S x S) for models built for one input size (Swin, ViT-style); [] = none
    frozen_stages: int = ranged(0, ge=0, le=5)  # stem + this many stages get requires_grad=False (detectron2's freeze_at)
    norm_eval: bool = False  # keep BatchNorm in eval mode while training (frozen statistics)
    # BatchNorm's weight and bias not trained either (detectron2's FrozenBN, which the official DyHead
    # trains with; MMDetection's norm_cfg requires_grad=False); implies norm_eval
    frozen_norm: bool = False
    # MSRA/caffe ResNets (detectron2's STRIDE_IN_1X1, MMDetection style='caffe') put each stage's stride in
    # the first 1x1 conv of its first bottleneck; timm puts it in the 3x3. Bottleneck ResNets/ResNeXts only.
    stride_in_1x1: bool = False
    out_norm: bool = False  # a LayerNorm on each output level C3..C5 (detection Swins: norm1..norm3)


@dataclass
class FPNConfig:
    channels: int = ranged(256, ge=16, le=4096, multiple_of=16)  # GroupNorm(16 groups) in the head towers
    extra_from: str = "p5"  # P6 is computed from "p5" (FCOS/ATSS, DyHead) or "c5" (RetinaNet)
    p7_relu: bool = True  # P7 = conv(relu(P6)) as torchvision/detectron2; false: conv(P6) (MMDetection)
    # The pyramid levels the FPN and DyHead produce: [3, 4, 5, 6, 7] with P6/P7 by stride-2 convs (the dense
    # heads), or [2, 3, 4, 5, 6] with P6 = max-pool(P5) (top_block = "maxpool": Faster R-CNN, detectron2's).
    levels: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])
    top_block: str = "p6p7"  # "p6p7" | "maxpool"


@dataclass
class DyHeadConfig:
    num_blocks: int = ranged(6, ge=0, le=64)
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

    num_convs: int = ranged(0, ge=0, le=16)  # extra tower convs before the predictors (0 with DyHead, 4 for the baselines)
    prior_prob: float = ranged(0.01, gt=0.0, lt=1.0)
    anchor_scale: float = ranged(8.0, gt=0.0, le=1024.0)  # ATSS: one anchor of size anchor_scale * stride per location
    atss_topk: int = ranged(9, ge=1, le=1000)
    focal_alpha: float = ranged(0.25, ge=0.0, le=1.0)
    focal_gamma: float = ranged(2.0, ge=0.0, le=10.0)
    box_loss: str = "giou"  # RetinaNet: "giou" | "smooth_l1"
    smooth_l1_beta: float = ranged(0.0, ge=0.0)  # RetinaNet with box_loss = "smooth_l1" (0 = L1, the official DyHead config)
    box_loss_weight: float = ranged(2.0, ge=0.0)  # ATSS: weight of the GIoU loss (the official REG_LOSS_WEIGHT)
    center_sampling_radius: float = ranged(1.5, ge=0.0)  # FCOS
    # The head's CANDIDATE threshold: a (location, class) is considered only when sigmoid(cls) > score_thresh
    # (before the centerness factor). Not a threshold on final scores: that is predict's --score-thr.
    score_thresh: float = ranged(0.05, ge=0.0, le=1.0)
    nms_thresh: float = ranged(0.6, ge=0.0, le=1.0)
    pre_nms_top_n: int = ranged(1000, ge=1, le=1_000_000)  # candidates kept per level before NMS
    detections_per_img: int = ranged(100, ge=1, le=100_000)
    postprocess: str = "official"  # "official" | "mmdet": the candidate ranking and clipping order of that code
    anchor_offset: float | None = (
        None  # checked by models.build.resolve_model_config; prior centres at (i + offset) * stride; None = head default (ATSS 0.5, RetinaNet 0)
    )
    pred_kernel_size: int | None = (
        None  # checked by models.build.resolve_model_config; predictor conv kernel; None = head default (ATSS 1, FCOS/RetinaNet 3)
    )
    tower_norm: str = "gn"  # norm in the num_convs tower convs: "gn" | "none" (detectron2's RetinaNet)


@dataclass
class RCNNConfig:
    """Faster R-CNN (``head = "faster_rcnn"``) knobs; the defaults are detectron2's, as in the official DyHead
    R-CNN config. Test score threshold and detections per image come from ``head_options``, and so does the
    box NMS threshold (set it to 0.5, detectron2's, in Faster R-CNN recipes)."""

    rpn_pre_nms_top_n_train: int = ranged(2000, ge=1, le=1_000_000)  # proposals kept per level before the RPN's NMS (0.7)
    rpn_pre_nms_top_n_test: int = ranged(1000, ge=1, le=1_000_000)
    rpn_post_nms_top_n: int = ranged(1000, ge=1, le=1_000_000)  # proposals kept per image after it (training and test)
    roi_batch_size_per_image: int = ranged(
        512, ge=1, le=1_000_000
    )  # RoIs sampled per image for the box head's losses (25% positives)
    fc_dim: int = ranged(1024, ge=1, le=65_536)  # width of the box head's two fully connected layers


@dataclass
class ModelConfig:
    num_classes: int = ranged(80, ge=1, le=100_000)
    class_names: list[str] = field(default_factory=list)
    head: str = "atss"  # "atss" | "fcos" | "retinanet" | "faster_rcnn"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    dyhead: DyHeadConfig = field(default_factory=DyHeadConfig)
    head_options: HeadOptions = field(default_factory=HeadOptions)
    rcnn: RCNNConfig = field(default_factory=RCNNConfig)
    # Images enter the detector as 0..255 RGB; these say how the backbone wants them.
    input_format: str = "RGB"  # "RGB" | "BGR" (detectron2's caffe ResNets)
    pixel_mean: list[float] = ranged(lambda: [123.675, 116.28, 103.53], ge=-1e6, le=1e6, length=(3, 3))
    pixel_std: list[float] = ranged(lambda: [58.395, 57.12, 57.375], gt=0.0, le=1e6, length=(3, 3))


@dataclass
class DataConfig:
    train_images: str = "data/coco/train2017"
    train_ann: str = "data/coco/annotations/instances_train2017.json"
    val_images: str = "data/coco/val2017"
    val_ann: str = "data/coco/annotations/instances_val2017.json"
    synthetic: bool = False  # create the built-in data set at the paths above when missing
    synthetic_num_train: int = ranged(200, ge=0, le=MAX_SYNTHETIC_IMAGES)
    synthetic_num_val: int = ranged(50, ge=0, le=MAX_SYNTHETIC_IMAGES)
    synthetic_image_size: int = ranged(256, ge=32, le=MAX_SYNTHETIC_SIZE)
    synthetic_seed: int = ranged(0, ge=0, le=2**63 - 1)
    synthetic_colour_by_class: bool = False  # each class keeps to its own hues (the quickstart's setting)
    min_sizes: list[int] = ranged(lambda: [800], ge=32, le=MAX_IMAGE_SIDE, length=(1, 64))  # several = multi-scale training
    max_size: int = ranged(1333, ge=32, le=MAX_IMAGE_SIDE)
    test_min_size: int = ranged(800, ge=32, le=MAX_IMAGE_SIDE)
    hflip_prob: float = ranged(0.5, ge=0.0, le=1.0)
    color_jitter: float = ranged(0.0, ge=0.0, le=1.0)  # 0 = off; else the strength of brightness/contrast/saturation jitter
    size_divisibility: int = ranged(128, ge=1, le=1024)
    resize_backend: str = "cv2"  # "cv2" | "pillow" (data.transforms.RESIZE_BACKENDS; convert sets the reference's)
    num_workers: int = ranged(2, ge=0, le=64)
    skip_corrupt: bool = False  # skip (and count) unreadable images instead of stopping
    group_by_aspect: bool = True  # training batches hold portrait or landscape images, not both (less padding)


@dataclass
class TrainConfig:
    epochs: int = ranged(12, ge=1, le=100_000)
    max_steps: int = ranged(0, ge=0)  # > 0 caps the run at this many optimizer steps
    batch_size: int = ranged(2, ge=1, le=4096)  # per process
    grad_accum: int = ranged(1, ge=1, le=4096)
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = ranged(0.01, gt=0.0, le=10.0)
    momentum: float = ranged(0.9, ge=0.0, lt=1.0)
    weight_decay: float = ranged(1e-4, ge=0.0, le=1.0)
    schedule: str = "step"  # "step" | "cosine"
    lr_steps: list[float] = ranged(lambda: [0.667, 0.889], gt=0.0, le=1.0, length=(0, 64))  # fractions of the run
    lr_gamma: float = ranged(0.1, gt=0.0, le=1.0)
    warmup_steps: int = ranged(500, ge=0)
    warmup_factor: float = ranged(0.001, gt=0.0, le=1.0)
    clip_grad_norm: float = ranged(0.0, ge=0.0)  # 0 = off
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    ema_decay: float = ranged(0.0, ge=0.0, lt=1.0)  # 0 = no EMA
    seed: int = ranged(42, ge=0, le=2**32 - 1)
    log_every: int = ranged(20, ge=1)
    eval_every: int = ranged(1, ge=0)  # epochs
    checkpoint_every: int = ranged(0, ge=0)  # steps; 0 = at the end of each epoch only
    device: str = "auto"  # "auto" | "cpu"
    log_with: list[str] = field(default_factory=list)  # experiment trackers: "tensorboard", "wandb", "mlflow"


@dataclass
class EvalConfig:
    batch_size: int = ranged(4, ge=1, le=4096)


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
            alias = KEY_ALIASES.get(key.lower())
            hint = f" (did you mean '{where}{alias}'?)" if alias in names else suggest(key, names, prefix=where)
            raise DyheadError(f"unknown recipe key '{dotted}'{hint}")
        kwargs[key] = _convert(hints[key], value, dotted)
    return cls(**kwargs)


# Other tools' names for our keys (detectron2, MMDetection, Ultralytics, common usage), for the "did you
# mean" of an unknown key when no name is close in spelling.
KEY_ALIASES = {
    "learning_rate": "lr",
    "lr0": "lr",
    "base_lr": "lr",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "max_iter": "max_steps",
    "max_iters": "max_steps",
    "iterations": "max_steps",
    "ims_per_batch": "batch_size",
    "batch": "batch_size",
    "samples_per_gpu": "batch_size",
    "workers": "num_workers",
    "workers_per_gpu": "num_workers",
    "amp": "mixed_precision",
    "precision": "mixed_precision",
    "fp16": "mixed_precision",
    "warmup_iters": "warmup_steps",
    "warmup_ratio": "warmup_factor",
    "gradient_accumulation_steps": "grad_accum",
    "accumulate": "grad_accum",
    "ema": "ema_decay",
    "imgsz": "min_sizes",
    "backbone": "name",
}


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
    """A recipe file or built-in recipe name, its ``extends`` chain merged, then ``overrides``, checked."""
    text, where, name = read_recipe_source(path)
    values = _resolve_extends(_parse_toml(text, where), where, [str(where or name)])
    values = apply_overrides(values, overrides or [])
    values.setdefault("name", name)
    return validate(from_dict(Recipe, values))


def builtin_recipe_names() -> list[str]:
    """The recipes shipped in the package, by name (file stem), sorted."""
    folder = resources.files("dyhead_cli") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def builtin_recipe_text(name: str) -> str:
    """The TOML text of the built-in recipe ``name`` (``quickstart`` or ``quickstart.toml``)."""
    name = name[: -len(".toml")] if name.endswith(".toml") else name
    names = builtin_recipe_names()
    if name not in names:
        raise DyheadError(f"no built-in recipe '{name}'{suggest(name, names)} (built-in: {', '.join(names)})")
    return (resources.files("dyhead_cli") / "recipes" / f"{name}.toml").read_text(encoding="utf-8")


def read_recipe_source(ref: str | Path) -> tuple[str, Path | None, str]:
    """(TOML text, the file it came from or None for a built-in, default name) for a file or a name.

    An existing file wins. Otherwise a bare name (``quickstart``), a missing ``NAME.toml`` given without a
    folder, or a missing ``.../recipes/NAME.toml`` is the built-in recipe ``NAME``.
    """
    path = Path(ref)
    if path.is_dir():
        raise DyheadError(f"recipe {path} is a folder: give a recipe TOML file or a built-in recipe name")
    if path.is_file():
        try:
            return path.read_bytes().decode("utf-8"), path, path.stem
        except OSError as e:
            raise DyheadError(f"cannot read recipe {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise DyheadError(f"recipe {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    text = str(ref)
    no_folder = "/" not in text and "\\" not in text
    bare = no_folder and path.suffix == ""
    # NAME.toml alone, as the README's recipe table writes it, or the repository's recipes/NAME.toml
    as_file = path.suffix == ".toml" and (no_folder or path.parent.name == "recipes")
    names = builtin_recipe_names()
    if (bare or as_file) and path.stem in names:
        return builtin_recipe_text(path.stem), None, path.stem
    if bare:
        raise DyheadError(f"no recipe file or built-in recipe '{text}'{suggest(text, names)} (built-in: {', '.join(names)})")
    raise DyheadError(f"recipe file not found: {path}{suggest(path.stem, names)}")


def _parse_toml(text: str, where: Path | None) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DyheadError(f"recipe {where or 'text'} is not valid TOML: {e}") from None
    except RecursionError:
        raise DyheadError(f"recipe {where or 'text'} is nested too deeply to be a recipe") from None


def _resolve_extends(values: dict[str, Any], where: Path | None, chain: list[str]) -> dict[str, Any]:
    """Merge ``values`` over the recipe it ``extends`` (recursively); ``chain`` catches cycles."""
    base_ref = values.pop("extends", None)
    if base_ref is None:
        return values
    if not isinstance(base_ref, str) or not base_ref:
        raise DyheadError(f"recipe key 'extends' must be a recipe name or file, got {base_ref!r}")
    candidate = (where.parent / base_ref) if where is not None else None
    ref: str | Path = candidate if candidate is not None and candidate.is_file() else base_ref
    try:
        text, base_where, base_name = read_recipe_source(ref)
    except DyheadError as e:
        raise DyheadError(f"recipe {where or chain[-1]}: extends = {base_ref!r}: {e}") from None
    key = str(base_where.resolve() if base_where is not None else base_name)
    if key in chain:
        raise DyheadError(f"recipe 'extends' goes round in a circle: {' -> '.join(chain + [key])}")
    base = _resolve_extends(_parse_toml(text, base_where), base_where, chain + [key])
    base.pop("name", None)  # a recipe is named after itself, never after its base
    return _deep_merge(base, values)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    return validate(from_dict(Recipe, values))


# The [model] choices are checked where they are implemented (models.build.resolve_model_config, called
# by engine.recipes.load); these are the choices of the training loop.
CHOICES = {
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("step", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
}


TRACKERS = ("tensorboard", "wandb", "mlflow")


def field_range(cls: type, name: str) -> Range:
    """The ``ranged`` bounds of ``cls``'s field ``name``: for options that set it from the command line."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["range"]


def check_ranges(obj: Any, where: str = "") -> None:
    """Check every field declared with ``ranged`` (recursively); one line naming the key, value and range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, dotted + ".")
            continue
        rng: Range | None = f.metadata.get("range")
        if rng is None or value is None:  # None: "the head's default" (code only; TOML has no null)
            continue
        if isinstance(value, list):
            lo, hi = rng.length or (0, None)
            if len(value) < lo or (hi is not None and len(value) > hi):
                want = f"exactly {lo}" if lo == hi else f"{lo}..{hi}" if hi is not None else f"at least {lo}"
                raise DyheadError(f"recipe key '{dotted}' = {value!r} must have {want} values, it has {len(value)}")
            bad = [v for v in value if not rng.allows(v)]
            if bad:
                raise DyheadError(
                    f"recipe key '{dotted}' = {value!r}: {bad[0]!r} is out of range (each value must be {rng.describe()})"
                )
        elif not rng.allows(value):
            raise DyheadError(f"recipe key '{dotted}' = {value!r} is out of range: it must be {rng.describe()}")


def check_name(name: str) -> None:
    """``name`` becomes part of a run folder's name: no path separators, no control characters."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise DyheadError(
            f"recipe key 'name' = {name!r} must be a non-empty name without '/', '\\' or control characters "
            "(it names the run folder)"
        )


def validate(recipe: Recipe) -> Recipe:
    """Check values that have a fixed set of choices or a range."""
    check_name(recipe.name)
    check_ranges(recipe)
    for dotted, choices in CHOICES.items():
        obj: Any = recipe
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            raise DyheadError(f"recipe key '{dotted}' = {obj!r} is not one of {', '.join(choices)}{suggest(str(obj), choices)}")
    m = recipe.model
    if m.class_names and len(m.class_names) != m.num_classes:
        raise DyheadError(f"model.class_names has {len(m.class_names)} names but model.num_classes = {m.num_classes}")
    for tracker in recipe.train.log_with:
        if tracker not in TRACKERS:
            raise DyheadError(
                f"train.log_with: unknown tracker '{tracker}'{suggest(tracker, TRACKERS)}; choose from {', '.join(TRACKERS)}"
            )
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
        return json.dumps(v, ensure_ascii=False)  # a valid TOML basic string: quotes, backslashes, control chars escaped
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dump_toml(to_dict(recipe)))
