"""What a reference checkpoint was trained with, read from its keys, shapes and meta: backbone, FPN,
DyHead (blocks, channels, offset mode), head, classes, pixel statistics."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dyhead_cli.convert.capabilities import (
    CAFFE_BGR,
    COCO_CLASSES,
    IMAGENET_RGB,
    RESNET_DEPTHS,
    SWIN_SIZES,
    ReferenceModel,
    config_floats,
    config_value,
    one,
)
from dyhead_cli.convert.dyhead_keys import SOURCES
from dyhead_cli.errors import DyheadError

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
    if two_stage and source == "mmdet":
        raise DyheadError(
            f"this is an MMDetection two-stage detector (keys like {two_stage[0]}); only the official (detectron2) "
            "Faster R-CNN + DyHead converts (--from official)"
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
        raise DyheadError(
            f"a ResNet with {blocks} blocks per stage has no timm equivalent; pass --recipe with the right backbone"
        )
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
    fc_dim: int = 1024  # Faster R-CNN: the box head's width


def _read_head(state: dict[str, Tensor], source: str, config: str, requires: dict[str, Any], notes: list[str]) -> _Head:
    """Head type, classes, tower depth, predictor kernel, tower norm, anchor offset, NMS threshold."""
    if source == "official" and any(k.startswith(("proposal_generator.", "roi_heads.")) for k in state):
        return _read_rcnn_head(state)
    if source == "official":
        if one(state, "head.cls_logits.weight") and one(state, "head.centerness.weight"):
            kind, cls_key, box_key, tower = "atss", "head.cls_logits.weight", "head.bbox_pred.weight", "head.cls_tower."
        elif one(state, "head.cls_score.weight"):
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
    elif any(k.startswith(("bbox_head.atss_reg.", "bbox_head.atss_centerness.")) for k in state):
        raise DyheadError("an MMDetection ATSS head without bbox_head.atss_cls.weight: the checkpoint is incomplete")
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
    elif config_value(config, "center_offset") is not None:
        requires["head_options.anchor_offset"] = float(config_value(config, "center_offset"))
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
    stds, means = config_floats(config, "target_stds"), config_floats(config, "target_means")
    if (stds and stds != [0.1, 0.1, 0.2, 0.2]) or (means and any(means)):
        raise DyheadError(
            f"box coder means {means} / stds {stds}: ours decodes with weights (10, 10, 5, 5), i.e. stds (0.1, 0.1, 0.2, 0.2)"
        )
    scales_per_octave = config_value(config, "scales_per_octave")
    if scales_per_octave not in (None, "1"):
        raise DyheadError(f"scales_per_octave={scales_per_octave}: ours has one anchor per location")
    return _Head(kind, num_classes, num_convs, nms, float(config_value(config, "octave_base_scale") or 8.0))


RCNN_KEYS = (  # detectron2's StandardRPNHead and StandardROIHeads (2-fc box head, FastRCNNOutputLayers)
    "proposal_generator.rpn_head.conv.weight", "proposal_generator.rpn_head.objectness_logits.weight",
    "proposal_generator.rpn_head.anchor_deltas.weight", "roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc2.weight",
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight",
)  # fmt: skip


def _read_rcnn_head(state: dict[str, Tensor]) -> _Head:
    """The official Faster R-CNN + DyHead (configs/dyhead_r50_rcnn_fpn_1x.yaml): detectron2's RPN (3 anchors per
    location: one size 8 x stride, aspect ratios 0.5/1/2) and RoI heads (K + 1 scores, background last;
    class-specific deltas, 4 per class). Box NMS 0.5 (ROI_HEADS.NMS_THRESH_TEST)."""
    missing = [k for k in RCNN_KEYS if k not in state]
    if missing:
        raise DyheadError(f"incomplete two-stage detector: no {', '.join(missing[:3])}")
    dense = [k for k in state if k.startswith("head.")]
    if dense:
        raise DyheadError(f"the checkpoint has both two-stage heads (roi_heads.*) and a one-stage head ({dense[0]})")
    num_anchors = int(state["proposal_generator.rpn_head.objectness_logits.weight"].shape[0])
    if num_anchors != 3:
        raise DyheadError(f"the RPN has {num_anchors} anchors per location; ours has 3 (aspect ratios 0.5, 1, 2)")
    num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    box_rows = int(state["roi_heads.box_predictor.bbox_pred.weight"].shape[0])
    if box_rows != 4 * num_classes:
        raise DyheadError(
            f"box regression has {box_rows} outputs for {num_classes} classes: only class-specific (4 x K) converts"
        )
    return _Head("faster_rcnn", num_classes, 0, 0.5, fc_dim=int(state["roi_heads.box_head.fc1.weight"].shape[0]))


@dataclass
class _Backbone:
    kind: str
    name: str
    input: tuple[str, list[float], list[float]]  # (format, mean, std)
    norm_eval: bool
    frozen_stages: int
    frozen_norm: bool = False


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
        elif config_value(config, "style"):
            style = config_value(config, "style")
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
    # detectron2 FrozenBN / MMDetection norm_eval=True; official FREEZE_AT = -1, MMDetection frozen_stages=1 (stem + layer1).
    # BatchNorm weights: fixed in detectron2 (FrozenBN) and in MMDetection's caffe configs (norm_cfg
    # requires_grad=False), trained in its pytorch-style ones; describe_reference reads a config's own word.
    return _Backbone(
        "resnet", name, CAFFE_BGR if style == "caffe" else IMAGENET_RGB, True, 0 if source == "official" else 2, style == "caffe"
    )


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
        stem, patch = one(state, "bottom_up.stem.conv1.weight"), one(state, "bottom_up.patch_embed.proj.weight")
    else:
        stem = "backbone.conv1.weight" if "backbone.conv1.weight" in state else None
        patch = "backbone.patch_embed.projection.weight" if "backbone.patch_embed.projection.weight" in state else None
    if stem is not None:
        return _read_resnet(state, source, stem, config, style, requires, notes)
    if patch is not None:
        return _read_swin(state, source, patch, requires)
    raise DyheadError("unknown backbone: expected a ResNet (stem.conv1 / conv1) or a Swin (patch_embed)")


def _read_fpn(state: dict[str, Tensor], source: str, config: str, requires: dict[str, Any]) -> tuple[int, str, list[int]]:
    """(channels, extra_from, levels) of the FPN: P3-P7 with P6/P7 convs (whether P7 follows a ReLU), or the
    official R-CNN's P2-P6 with P6 = max-pool(P5) (laterals from C2, no top-block weights)."""
    if source == "official":
        lateral = sorted(k for k in state if re.search(r"(?:^|\.)fpn_lateral\d+\.weight$", k))
        p6 = one(state, "top_block.p6.weight")
        requires["fpn.p7_relu"] = True  # detectron2 LastLevelP6P7: p7 = conv(relu(p6))
    else:
        lateral = sorted(k for k in state if re.match(r"^neck\.0\.lateral_convs\.\d+\.conv\.weight$", k))
        p6 = "neck.0.fpn_convs.3.conv.weight" if "neck.0.fpn_convs.3.conv.weight" in state else None
        requires["fpn.p7_relu"] = config_value(config, "relu_before_extra_convs") == "True"
    if not lateral:
        raise DyheadError("no FPN lateral convs found (fpn_lateral<i> / neck.0.lateral_convs.<i>)")
    channels = int(state[lateral[0]].shape[0])
    if source == "official" and p6 is None and any(k.endswith("fpn_lateral2.weight") for k in lateral):
        requires.pop("fpn.p7_relu")
        return channels, "p5", [2, 3, 4, 5, 6]  # detectron2's LastLevelMaxPool: no weights
    if p6 is None:
        raise DyheadError("the FPN has no P6/P7 convs (top_block.p6 / neck.0.fpn_convs.3): only P3-P7 pyramids convert")
    return channels, "p5" if int(state[p6].shape[1]) == channels else "c5", [3, 4, 5, 6, 7]


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
    fpn_channels, extra_from, fpn_levels = _read_fpn(state, source, config, requires)
    if (head.kind == "faster_rcnn") != (fpn_levels[0] == 2):
        raise DyheadError(
            f"a {head.kind} head on a P{fpn_levels[0]}-P{fpn_levels[-1]} pyramid: ours pairs Faster R-CNN with P2-P6 only"
        )
    if fpn_channels != dy_channels:
        raise DyheadError(f"FPN channels {fpn_channels} differ from DyHead channels {dy_channels}; ours share one width")
    fmt, mean, std = backbone.input
    frozen, zero_init, frozen_norm = backbone.frozen_stages, False, backbone.frozen_norm
    if source == "mmdet" and config:  # input normalisation and training-only settings, when the config says
        stages = config_value(config, "frozen_stages")
        if stages is not None and re.fullmatch(r"-?\d+", stages):
            frozen = max(int(stages) + 1, 0)  # MMDetection counts stages after the stem; ours count the stem
        cfg_mean, cfg_std = config_floats(config, "mean"), config_floats(config, "std")
        to_rgb = config_value(config, "to_rgb") or config_value(config, "bgr_to_rgb")
        if cfg_mean and cfg_std and len(cfg_mean) == 3 and len(cfg_std) == 3 and to_rgb is not None:
            fmt, mean, std = ("RGB" if to_rgb == "True" else "BGR"), cfg_mean, cfg_std
        zero_init = config_value(config, "zero_init_offset") != "False"  # MMDetection's default is True
        trained = config_value(config, "requires_grad")  # the backbone's norm_cfg, the config's first
        if backbone.kind == "resnet" and trained in ("True", "False"):
            frozen_norm = trained == "False"
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
        frozen_norm=frozen_norm,
        offset_mode=offset_mode,
        zero_init_offset=zero_init,
        nms_thresh=head.nms_thresh,
        anchor_scale=head.anchor_scale,
        fpn_levels=fpn_levels,
        fc_dim=head.fc_dim,
        requires=requires,
        class_names=_read_class_names(meta, head.num_classes, notes),
        notes=notes,
        size_divisibility=reference_size_divisibility(source, fpn_levels, config),
        resize_backend=reference_resize_backend(source, config),
    )


