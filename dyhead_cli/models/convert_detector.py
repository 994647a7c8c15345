"""Whole-detector conversion: an official (detectron2) or MMDetection DyHead checkpoint -> our safetensors.

Every source key is either mapped onto our ``Detector`` (backbone ``backbone.body.*`` = timm's own names,
FPN ``fpn.fpn.*`` = torchvision's, DyHead ``dyhead.*`` through ``convert_dyhead``, head ``head.*``) or listed
as deliberately dropped (optimizer, BatchNorm counters, anchor and pixel-statistics buffers, Swin's
relative-position indices). An unmapped key, a missing one or a shape mismatch is a ``DyheadError``
that lists the keys.

What the weights were trained with travels in the model config we write: channel order and pixel
statistics, frozen BatchNorm, the DyHead offset behaviour (``offset_mode``), anchors. Some reference
architectures differ from what our model can express (detectron2's MSRA ResNets put the stride in the
first 1x1 conv, MMDetection's FPN makes P7 without a ReLU, detection Swins normalise each output level,
...). Those differences are ``Gap``s: a recipe field can express each of them (``CAPABILITIES``); while our
model config lacks the field, the conversion is refused, or done anyway with ``approximate=True`` and the
gaps recorded in the checkpoint (good for fine-tuning, not for reproducing the published AP).

References: microsoft/DynamicHead (``extra/resnet.py``, ``extra/swint.py``, ``extra/atss.py``, configs),
detectron2 (``modeling/backbone/resnet.py``, ``fpn.py``, ``meta_arch/retinanet.py``), MMDetection
(``backbones/resnet.py``, ``backbones/swin.py``, ``necks/fpn.py``, ``necks/dyhead.py``,
``dense_heads/atss_head.py``, ``configs/dyhead/*``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.convert import SOURCES, convert_dyhead, read_reference_checkpoint

# COCO's 80 categories in the contiguous order both references use (sorted category ids, 1..90 with gaps):
# detectron2's thing_dataset_id_to_contiguous_id and MMDetection's CocoDataset.CLASSES agree.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

CAFFE_BGR = ("BGR", [103.530, 116.280, 123.675], [1.0, 1.0, 1.0])  # MSRA / detectron2 caffe ResNets
IMAGENET_RGB = ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])  # torchvision ResNets, Swin

RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
SWIN_SIZES = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small", (128, (2, 2, 18, 2)): "base", (192, (2, 2, 18, 2)): "large"}


@dataclass(frozen=True)
class Capability:
    """A way the reference model can differ from ours, and the [model] field that would express it.

    ``OURS``/``OURS_PER_HEAD`` say what our model does while the field does not exist; ``approximable``
    says whether the weights still fit (same shapes) when the difference is ignored.
    """

    key: str  # dotted path inside the [model] table
    what: str
    approximable: bool


CAPABILITIES = {
    "backbone.stride_in_1x1": Capability(
        "backbone.stride_in_1x1",
        "its ResNet has the stride-2 of each stage in the first 1x1 conv (MSRA/caffe style: detectron2 "
        "STRIDE_IN_1X1, MMDetection style='caffe'); timm's ResNet has it in the 3x3 conv",
        True,
    ),
    "backbone.out_norm": Capability(
        "backbone.out_norm",
        "its Swin applies a LayerNorm to each output level (norm1..norm3); timm's features_only Swin has none",
        True,
    ),
    "fpn.p7_relu": Capability(
        "fpn.p7_relu",
        "its FPN computes P7 from P6 without a ReLU (MMDetection relu_before_extra_convs=False); ours applies one",
        True,
    ),
    "head_options.anchor_offset": Capability(
        "head_options.anchor_offset",
        "its anchors are centred at a different offset within each stride cell",
        True,
    ),
    "head_options.pred_kernel_size": Capability(
        "head_options.pred_kernel_size",
        "its predictors (class, box, centerness) have a different kernel size",
        False,
    ),
    "head_options.tower_norm": Capability(
        "head_options.tower_norm",
        "its head tower convs have no GroupNorm (detectron2 RetinaNet)",
        False,
    ),
}

# What our model does today for each capability (per head where it differs).
OURS = {
    "backbone.stride_in_1x1": False,
    "backbone.out_norm": False,
    "fpn.p7_relu": True,
    "head_options.tower_norm": "gn",
}
OURS_PER_HEAD = {
    "atss": {"head_options.anchor_offset": 0.5, "head_options.pred_kernel_size": 1},
    "retinanet": {"head_options.anchor_offset": 0.0, "head_options.pred_kernel_size": 3},
}


@dataclass
class Gap:
    key: str
    reference: Any
    ours: Any
    what: str
    approximable: bool

    def describe(self) -> str:
        return f"{self.what} ({self.key} = {self.reference!r}; ours: {self.ours!r})"


@dataclass
class ReferenceModel:
    """What a reference checkpoint is: read from its keys and shapes, its config text, and the references' facts."""

    source: str
    backbone_kind: str  # "resnet" | "swin"
    backbone: str  # the timm model with the same weights layout
    head: str  # "atss" | "retinanet"
    num_classes: int
    fpn_channels: int
    extra_from: str
    num_blocks: int
    num_convs: int
    input_format: str
    pixel_mean: list[float]
    pixel_std: list[float]
    norm_eval: bool
    frozen_stages: int
    offset_mode: str
    zero_init_offset: bool
    nms_thresh: float
    anchor_scale: float
    requires: dict[str, Any]  # capability key -> what the reference does
    class_names: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Conversion:
    state_dict: dict[str, Tensor]  # ours, complete for ``model``
    model: dict[str, Any]  # the [model] table
    reference: ReferenceModel
    gaps: list[Gap]
    dropped: dict[str, list[str]]  # reason -> source keys
    notes: list[str]


# ---------------------------------------------------------------------------------------------------
# small helpers


def _one(state: dict[str, Tensor], suffix: str) -> str | None:
    """The key equal to or ending with ``.suffix`` (the shortest if several; None when absent)."""
    hits = [k for k in state if k == suffix or k.endswith("." + suffix)]
    return hits[0] if len(hits) == 1 else (None if not hits else min(hits, key=len))


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def _has(d: dict[str, Any], dotted: str) -> bool:
    try:
        _get(d, dotted)
        return True
    except (KeyError, TypeError):
        return False


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _config_value(text: str, name: str) -> str | None:
    """The first ``name=value`` in a Python config text (MMDetection's meta), as written; never evaluated."""
    match = re.search(rf"\b{name}\s*=\s*('[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|[\w.+-]+)", text)
    return match.group(1).strip("'\"") if match else None


