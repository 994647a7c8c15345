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

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

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
# COCO's category id of each of COCO_CLASSES (instances_*2017.json: 1..90 with gaps); the references'
# label k is the k-th smallest id
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

CAFFE_BGR = ("BGR", [103.530, 116.280, 123.675], [1.0, 1.0, 1.0])  # MSRA / detectron2 caffe ResNets
IMAGENET_RGB = ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])  # torchvision ResNets, Swin

RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
SWIN_SIZES = {
    (96, (2, 2, 6, 2)): "tiny",
    (96, (2, 2, 18, 2)): "small",
    (128, (2, 2, 18, 2)): "base",
    (192, (2, 2, 18, 2)): "large",
}


@dataclass(frozen=True)
class Capability:
    """A way the reference model can differ from ours, and the [model] field that would express it.

    ``OURS`` (and each head's ``DEFAULTS``) say what our model does while the field does not exist; ``approximable``
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
# How each reference runs inference beyond the weights: its dense post-processing (models/heads/postprocess.py).
# The multiple its images are padded to is read per checkpoint (``ReferenceModel.size_divisibility``).
REFERENCE_SETTINGS = {
    "official": {"postprocess": "official"},
    "mmdet": {"postprocess": "mmdet"},
}

OURS = {
    "backbone.stride_in_1x1": False,
    "backbone.out_norm": False,
    "fpn.p7_relu": True,
    "head_options.tower_norm": "gn",
}


@dataclass
class Gap:
    """A difference between the reference's model and ours: an option our model lacks, or (``in_recipe``)
    a recipe field that ``--recipe`` sets otherwise than the weights want."""

    key: str
    reference: Any
    ours: Any
    what: str
    approximable: bool
    in_recipe: bool = False

    def describe(self) -> str:
        if self.in_recipe:
            return f"the recipe's model.{self.key} = {self.ours!r}, the weights want {self.reference!r} ({self.what})"
        return f"{self.what} ({self.key} = {self.reference!r}; ours: {self.ours!r})"


def gaps_advice(gaps: list[Gap]) -> str:
    """What to do about ``gaps``: set the recipe's fields, and/or wait for the options our model lacks."""
    advice = []
    if any(g.in_recipe for g in gaps):
        advice.append("set the recipe's value (or convert without --recipe)")
    if any(not g.in_recipe for g in gaps):
        advice.append("our model has no option for this yet")
    return "; ".join(advice)


@dataclass
class ReferenceModel:
    """What a reference checkpoint is: read from its keys and shapes, its config text, and the references' facts."""

    source: str
    backbone_kind: str  # "resnet" | "swin"
    backbone: str  # the timm model with the same weights layout
    head: str  # "atss" | "retinanet" | "faster_rcnn"
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
    fpn_levels: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])  # [2, .., 6]: P6 = max-pool(P5)
    fc_dim: int = 1024  # Faster R-CNN's box head width
    frozen_norm: bool = False  # BatchNorm weights not trained (detectron2 FrozenBN, MMDetection requires_grad=False)
    resize_backend: str = "cv2"  # how it resizes images (see reference_resize_backend)
    size_divisibility: int = 32  # the multiple its test images are padded to (see reference_size_divisibility)


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


def one(state: dict[str, Tensor], suffix: str) -> str | None:
    """The key equal to or ending with ``.suffix`` (the shortest if several; None when absent)."""
    hits = [k for k in state if k == suffix or k.endswith("." + suffix)]
    return hits[0] if len(hits) == 1 else (None if not hits else min(hits, key=len))


def get_dotted(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def has_dotted(d: dict[str, Any], dotted: str) -> bool:
    try:
        get_dotted(d, dotted)
        return True
    except (KeyError, TypeError):
        return False


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def config_value(text: str, name: str) -> str | None:
    """The first ``name=value`` in a Python config text (MMDetection's meta), as written; never evaluated."""
    match = re.search(rf"\b{name}\s*=\s*('[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|[\w.+-]+)", text)
    return match.group(1).strip("'\"") if match else None


def config_floats(text: str, name: str) -> list[float] | None:
    raw = config_value(text, name)
    if raw is None:
        return None
    try:
        return [float(x) for x in re.findall(r"-?\d+(?:\.\d*)?(?:e-?\d+)?", raw)]
    except ValueError:
        return None


def list_keys(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


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
        name=ref.backbone,
        pretrained=False,
        pretrained_file="",
        frozen_stages=ref.frozen_stages,
        norm_eval=ref.norm_eval,
        frozen_norm=ref.frozen_norm,
    )
    model["fpn"].update(channels=ref.fpn_channels, extra_from=ref.extra_from)
    model["dyhead"].update(num_blocks=ref.num_blocks, offset_mode=ref.offset_mode, zero_init_offset=ref.zero_init_offset)
    model["head_options"].update(
        num_convs=ref.num_convs,
        nms_thresh=ref.nms_thresh,
        score_thresh=0.05,
        pre_nms_top_n=1000,
        detections_per_img=100,
        postprocess=REFERENCE_SETTINGS[ref.source]["postprocess"],
    )
    if ref.head == "faster_rcnn":
        # configs/dyhead_r50_rcnn_fpn_1x.yaml on detectron2's defaults: P2-P6 (LastLevelMaxPool), anchors
        # 32..512 = 8 x stride, 1000 proposals (pre-NMS 2000 train / 1000 test per level), 512 RoIs per image
        model["fpn"].update(levels=list(ref.fpn_levels), top_block="maxpool")
        model["head_options"].update(anchor_scale=8.0)
        model["rcnn"].update(fc_dim=ref.fc_dim)
    elif ref.head == "atss":
        model["head_options"].update(anchor_scale=ref.anchor_scale, atss_topk=9)
    elif "smooth_l1_beta" in model["head_options"]:
        # configs/dyhead_r50_retina_fpn_1x.yaml: detectron2's smooth L1 with SMOOTH_L1_LOSS_BETA 0 (training only)
        model["head_options"].update(box_loss="smooth_l1", smooth_l1_beta=0.0)
    return model


def _resolved(model: dict[str, Any], key: str, ours_now: dict[str, Any]) -> Any:
    """The value ``key`` has in ``model``; an unset (None) head option is the head's own default."""
    value = get_dotted(model, key)
    return ours_now.get(key) if value is None else value


def find_gaps(ref: ReferenceModel, model: dict[str, Any], set_fields: bool = True) -> list[Gap]:
    """Differences our model cannot express. Where a capability field exists, set it (``set_fields``) or compare it."""
    from dyhead_cli.recipe import ModelConfig, to_dict

    schema = to_dict(ModelConfig())
    from dyhead_cli.models.heads import HEADS

    ours_now = {**OURS, **{f"head_options.{k}": v for k, v in HEADS[ref.head].defaults.items()}}
    gaps = []
    for key, wanted in ref.requires.items():
        cap = CAPABILITIES[key]
        if has_dotted(schema, key):
            if set_fields:
                set_dotted(model, key, wanted)
            elif _resolved(model, key, ours_now) != wanted:
                gaps.append(Gap(key, wanted, _resolved(model, key, ours_now), cap.what, cap.approximable, in_recipe=True))
        elif wanted != ours_now[key]:
            gaps.append(Gap(key, wanted, ours_now[key], cap.what, cap.approximable))
    return gaps