def reference_resize_backend(source: str, config: str) -> str:
    """How a reference resizes its images (``data.transforms.RESIZE_BACKENDS``): the official code through
    detectron2, which resizes uint8 images with Pillow's bilinear; MMDetection with its ``Resize`` step's
    ``backend`` (OpenCV by default; the DyHead reproduction and Swin-L configs say 'pillow')."""
    if source == "official":
        return "pillow"
    for step in re.finditer(r"type\s*=\s*['\"]Resize['\"]", config):
        backend = re.search(r"\bbackend\s*=\s*['\"](\w+)['\"]", enclosing_call(config, step.start()))
        if backend and backend.group(1) == "pillow":
            return "pillow"
    return "cv2"


def enclosing_call(text: str, pos: int) -> str:
    """The argument text of the innermost ``(...)`` around ``pos`` (nested brackets skipped): the whole
    ``dict(type='Resize', scale=(1333, 800), backend='pillow')`` around its ``type=``."""
    depth, start = 0, -1
    for i in range(pos - 1, -1, -1):
        if text[i] in ")]":
            depth += 1
        elif text[i] in "([":
            if depth == 0:
                start = i
                break
            depth -= 1
    if start < 0:
        return ""
    depth = 0
    for i in range(pos, len(text)):
        if text[i] in "([":
            depth += 1
        elif text[i] in ")]":
            if depth == 0:
                return text[start + 1 : i]
            depth -= 1
    return text[start + 1 :]


def reference_size_divisibility(source: str, fpn_levels: list[int], config: str) -> int:
    """The multiple a reference pads its test images to.

    Official: the DyHead backbone's ``size_divisibility`` is its last output stride (``dyhead/dyhead.py``):
    128 for P3-P7 (ATSS, RetinaNet), 64 for Faster R-CNN's P2-P6. MMDetection: the config's
    ``pad_size_divisor`` (3.x DetDataPreprocessor) or its ``Pad`` step's ``size_divisor`` (2.x); the
    DyHead "simple" config pads to 32, the "reproduction" and Swin-L ones to 128; 32 without a config.
    """
    if source == "official":
        return 2 ** fpn_levels[-1]
    for name in ("pad_size_divisor", "size_divisor"):
        value = config_value(config, name)
        if value is not None and re.fullmatch(r"\d+", value) and int(value) > 0:
            return int(value)
    return 32