def _config_floats(text: str, name: str) -> list[float] | None:
    raw = _config_value(text, name)
    if raw is None:
        return None
    try:
        return [float(x) for x in re.findall(r"-?\d+(?:\.\d*)?(?:e-?\d+)?", raw)]
    except ValueError:
        return None


def _list_keys(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------
# recognising the checkpoint


def check_source(state: dict[str, Tensor], source: str) -> None:
    """Refuse a wrong ``--from``, two-stage detectors and checkpoints without DyHead, naming what was found."""
    if source not in SOURCES:
        raise DyheadError(f"--from must be 'official' or 'mmdet', got {source!r}")
    keys = list(state)
    official = any(".dyhead_tower." in k or ".bottom_up." in k for k in keys)
    mmdet = any(".dyhead_blocks." in k or k.startswith(("bbox_head.", "neck.")) for k in keys)
    two_stage = [k for k in keys if k.startswith(("proposal_generator.", "roi_heads.", "rpn_head.", "roi_head."))]
    if two_stage:
        raise DyheadError(
            "this is a two-stage detector (Faster R-CNN + DyHead: keys like "
            f"{two_stage[0]}); dyhead has no RPN/ROI heads yet, so it cannot be converted"
        )
    if source == "official" and not official:
        hint = " (they look like MMDetection's: use --from mmdet)" if mmdet else ""
        raise DyheadError(f"no official DyHead keys (backbone.dyhead_tower.<i>., backbone.backbone.bottom_up.) found{hint}")
    if source == "mmdet" and not mmdet:
        hint = " (they look like the official code's: use --from official)" if official else ""
        raise DyheadError(f"no MMDetection DyHead keys (neck.1.dyhead_blocks.<i>., bbox_head.) found{hint}")
    tower = SOURCES[source][0]
    if not any(f".{tower}." in f".{k}" for k in keys):
        raise DyheadError(f"the checkpoint has no DyHead tower ('{tower}.<i>.' keys): not a DyHead detector")


def _dyhead_shape(state: dict[str, Tensor], source: str) -> tuple[int, int]:
    """(number of blocks, channels) of the reference tower."""
    tower = SOURCES[source][0]
    indices = {int(m.group(1)) for k in state if (m := re.search(rf"(?:^|\.){tower}\.(\d+)\.", k))}
    offset = [v for k, v in state.items() if re.search(rf"{tower}\.0\.(offset|spatial_conv_offset)\.weight$", k)]
    if not offset:
        raise DyheadError(f"the DyHead tower has no offset conv ('{tower}.0.offset.weight')")
    return max(indices) + 1, int(offset[0].shape[1])


def _resnet_name(blocks: list[int], bottleneck: bool, groups: int, width: int) -> str:
    import timm

    depth = RESNET_DEPTHS.get(tuple(blocks))
    if depth == 50 and not bottleneck:
        depth = 34
    if depth is None:
        raise DyheadError(f"a ResNet with {blocks} blocks per stage has no timm equivalent; pass --recipe with the right backbone")
    name = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{width // groups}d"
    if not timm.is_model(name):
        raise DyheadError(f"the checkpoint's backbone would be timm's '{name}', which timm does not have; pass --recipe")
    return name


def _swin_name(embed: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int) -> str:
    import timm

    size = SWIN_SIZES.get((embed, depths))
    if size is None:
        raise DyheadError(f"a Swin with embed dim {embed} and depths {list(depths)} has no timm equivalent; pass --recipe")
    for res in (224, 384):
        name = f"swin_{size}_patch4_window{window}_{res}"
        if timm.is_model(name):
            return name
    raise DyheadError(f"timm has no Swin-{size} with window {window}; pass --recipe")


def _swin_heads_expected(size_embed: int) -> tuple[int, ...]:
    return {96: (3, 6, 12, 24), 128: (4, 8, 16, 32), 192: (6, 12, 24, 48)}[size_embed]


@dataclass
class _Head:
    kind: str
    num_classes: int
    num_convs: int
    nms_thresh: float
    anchor_scale: float = 8.0  # ATSS: anchor side = anchor_scale * stride (official SIZES 8*stride; mmdet octave_base_scale)


def _read_head(state: dict[str, Tensor], source: str, config: str, requires: dict[str, Any], notes: list[str]) -> _Head:
    """Head type, classes, tower depth, predictor kernel, tower norm, anchor offset, NMS threshold."""
    if source == "official":
        if _one(state, "head.cls_logits.weight") and _one(state, "head.centerness.weight"):
            kind, cls_key, box_key, tower = "atss", "head.cls_logits.weight", "head.bbox_pred.weight", "head.cls_tower."
        elif _one(state, "head.cls_score.weight"):
            kind, cls_key, box_key, tower = "retinanet", "head.cls_score.weight", "head.bbox_pred.weight", "head.cls_subnet."
        else:
            raise DyheadError("unknown official head: expected head.cls_logits (ATSS) or head.cls_score (RetinaNet)")
    elif "bbox_head.atss_cls.weight" in state:
        kind, cls_key, box_key, tower = "atss", "bbox_head.atss_cls.weight", "bbox_head.atss_reg.weight", "bbox_head.cls_convs."
    elif "bbox_head.retina_cls.weight" in state:
        raise DyheadError(
            "MMDetection RetinaNet heads are not supported (their anchors are ordered ratio-major, ours "
            "size-major like detectron2's); only ATSS + DyHead checkpoints convert"
        )
    else:
        heads = sorted({k.split(".")[1] for k in state if k.startswith("bbox_head.")})
        raise DyheadError(f"unsupported MMDetection head ({', '.join(heads[:3])} under bbox_head.); only ATSSHead converts")
    num_anchors = state[box_key].shape[0] // 4
    num_classes = state[cls_key].shape[0] // num_anchors
    conv_key = re.compile(re.escape(tower) + r"(\d+)\.(?:conv\.)?weight$")
    num_convs = len({m.group(1) for k, v in state.items() if (m := conv_key.match(k)) and v.dim() == 4})
    requires["head_options.pred_kernel_size"] = int(state[cls_key].shape[-1])
    if num_convs:
        tower_keys = [k for k in state if k.startswith(tower)]
        if any("running_mean" in k for k in tower_keys):
            raise DyheadError("the head tower uses BatchNorm; only GroupNorm (or no norm) towers convert")
        has_gn = any(".gn." in k or (k.endswith(".weight") and state[k].dim() == 1) for k in tower_keys)
        requires["head_options.tower_norm"] = "gn" if has_gn else "none"

    if kind == "retinanet":
        requires["head_options.anchor_offset"] = 0.0  # detectron2 ANCHOR_GENERATOR.OFFSET default
        return _Head(kind, num_classes, num_convs, 0.5)  # detectron2 RETINANET.NMS_THRESH_TEST
    nms = 0.6
    if source == "official":
        requires["head_options.anchor_offset"] = 0.5  # configs/dyhead_*_atss_*.yaml: ANCHOR_GENERATOR.OFFSET 0.5
    elif _config_value(config, "center_offset") is not None:
        requires["head_options.anchor_offset"] = float(_config_value(config, "center_offset"))
    elif config:
        requires["head_options.anchor_offset"] = 0.0  # MMDetection's AnchorGenerator default
    else:
        # the "reproduction" and Swin-L configs (1x1 predictors) set center_offset=0.5, the "simple" one (3x3) does not
        guess = 0.5 if requires["head_options.pred_kernel_size"] == 1 else 0.0
        requires["head_options.anchor_offset"] = guess
        notes.append(f"no config text in the checkpoint: anchor centre offset {guess} inferred from the predictor kernel size")
    iou = re.search(r"nms\s*=\s*dict\([^)]*iou_threshold\s*=\s*([\d.]+)", config)
    if iou:
        nms = float(iou.group(1))
    stds, means = _config_floats(config, "target_stds"), _config_floats(config, "target_means")
    if (stds and stds != [0.1, 0.1, 0.2, 0.2]) or (means and any(means)):
        raise DyheadError(f"box coder means {means} / stds {stds}: ours decodes with weights (10, 10, 5, 5), i.e. stds (0.1, 0.1, 0.2, 0.2)")
    scales_per_octave = _config_value(config, "scales_per_octave")
    if scales_per_octave not in (None, "1"):
        raise DyheadError(f"scales_per_octave={scales_per_octave}: ours has one anchor per location")
    return _Head(kind, num_classes, num_convs, nms, float(_config_value(config, "octave_base_scale") or 8.0))


@dataclass
class _Backbone:
    kind: str
    name: str
    input: tuple[str, list[float], list[float]]  # (format, mean, std)
    norm_eval: bool
    frozen_stages: int


def _read_resnet(
    state: dict[str, Tensor], source: str, stem: str, config: str, style: str, requires: dict[str, Any], notes: list[str]
) -> _Backbone:
    if source == "official":
        prefix = stem[: -len("stem.conv1.weight")]
        block_key = re.compile(rf"^{re.escape(prefix)}res(\d)\.(\d+)\.conv1\.weight$")
        conv = lambda s, b, n: f"{prefix}res{s + 2}.{b}.conv{n}.weight"  # noqa: E731
        first_stage = 2
    else:
        block_key = re.compile(r"^backbone\.layer(\d)\.(\d+)\.conv1\.weight$")
        conv = lambda s, b, n: f"backbone.layer{s + 1}.{b}.conv{n}.weight"  # noqa: E731
        first_stage = 1
    found = [(int(m.group(1)) - first_stage, m.group(2)) for k in state if (m := block_key.match(k))]
    blocks = [len({b for s, b in found if s == stage}) for stage in range(4)]
    bottleneck = conv(0, 0, 3) in state
    width = int(state[conv(0, 0, 1)].shape[0])
    groups = width // int(state[conv(0, 0, 2)].shape[1]) if bottleneck else 1
    name = _resnet_name(blocks, bottleneck, groups, width)
    if style == "auto":
        if source == "official":
            style = "caffe"  # detectron2 RESNETS.STRIDE_IN_1X1 = True with MSRA R-50.pkl (configs/dyhead_r50_*)
        elif _config_value(config, "style"):
            style = _config_value(config, "style")
        elif config:
            style = "pytorch"  # MMDetection's ResNet default
        else:
            style = "caffe" if requires["head_options.pred_kernel_size"] == 1 else "pytorch"
            notes.append(
                f"no config text in the checkpoint: ResNet style '{style}' inferred (the 'reproduction' config "
                "is caffe, the 'simple' one pytorch); pass --resnet-style to say otherwise"
            )
    if style not in ("caffe", "pytorch"):
        raise DyheadError(f"--resnet-style must be auto, caffe or pytorch, got {style!r}")
    # a basic-block ResNet has no 1x1 conv: the caffe style moves nothing (detectron2's BasicBlock ignores STRIDE_IN_1X1)
    requires["backbone.stride_in_1x1"] = style == "caffe" and bottleneck
    # detectron2 FrozenBN / MMDetection norm_eval=True; official FREEZE_AT = -1, MMDetection frozen_stages=1 (stem + layer1)
    return _Backbone("resnet", name, CAFFE_BGR if style == "caffe" else IMAGENET_RGB, True, 0 if source == "official" else 2)


def _read_swin(state: dict[str, Tensor], source: str, patch: str, requires: dict[str, Any]) -> _Backbone:
    if source == "official":
        prefix = patch[: -len("patch_embed.proj.weight")]
        table = lambda s: f"{prefix}layers.{s}.blocks.0.attn.relative_position_bias_table"  # noqa: E731
        block_key = re.compile(rf"^{re.escape(prefix)}layers\.(\d)\.blocks\.(\d+)\.")
    else:
        table = lambda s: f"backbone.stages.{s}.blocks.0.attn.w_msa.relative_position_bias_table"  # noqa: E731
        block_key = re.compile(r"^backbone\.stages\.(\d)\.blocks\.(\d+)\.")
    embed = int(state[patch].shape[0])
    found = {(int(m.group(1)), m.group(2)) for k in state if (m := block_key.match(k))}
    depths = tuple(len({b for s, b in found if s == stage}) for stage in range(4))
    heads = tuple(int(state[table(s)].shape[1]) for s in range(4))
    window = (int(round(math.sqrt(state[table(0)].shape[0]))) + 1) // 2  # table rows: (2w - 1)^2
    name = _swin_name(embed, depths, heads, window)
    if heads != _swin_heads_expected(embed):
        raise DyheadError(f"Swin heads {list(heads)} do not match timm's {name}")
    requires["backbone.out_norm"] = True
    # official Swin-T config: INPUT.FORMAT RGB + ImageNet mean/std; MMDetection's Swin-L the same
    return _Backbone("swin", name, IMAGENET_RGB, False, 0)


def _read_backbone(
    state: dict[str, Tensor], source: str, config: str, style: str, requires: dict[str, Any], notes: list[str]
) -> _Backbone:
    if source == "official":
        stem, patch = _one(state, "bottom_up.stem.conv1.weight"), _one(state, "bottom_up.patch_embed.proj.weight")
    else:
        stem = "backbone.conv1.weight" if "backbone.conv1.weight" in state else None
        patch = "backbone.patch_embed.projection.weight" if "backbone.patch_embed.projection.weight" in state else None
    if stem is not None:
        return _read_resnet(state, source, stem, config, style, requires, notes)
    if patch is not None:
        return _read_swin(state, source, patch, requires)
    raise DyheadError("unknown backbone: expected a ResNet (stem.conv1 / conv1) or a Swin (patch_embed)")


def _read_fpn(state: dict[str, Tensor], source: str, config: str, requires: dict[str, Any]) -> tuple[int, str]:
    """(channels, extra_from) of the P3-P7 FPN; whether P7 follows a ReLU."""
    if source == "official":
        lateral = sorted(k for k in state if re.search(r"(?:^|\.)fpn_lateral\d+\.weight$", k))
        p6 = _one(state, "top_block.p6.weight")
        requires["fpn.p7_relu"] = True  # detectron2 LastLevelP6P7: p7 = conv(relu(p6))
    else:
        lateral = sorted(k for k in state if re.match(r"^neck\.0\.lateral_convs\.\d+\.conv\.weight$", k))
        p6 = "neck.0.fpn_convs.3.conv.weight" if "neck.0.fpn_convs.3.conv.weight" in state else None
        requires["fpn.p7_relu"] = _config_value(config, "relu_before_extra_convs") == "True"
    if not lateral:
        raise DyheadError("no FPN lateral convs found (fpn_lateral<i> / neck.0.lateral_convs.<i>)")
    if p6 is None:
        raise DyheadError("the FPN has no P6/P7 convs (top_block.p6 / neck.0.fpn_convs.3): only P3-P7 pyramids convert")
    channels = int(state[lateral[0]].shape[0])
    return channels, "p5" if int(state[p6].shape[1]) == channels else "c5"


def _read_offset_mode(source: str, meta: dict[str, Any], notes: list[str]) -> str:
    """The DyHead offset behaviour the weights were trained with (see docs/dyhead-design.md, "offset quirk").

    The official code and every MMDetection release (2.x and 3.x up to 3.3.0, the latest) read the whole
    offset/mask map of level l as a flat buffer for the level-(l+1) conv: "official". Only MMDetection's
    unreleased main branch after PR #11150 crops the mask ("mmdet"); such weights need --offset-mode mmdet.
    """
    if source == "mmdet":
        version = str(meta.get("mmdet_version") or "no version recorded")
        notes.append(
            f"MMDetection checkpoint ({version}): every MMDetection release passes the whole offset map to "
            "mmcv's kernel, which reads it as a flat buffer like the official code, so offset_mode = 'official'; "
            "weights trained on MMDetection's main branch after PR #11150 need --offset-mode mmdet"
        )
    return "official"


def _read_class_names(meta: dict[str, Any], num_classes: int, notes: list[str]) -> list[str]:
    classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if classes and len(classes) == num_classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    if num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    notes.append(f"{num_classes} classes and no class names in the checkpoint: class_names left empty")
    return []


def describe_reference(
    state: dict[str, Tensor],
    source: str,
    meta: dict[str, Any] | None = None,
    resnet_style: str = "auto",
    offset_mode: str | None = None,
) -> ReferenceModel:
    """Read what the reference model is from its keys/shapes (+ MMDetection's config text in ``meta``)."""
    meta = meta if isinstance(meta, dict) else {}
    config = str(meta.get("config") or meta.get("cfg") or "")  # MMDetection 2.x / 3.x keep the config text here
    notes: list[str] = []
    requires: dict[str, Any] = {}
    num_blocks, dy_channels = _dyhead_shape(state, source)
    head = _read_head(state, source, config, requires, notes)
    backbone = _read_backbone(state, source, config, resnet_style, requires, notes)
    fpn_channels, extra_from = _read_fpn(state, source, config, requires)
    if fpn_channels != dy_channels:
        raise DyheadError(f"FPN channels {fpn_channels} differ from DyHead channels {dy_channels}; ours share one width")
    fmt, mean, std = backbone.input
    frozen, zero_init = backbone.frozen_stages, False
    if source == "mmdet" and config:  # input normalisation and training-only settings, when the config says
        stages = _config_value(config, "frozen_stages")
        if stages is not None and re.fullmatch(r"-?\d+", stages):
            frozen = max(int(stages) + 1, 0)  # MMDetection counts stages after the stem; ours count the stem
        cfg_mean, cfg_std = _config_floats(config, "mean"), _config_floats(config, "std")
        to_rgb = _config_value(config, "to_rgb") or _config_value(config, "bgr_to_rgb")
        if cfg_mean and cfg_std and len(cfg_mean) == 3 and len(cfg_std) == 3 and to_rgb is not None:
            fmt, mean, std = ("RGB" if to_rgb == "True" else "BGR"), cfg_mean, cfg_std
        zero_init = _config_value(config, "zero_init_offset") != "False"  # MMDetection's default is True
    if offset_mode is None:
        offset_mode = _read_offset_mode(source, meta, notes)
    if offset_mode not in ("official", "mmdet", "aligned"):
        raise DyheadError(f"--offset-mode must be official, mmdet or aligned, got {offset_mode!r}")
    return ReferenceModel(
        source=source,
        backbone_kind=backbone.kind,
        backbone=backbone.name,
        head=head.kind,
        num_classes=head.num_classes,
        fpn_channels=fpn_channels,
        extra_from=extra_from,
        num_blocks=num_blocks,
        num_convs=head.num_convs,
        input_format=fmt,
        pixel_mean=[float(x) for x in mean],
        pixel_std=[float(x) for x in std],
        norm_eval=backbone.norm_eval,
        frozen_stages=frozen,
        offset_mode=offset_mode,
        zero_init_offset=zero_init,
        nms_thresh=head.nms_thresh,
        anchor_scale=head.anchor_scale,
        requires=requires,
        class_names=_read_class_names(meta, head.num_classes, notes),
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------
# the model section


def default_model_section(ref: ReferenceModel) -> dict[str, Any]:
    """The [model] table that rebuilds the reference detector (capability fields set where they exist)."""
    from dyhead_cli.recipe import ModelConfig, to_dict

    model = to_dict(ModelConfig())
    model.update(
        num_classes=ref.num_classes,
        class_names=list(ref.class_names),
        head=ref.head,
        input_format=ref.input_format,
        pixel_mean=list(ref.pixel_mean),
        pixel_std=list(ref.pixel_std),
    )
    model["backbone"].update(
        name=ref.backbone, pretrained=False, pretrained_file="", frozen_stages=ref.frozen_stages, norm_eval=ref.norm_eval
    )
    model["fpn"].update(channels=ref.fpn_channels, extra_from=ref.extra_from)
    model["dyhead"].update(num_blocks=ref.num_blocks, offset_mode=ref.offset_mode, zero_init_offset=ref.zero_init_offset)
    model["head_options"].update(
        num_convs=ref.num_convs, nms_thresh=ref.nms_thresh, score_thresh=0.05, pre_nms_top_n=1000, detections_per_img=100
    )
    if ref.head == "atss":
        model["head_options"].update(anchor_scale=ref.anchor_scale, atss_topk=9)
    elif "smooth_l1_beta" in model["head_options"]:
        # configs/dyhead_r50_retina_fpn_1x.yaml: detectron2's smooth L1 with SMOOTH_L1_LOSS_BETA 0 (training only)
        model["head_options"].update(box_loss="smooth_l1", smooth_l1_beta=0.0)
    return model


# [model] values that mean "the head's own default" (TOML has no null): see recipe.HeadOptions
HEAD_DEFAULT_SENTINELS = {"head_options.anchor_offset": -1.0, "head_options.pred_kernel_size": 0}


def _resolved(model: dict[str, Any], key: str, ours_now: dict[str, Any]) -> Any:
    """The value ``key`` has in ``model``, with a "head default" sentinel replaced by that default."""
    value = _get(model, key)
    if key in HEAD_DEFAULT_SENTINELS and value == HEAD_DEFAULT_SENTINELS[key]:
        return ours_now[key]
    return value


def find_gaps(ref: ReferenceModel, model: dict[str, Any], set_fields: bool = True) -> list[Gap]:
    """Differences our model cannot express. Where a capability field exists, set it (``set_fields``) or compare it."""
    from dyhead_cli.recipe import ModelConfig, to_dict

    schema = to_dict(ModelConfig())
    ours_now = {**OURS, **OURS_PER_HEAD[ref.head]}
    gaps = []
    for key, wanted in ref.requires.items():
        cap = CAPABILITIES[key]
        if _has(schema, key):
            if set_fields:
                _set(model, key, wanted)
            elif _resolved(model, key, ours_now) != wanted:
                gaps.append(Gap(key, wanted, _resolved(model, key, ours_now), cap.what, cap.approximable))
        elif wanted != ours_now[key]:
            gaps.append(Gap(key, wanted, ours_now[key], cap.what, cap.approximable))
    return gaps


# ---------------------------------------------------------------------------------------------------
# key mapping


class _Mapping:
    """Collects our tensors, the source keys used, and the source keys dropped (with a reason)."""

    def __init__(self, state: dict[str, Tensor], target: dict[str, Tensor]) -> None:
        self.state, self.target = state, target
        self.out: dict[str, Tensor] = {}
        self.used: set[str] = set()
        self.dropped: dict[str, list[str]] = defaultdict(list)
        self.filled: dict[str, list[str]] = defaultdict(list)

    def put(self, ours: str, src: str, value: Tensor | None = None) -> None:
        self.out[ours] = self.state[src] if value is None else value
        self.used.add(src)

    def drop(self, src: str, reason: str) -> None:
        self.dropped[reason].append(src)
        self.used.add(src)

    def fill(self, ours: str, value: Tensor, reason: str) -> None:
        self.out[ours] = value
        self.filled[reason].append(ours)

    def body(self, timm_key: str) -> str:
        """Our key for a timm key: ``backbone.body.`` + the name features_only gives it (``layers.1`` -> ``layers_1``)."""
        plain = f"backbone.body.{timm_key}"
        if plain in self.target:
            return plain
        return "backbone.body." + re.sub(r"^(layers|stages)\.(\d+)\.", r"\1_\2.", timm_key)

    def tower_targets(self, tower: str) -> tuple[list[str], list[str]]:
        """Our conv and GroupNorm module names in ``head.<tower>``, in order."""
        convs, norms = [], []
        for key, value in self.target.items():
            m = re.match(rf"^(head\.{tower}\.\d+)\.weight$", key)
            if m:
                (convs if value.dim() == 4 else norms).append(m.group(1))
        order = lambda name: int(name.rsplit(".", 1)[1])  # noqa: E731
        return sorted(convs, key=order), sorted(norms, key=order)


def _map_bn(mp: _Mapping, src: str, ours: str) -> None:
    """BatchNorm (or detectron2 FrozenBN) ``src`` -> timm BatchNorm ``ours``; running stats filled if absent (old FrozenBN)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        if f"{src}.{name}" in mp.state:
            mp.put(f"{ours}.{name}", f"{src}.{name}")
        elif name in ("running_mean", "running_var") and f"{src}.weight" in mp.state:
            shape = mp.state[f"{src}.weight"].shape
            value = torch.zeros(shape) if name == "running_mean" else torch.ones(shape)
            mp.fill(f"{ours}.{name}", value, "BatchNorm statistics absent (old detectron2 FrozenBN): mean 0, var 1")


def _map_resnet(mp: _Mapping, source: str) -> None:
    state = mp.state
    if source == "official":
        stem = _one(state, "bottom_up.stem.conv1.weight")
        prefix = stem[: -len("stem.conv1.weight")]
        mp.put("backbone.body.conv1.weight", stem)
        _map_bn(mp, f"{prefix}stem.conv1.norm", "backbone.body.bn1")
        pattern = re.compile(rf"^{re.escape(prefix)}res(\d)\.(\d+)\.(conv\d|shortcut)\.weight$")
        for key in list(state):
            m = pattern.match(key)
            if not m:
                continue
            stage, block, layer = int(m.group(1)), m.group(2), m.group(3)
            base = f"backbone.body.layer{stage - 1}.{block}"
            if layer == "shortcut":
                mp.put(f"{base}.downsample.0.weight", key)
                _map_bn(mp, f"{key[: -len('.weight')]}.norm", f"{base}.downsample.1")
            else:
                n = layer[-1]
                mp.put(f"{base}.conv{n}.weight", key)
                _map_bn(mp, f"{key[: -len('.weight')]}.norm", f"{base}.bn{n}")
    else:
        # MMDetection's ResNet mirrors torchvision's names, which are timm's.
        module = r"(?:conv1|bn1|layer\d\.\d+\.(?:conv\d|bn\d|downsample\.\d))"
        pattern = re.compile(rf"^backbone\.({module}\.(?:weight|bias|running_mean|running_var))$")
        for key in list(state):
            m = pattern.match(key)
            if m:
                mp.put(f"backbone.body.{m.group(1)}", key)


def _unfold_to_swin_order(value: Tensor) -> Tensor:
    """MMDetection's PatchMerging (nn.Unfold) channel order -> the original Swin/timm order.

    Inverse of ``correct_unfold_reduction_order``/``correct_unfold_norm_order`` in MMDetection's
    ``swin_converter``: unfold puts channel c of neighbour p at 4c + p with p in (x0, x2, x1, x3) order,
    Swin at p*C + c with (x0, x1, x2, x3).
    """
    if value.dim() == 1:
        c = value.shape[0] // 4
        return value.reshape(c, 4)[:, [0, 2, 1, 3]].transpose(0, 1).reshape(-1)  # (C, 4) -> (4, C)
    out_ch, in_ch = value.shape
    return value.reshape(out_ch, in_ch // 4, 4)[:, :, [0, 2, 1, 3]].transpose(1, 2).reshape(out_ch, in_ch)


def _map_swin(mp: _Mapping, source: str, out_norms: bool) -> None:
    state = mp.state
    if source == "official":
        patch = _one(state, "bottom_up.patch_embed.proj.weight")
        prefix = patch[: -len("patch_embed.proj.weight")]
        renames = [(r"^patch_embed\.(proj|norm)\.", r"patch_embed.\1."), (r"^layers\.(\d+)\.blocks\.", r"layers.\1.blocks.")]
        sub_block = {}
    else:
        prefix = "backbone."
        renames = [(r"^patch_embed\.projection\.", "patch_embed.proj."), (r"^patch_embed\.norm\.", "patch_embed.norm."),
                   (r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks.")]
        sub_block = {"attn.w_msa.": "attn.", "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2."}
    for key in list(state):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.endswith(("relative_position_index", "attn_mask")):
            mp.drop(key, "Swin relative-position index / attention-mask buffers (timm rebuilds them)")
            continue
        m = re.match(r"^(?:layers|stages)\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", rest)
        if m:  # references downsample at the end of stage i, timm at the start of stage i + 1
            value = state[key] if source == "official" else _unfold_to_swin_order(state[key])
            mp.put(mp.body(f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"), key, value)
            continue
        m = re.match(r"^norm(\d)\.(weight|bias)$", rest)
        if m:
            level = int(m.group(1))
            if level == 0:
                mp.drop(key, "output norm of the stride-4 stage (unused: the FPN starts at stride 8)")
            elif out_norms:
                mp.put(f"backbone.out_norms.{level - 1}.{m.group(2)}", key)
            continue  # left unused: reported as a gap (backbone.out_norm) by the caller
        for pattern, repl in renames:
            if re.match(pattern, rest):
                timm_key = re.sub(pattern, repl, rest)
                for old, new in sub_block.items():
                    timm_key = timm_key.replace(old, new)
                mp.put(mp.body(timm_key), key)
                break


def _map_fpn(mp: _Mapping, source: str) -> None:
    state = mp.state
    if source == "official":
        for key in list(state):
            m = re.search(r"(?:^|\.)fpn_(lateral|output)(\d+)\.(weight|bias)$", key)
            if m:
                levels = sorted({int(n.group(1)) for k in state if (n := re.search(r"fpn_lateral(\d+)\.weight$", k))})
                i = levels.index(int(m.group(2)))
                block = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
                mp.put(f"fpn.fpn.{block}.{i}.0.{m.group(3)}", key)
                continue
            m = re.search(r"(?:^|\.)top_block\.(p6|p7)\.(weight|bias)$", key)
            if m:
                mp.put(f"fpn.fpn.extra_blocks.{m.group(1)}.{m.group(2)}", key)
    else:
        for key in list(state):
            m = re.match(r"^neck\.0\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$", key)
            if not m:
                continue
            i = int(m.group(2))
            if m.group(1) == "lateral_convs":
                mp.put(f"fpn.fpn.inner_blocks.{i}.0.{m.group(3)}", key)
            elif i < 3:
                mp.put(f"fpn.fpn.layer_blocks.{i}.0.{m.group(3)}", key)
            elif i in (3, 4):
                mp.put(f"fpn.fpn.extra_blocks.p{i + 3}.{m.group(3)}", key)


def _map_dyhead(mp: _Mapping, source: str) -> None:
    tower = SOURCES[source][0]
    part = {k: v for k, v in mp.state.items() if re.search(rf"(?:^|\.){tower}\.\d+\.", k)}
    for ours, value in convert_dyhead(part, source).items():
        mp.out[f"dyhead.{ours}"] = value
    mp.used.update(part)
    if source == "mmdet":
        mp.filled["MMDetection's deformable convs have no bias (GroupNorm follows): zeros"] = [
            k for k in mp.out if re.match(r"^dyhead\.blocks\.\d+\.spatial_(high|mid|low)\.bias$", k)
        ]


def _map_tower(mp: _Mapping, src_prefix: str, ours: str, layout: str) -> None:
    """Reference tower convs (+GroupNorm) -> ours, matched by order.

    layout "official": Sequential [conv, GN, ReLU]* (or [conv, ReLU]* without norm);
    "mmdet": ConvModule list ``<i>.conv.weight`` (no bias before GN) + ``<i>.gn.weight/bias``.
    """
    state = mp.state
    convs, norms = mp.tower_targets(ours)
    if layout == "mmdet":
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(src_prefix) + r"(\d+)\.conv\.weight$", k))})
        for n, i in enumerate(indices):
            if n >= len(convs):
                return  # the completeness check lists the extra source keys
            mp.put(f"{convs[n]}.weight", f"{src_prefix}{i}.conv.weight")
            if f"{src_prefix}{i}.conv.bias" in state:
                mp.put(f"{convs[n]}.bias", f"{src_prefix}{i}.conv.bias")
            else:
                zeros = torch.zeros(state[f"{src_prefix}{i}.conv.weight"].shape[0])
                mp.fill(f"{convs[n]}.bias", zeros, "conv bias before GroupNorm: zeros")
            for name in ("weight", "bias"):
                if f"{src_prefix}{i}.gn.{name}" in state and n < len(norms):
                    mp.put(f"{norms[n]}.{name}", f"{src_prefix}{i}.gn.{name}")
        return
    weight_key = re.compile(re.escape(src_prefix) + r"(\d+)\.weight$")
    conv_idx = sorted({int(m.group(1)) for k, v in state.items() if (m := weight_key.match(k)) and v.dim() == 4})
    norm_idx = sorted({int(m.group(1)) for k, v in state.items() if (m := weight_key.match(k)) and v.dim() == 1})
    for n, i in enumerate(conv_idx[: len(convs)]):
        for name in ("weight", "bias"):
            if f"{src_prefix}{i}.{name}" in state:
                mp.put(f"{convs[n]}.{name}", f"{src_prefix}{i}.{name}")
    for n, i in enumerate(norm_idx[: len(norms)]):
        for name in ("weight", "bias"):
            if f"{src_prefix}{i}.{name}" in state:
                mp.put(f"{norms[n]}.{name}", f"{src_prefix}{i}.{name}")


def _map_head(mp: _Mapping, ref: ReferenceModel) -> None:
    state = mp.state
    if ref.source == "official":
        names = {"cls_logits": "cls_logits", "bbox_pred": "bbox_pred", "centerness": "centerness", "cls_score": "cls_logits"}
        for key in list(state):
            m = re.match(r"^head\.(cls_logits|bbox_pred|centerness|cls_score)\.(weight|bias)$", key)
            if m:
                mp.put(f"head.{names[m.group(1)]}.{m.group(2)}", key)
            m = re.match(r"^head\.scales\.(\d+)\.scale$", key)
            if m:
                mp.put(key, key, state[key].reshape(1))
        if ref.head == "atss":
            _map_tower(mp, "head.cls_tower.", "cls_tower", "official")
            _map_tower(mp, "head.bbox_tower.", "bbox_tower", "official")
        else:
            _map_tower(mp, "head.cls_subnet.", "cls_tower", "official")
            _map_tower(mp, "head.bbox_subnet.", "bbox_tower", "official")
    else:
        names = {"atss_cls": "cls_logits", "atss_reg": "bbox_pred", "atss_centerness": "centerness"}
        for key in list(state):
            m = re.match(r"^bbox_head\.(atss_cls|atss_reg|atss_centerness)\.(weight|bias)$", key)
            if m:
                mp.put(f"head.{names[m.group(1)]}.{m.group(2)}", key)
            m = re.match(r"^bbox_head\.scales\.(\d+)\.scale$", key)
            if m:
                mp.put(f"head.scales.{m.group(1)}.scale", key, state[key].reshape(1))  # mmcv Scale is 0-d
        _map_tower(mp, "bbox_head.cls_convs.", "cls_tower", "mmdet")
        _map_tower(mp, "bbox_head.reg_convs.", "bbox_tower", "mmdet")


def _drop_known_extras(mp: _Mapping) -> None:
    for key in mp.state:
        if key in mp.used:
            continue
        if key.endswith("num_batches_tracked"):
            mp.drop(key, "BatchNorm num_batches_tracked counters (ours start at 0)")
        elif key.startswith("anchor_generator.") or ".cell_anchors." in key:
            mp.drop(key, "anchor buffers (ours are computed from the config)")
        elif key in ("pixel_mean", "pixel_std"):
            mp.drop(key, "pixel_mean/pixel_std buffers (recorded in the model config)")


def map_state_dict(state: dict[str, Tensor], ref: ReferenceModel, target: dict[str, Tensor], out_norms: bool) -> _Mapping:
    """Map every key of a reference detector onto ``target`` (our model's state dict); nothing is checked yet."""
    mp = _Mapping(state, target)
    if ref.backbone_kind == "resnet":
        _map_resnet(mp, ref.source)
    else:
        _map_swin(mp, ref.source, out_norms)
    _map_fpn(mp, ref.source)
    _map_dyhead(mp, ref.source)
    _map_head(mp, ref)
    _drop_known_extras(mp)
    for key in target:
        if key.endswith("num_batches_tracked") and key not in mp.out:
            mp.out[key] = torch.zeros((), dtype=torch.long)
    return mp


def check_complete(mp: _Mapping, target: dict[str, Tensor]) -> None:
    """Every target key filled with the right shape, every source key used or dropped: else list them."""
    unmapped = sorted(k for k in mp.state if k not in mp.used)
    missing = sorted(k for k in target if k not in mp.out)
    unexpected = sorted(k for k in mp.out if k not in target)
    wrong = sorted(
        f"{k} {tuple(mp.out[k].shape)} vs ours {tuple(target[k].shape)}"
        for k in target
        if k in mp.out and tuple(mp.out[k].shape) != tuple(target[k].shape)
    )
    problems = []
    if unmapped:
        problems.append(f"unmapped source keys: {_list_keys(unmapped)}")
    if wrong:
        problems.append(f"shape mismatch: {_list_keys(wrong)}")
    if missing:
        problems.append(f"no source for our keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"mapped onto keys our model does not have: {_list_keys(unexpected)}")
    if problems:
        raise DyheadError("conversion incomplete: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# the whole conversion


def convert_state_dict(
    state: dict[str, Tensor],
    source: str,
    meta: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    offset_mode: str | None = None,
    resnet_style: str = "auto",
) -> Conversion:
    """Convert a reference detector's weights; returns our state dict, the [model] table, gaps and drops.

    ``model``: a [model] table to convert into (from ``--recipe``) instead of the one read from the
    checkpoint. Gaps that leave the weights usable are returned (the caller decides); the others raise.
    """
    from dyhead_cli.models.build import build_model
    from dyhead_cli.recipe import ModelConfig, from_dict

    check_source(state, source)
    ref = describe_reference(state, source, meta, resnet_style, offset_mode)
    notes = list(ref.notes)
    if model is None:
        model = default_model_section(ref)
        gaps = find_gaps(ref, model, set_fields=True)
    else:
        model = json.loads(json.dumps(model))
        model["backbone"].update(pretrained=False, pretrained_file="")  # the weights come from the checkpoint
        if offset_mode is not None:
            model["dyhead"]["offset_mode"] = offset_mode
        gaps = find_gaps(ref, model, set_fields=False)
        for key in ("input_format", "pixel_mean", "pixel_std"):
            if model[key] != getattr(ref, key):
                notes.append(f"the recipe's model.{key} = {model[key]!r}; the weights were trained with {getattr(ref, key)!r}")
        if model["dyhead"]["offset_mode"] != ref.offset_mode:
            notes.append(f"the recipe's offset_mode = {model['dyhead']['offset_mode']!r}; the weights want {ref.offset_mode!r}")
        if not model.get("class_names") and model.get("num_classes") == len(ref.class_names):
            model["class_names"] = list(ref.class_names)
    hard = [g for g in gaps if not g.approximable]
    if hard:
        raise DyheadError(
            "cannot convert: " + "; ".join(g.describe() for g in hard) + " - our model has no such option yet"
        )
    model_cfg = from_dict(ModelConfig, model, "model.")
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        target = build_model(model_cfg).state_dict()
    out_norms = any(k.startswith("backbone.out_norms.") for k in target)
    mp = map_state_dict(state, ref, target, out_norms)
    for gap in gaps:
        if gap.key == "backbone.out_norm":
            for key in state:
                if re.search(r"(?:^|\.)norm[123]\.(weight|bias)$", key) and key not in mp.used:
                    mp.drop(key, "Swin output-level LayerNorms (approximation: our backbone has none)")
    check_complete(mp, target)
    dropped = {reason: sorted(keys) for reason, keys in mp.dropped.items()}
    for reason, keys in mp.filled.items():
        if keys:
            notes.append(f"filled {len(keys)} tensors: {reason}")
    return Conversion(dict(mp.out), model, ref, gaps, dropped, notes)


@dataclass
class ConvertSummary:
    dst: Path
    recipe_toml: Path | None
    num_tensors: int
    num_source_keys: int
    dropped: dict[str, list[str]]
    gaps: list[Gap]
    notes: list[str]
    offset_mode: str
    backbone: str


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    source: str,
    recipe_path: str | Path | None = None,
    offset_mode: str | None = None,
    resnet_style: str = "auto",
    approximate: bool = False,
    overrides: list[str] | None = None,
    recipe_out: str | Path | None = None,
) -> ConvertSummary:
    """``dyhead convert``: read ``src`` safely, convert, write ``dst`` (+ its recipe as TOML next to it)."""
    from dyhead_cli.engine.checkpoint import load_model_weights, save_weights
    from dyhead_cli.models.build import build_model
    from dyhead_cli.recipe import Recipe, apply_overrides, dump_toml, load_recipe, recipe_from_dict, to_dict

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise DyheadError(f"the destination must be a .safetensors file, got {dst}")
    state, info = read_reference_checkpoint(src)
    if recipe_path is not None:
        recipe = to_dict(load_recipe(recipe_path))
        model = recipe["model"]
    else:
        recipe = to_dict(Recipe(name=dst.stem))
        model = None
    conv = convert_state_dict(state, source, info.get("meta"), model, offset_mode, resnet_style)
    if conv.gaps and not approximate:
        raise DyheadError(
            f"cannot convert {src.name} faithfully: "
            + "; ".join(g.describe() for g in conv.gaps)
            + ". Our model has no option for this yet; --approximate converts anyway (numbers will differ: "
            "a starting point for fine-tuning, not the published AP)"
        )
    recipe["model"] = conv.model
    recipe = to_dict(recipe_from_dict(apply_overrides(recipe, list(overrides or []))))
    detector = build_model(recipe_from_dict(recipe).model)
    load_model_weights(detector, conv.state_dict, source=f"the converted {src.name} (after --set)")
    dropped = dict(conv.dropped)
    if info.get("containers"):
        dropped["top-level entries other than the weights (optimizer, scheduler, meta...)"] = list(info["containers"])
    if info.get("not_tensors"):
        dropped["non-tensor entries in the weights"] = list(info["not_tensors"])
    extra = {
        "converted_from": {
            "file": src.name,
            "source": source,
            "reference_backbone": conv.reference.backbone,
            "offset_mode": recipe["model"]["dyhead"]["offset_mode"],
            "approximations": [dataclasses.asdict(g) for g in conv.gaps],
            "dropped": {reason: len(keys) for reason, keys in dropped.items()},
            "notes": conv.notes,
        }
    }
    save_weights(dst, detector, recipe, extra)
    toml_path = Path(recipe_out) if recipe_out is not None else dst.with_suffix(".toml")
    toml_path.write_text(
        f"# written by: dyhead convert {src.name} {dst.name} --from {source}\n"
        f"# evaluate with: dyhead eval {toml_path.name} --weights {dst.name}\n" + dump_toml(recipe)
    )
    return ConvertSummary(
        dst=dst,
        recipe_toml=toml_path,
        num_tensors=len(conv.state_dict),
        num_source_keys=len(state),
        dropped=dropped,
        gaps=conv.gaps,
        notes=conv.notes,
        offset_mode=recipe["model"]["dyhead"]["offset_mode"],
        backbone=recipe["model"]["backbone"]["name"],
    )
