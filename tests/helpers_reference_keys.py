"""Synthetic reference checkpoints: the exact key names and shapes the references save, random values.

Generated from the architecture descriptions of the reference code, independently of the converter:
- official DyHead (microsoft/DynamicHead on detectron2): ``backbone.backbone.bottom_up.*`` (detectron2 ResNet:
  ``stem.conv1`` + ``res2..res5.<b>.conv1/2/3`` with FrozenBN ``.norm.{weight,bias,running_mean,running_var}``
  and ``.shortcut``; or the DyHead repo's Swin ``patch_embed.proj``, ``layers.<i>.blocks.<j>``,
  ``layers.<i>.downsample`` at the END of stage i, ``norm1..3``), FPN ``backbone.backbone.fpn_lateral<l>`` /
  ``fpn_output<l>`` / ``top_block.p6|p7``, tower ``backbone.dyhead_tower.<i>.``, ATSS ``head.cls_logits``,
  ``head.bbox_pred``, ``head.centerness``, ``head.scales.<i>.scale`` (shape (1,)); RetinaNet
  ``head.cls_subnet.<2i>``, ``head.cls_score``.
- MMDetection: ``backbone.conv1``, ``backbone.bn1``, ``backbone.layer<s>.<b>.conv<n>/bn<n>/downsample.0|1``
  (BatchNorm with ``num_batches_tracked``), or Swin ``backbone.patch_embed.projection``,
  ``backbone.stages.<i>.blocks.<j>.attn.w_msa.*``, ``ffn.layers.0.0`` / ``ffn.layers.1``, PatchMerging in
  ``nn.Unfold`` channel order, ``backbone.norm1..3``; FPN ``neck.0.lateral_convs.<i>.conv``,
  ``neck.0.fpn_convs.<0..4>.conv``; tower ``neck.1.dyhead_blocks.<i>.``; ATSS ``bbox_head.atss_cls``,
  ``atss_reg``, ``atss_centerness`` (``pred_kernel_size`` x ``pred_kernel_size``), ``bbox_head.scales.<i>.scale``
  (0-d, mmcv's ``Scale``).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
Shapes = dict[str, tuple[int, ...]]


def resnet_stage_channels(depth: int) -> list[int]:
    """C2..C5 output channels."""
    base = 256 if depth >= 50 else 64
    return [base * 2**s for s in range(4)]


# ---------------------------------------------------------------------------------------------------
# backbones


def detectron2_resnet_shapes(prefix: str, depth: int = 50) -> Shapes:
    shapes: Shapes = {}

    def conv_norm(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"{name}.weight"] = (out, inp, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{p}"] = (out,)

    bottleneck = depth >= 50
    conv_norm(f"{prefix}stem.conv1", 64, 3, 7)
    in_ch = 64
    for s, (n, out) in enumerate(zip(BLOCKS[depth], resnet_stage_channels(depth))):
        width = 64 * 2**s
        for b in range(n):
            base = f"{prefix}res{s + 2}.{b}"
            if b == 0 and in_ch != out:
                conv_norm(f"{base}.shortcut", out, in_ch, 1)
            if bottleneck:
                conv_norm(f"{base}.conv1", width, in_ch, 1)
                conv_norm(f"{base}.conv2", width, width, 3)
                conv_norm(f"{base}.conv3", out, width, 1)
            else:
                conv_norm(f"{base}.conv1", out, in_ch, 3)
                conv_norm(f"{base}.conv2", out, out, 3)
            in_ch = out
    return shapes


def mmdet_resnet_shapes(depth: int = 50) -> Shapes:
    shapes: Shapes = {}

    def conv_bn(conv: str, bn: str, out: int, inp: int, k: int) -> None:
        shapes[f"backbone.{conv}.weight"] = (out, inp, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"backbone.{bn}.{p}"] = (out,)
        shapes[f"backbone.{bn}.num_batches_tracked"] = ()

    bottleneck = depth >= 50
    conv_bn("conv1", "bn1", 64, 3, 7)
    in_ch = 64
    for s, (n, out) in enumerate(zip(BLOCKS[depth], resnet_stage_channels(depth))):
        width = 64 * 2**s
        for b in range(n):
            base = f"layer{s + 1}.{b}"
            if bottleneck:
                conv_bn(f"{base}.conv1", f"{base}.bn1", width, in_ch, 1)
                conv_bn(f"{base}.conv2", f"{base}.bn2", width, width, 3)
                conv_bn(f"{base}.conv3", f"{base}.bn3", out, width, 1)
            else:
                conv_bn(f"{base}.conv1", f"{base}.bn1", out, in_ch, 3)
                conv_bn(f"{base}.conv2", f"{base}.bn2", out, out, 3)
            if b == 0 and in_ch != out:
                conv_bn(f"{base}.downsample.0", f"{base}.downsample.1", out, in_ch, 1)
            in_ch = out
    return shapes


# ---------------------------------------------------------------------------------------------------
# FPN, DyHead, heads


def fpn_shapes(source: str, in_channels: list[int], channels: int) -> Shapes:
    shapes: Shapes = {}
    for i, c_in in enumerate(in_channels):
        if source == "official":
            lateral, output = f"backbone.backbone.fpn_lateral{i + 3}", f"backbone.backbone.fpn_output{i + 3}"
        else:
            lateral, output = f"neck.0.lateral_convs.{i}.conv", f"neck.0.fpn_convs.{i}.conv"
        shapes[f"{lateral}.weight"], shapes[f"{lateral}.bias"] = (channels, c_in, 1, 1), (channels,)
        shapes[f"{output}.weight"], shapes[f"{output}.bias"] = (channels, channels, 3, 3), (channels,)
    for level, name in ((6, "p6"), (7, "p7")):
        conv = f"backbone.backbone.top_block.{name}" if source == "official" else f"neck.0.fpn_convs.{level - 3}.conv"
        shapes[f"{conv}.weight"], shapes[f"{conv}.bias"] = (channels, channels, 3, 3), (channels,)
    return shapes


def dyhead_shapes(source: str, channels: int, num_blocks: int) -> Shapes:
    c = channels
    shapes: Shapes = {}
    for i in range(num_blocks):
        if source == "official":
            p = f"backbone.dyhead_tower.{i}."
            for k in range(3):
                shapes[f"{p}DyConv.{k}.conv.weight"] = (c, c, 3, 3)
                shapes[f"{p}DyConv.{k}.conv.bias"] = (c,)
                shapes[f"{p}DyConv.{k}.bn.weight"] = (c,)
                shapes[f"{p}DyConv.{k}.bn.bias"] = (c,)
            shapes[f"{p}AttnConv.1.weight"], shapes[f"{p}AttnConv.1.bias"] = (1, c, 1, 1), (1,)
            shapes[f"{p}relu.fc.0.weight"], shapes[f"{p}relu.fc.0.bias"] = (c // 4, c), (c // 4,)
            shapes[f"{p}relu.fc.2.weight"], shapes[f"{p}relu.fc.2.bias"] = (4 * c, c // 4), (4 * c,)
            shapes[f"{p}offset.weight"], shapes[f"{p}offset.bias"] = (27, c, 3, 3), (27,)
        else:
            p = f"neck.1.dyhead_blocks.{i}."
            for k in ("high", "mid", "low"):
                shapes[f"{p}spatial_conv_{k}.conv.weight"] = (c, c, 3, 3)
                shapes[f"{p}spatial_conv_{k}.norm.weight"] = (c,)
                shapes[f"{p}spatial_conv_{k}.norm.bias"] = (c,)
            shapes[f"{p}spatial_conv_offset.weight"], shapes[f"{p}spatial_conv_offset.bias"] = (27, c, 3, 3), (27,)
            shapes[f"{p}scale_attn_module.1.weight"], shapes[f"{p}scale_attn_module.1.bias"] = (1, c, 1, 1), (1,)
            shapes[f"{p}task_attn_module.conv1.conv.weight"] = (c // 4, c, 1, 1)
            shapes[f"{p}task_attn_module.conv1.conv.bias"] = (c // 4,)
            shapes[f"{p}task_attn_module.conv2.conv.weight"] = (4 * c, c // 4, 1, 1)
            shapes[f"{p}task_attn_module.conv2.conv.bias"] = (4 * c,)
    return shapes


def atss_head_shapes(source: str, channels: int, num_classes: int, pred_kernel_size: int = 1) -> Shapes:
    k = pred_kernel_size
    if source == "official":
        names, scale = ("head.cls_logits", "head.bbox_pred", "head.centerness"), (1,)
        prefix = "head.scales"
    else:
        names, scale = ("bbox_head.atss_cls", "bbox_head.atss_reg", "bbox_head.atss_centerness"), ()
        prefix = "bbox_head.scales"
    shapes: Shapes = {}
    for name, out in zip(names, (num_classes, 4, 1)):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, channels, k, k), (out,)
    for i in range(5):
        shapes[f"{prefix}.{i}.scale"] = scale
    return shapes


def retinanet_head_shapes(channels: int, num_classes: int, num_convs: int = 4, num_anchors: int = 9) -> Shapes:
    shapes: Shapes = {}
    for tower in ("cls_subnet", "bbox_subnet"):
        for i in range(num_convs):
            shapes[f"head.{tower}.{2 * i}.weight"], shapes[f"head.{tower}.{2 * i}.bias"] = (channels, channels, 3, 3), (channels,)
    shapes["head.cls_score.weight"], shapes["head.cls_score.bias"] = (
        (num_anchors * num_classes, channels, 3, 3),
        (num_anchors * num_classes,),
    )
    shapes["head.bbox_pred.weight"], shapes["head.bbox_pred.bias"] = (num_anchors * 4, channels, 3, 3), (num_anchors * 4,)
    return shapes


# ---------------------------------------------------------------------------------------------------
# whole detectors


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, Tensor]:
    """Random values; tensors over 64k elements get one random value each (cheap on a 2-core CI)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif math.prod(shape) > 65536:
            out[key] = torch.full(shape, float(torch.randn((), generator=g)) * 0.05)
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out


def atss_dyhead_shapes(
    source: str,
    depth: int = 50,
    channels: int = 256,
    num_blocks: int = 6,
    num_classes: int = 80,
    pred_kernel_size: int = 1,
) -> Shapes:
    """ATSS + DyHead on a ResNet: the whole detector's key -> shape, as the reference saves it."""
    if source == "official":
        shapes = detectron2_resnet_shapes("backbone.backbone.bottom_up.", depth)
    else:
        shapes = mmdet_resnet_shapes(depth)
    shapes.update(fpn_shapes(source, resnet_stage_channels(depth)[1:], channels))
    shapes.update(dyhead_shapes(source, channels, num_blocks))
    shapes.update(atss_head_shapes(source, channels, num_classes, pred_kernel_size))
    return shapes


def atss_r50_dyhead(source: str, seed: int = 0, **kwargs) -> dict[str, Tensor]:
    return random_state(atss_dyhead_shapes(source, **kwargs), seed)


# ---------------------------------------------------------------------------------------------------
# timm weights under the references' names (for backbone parity)


def timm_resnet_to_detectron2(body: dict[str, Tensor], prefix: str = "backbone.backbone.bottom_up.") -> dict[str, Tensor]:
    """timm ResNet keys -> detectron2's (``bn`` statistics carried, ``num_batches_tracked`` left out: FrozenBN)."""
    out = {}
    for key, value in body.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = key
        name = re.sub(r"^conv1\.weight$", "stem.conv1.weight", name)
        name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
        name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
        name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
        name = name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[prefix + name] = value
    return out


def timm_resnet_to_mmdet(body: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"backbone.{k}": v for k, v in body.items()}


def _dotted(key: str) -> str:
    return re.sub(r"^layers_(\d+)\.", r"layers.\1.", key)


def window_index(window: int) -> Tensor:
    """Swin's relative_position_index buffer (the references save it)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def timm_swin_to_official(
    body: dict[str, Tensor], out_channels: list[int], prefix: str = "backbone.backbone.bottom_up."
) -> dict[str, Tensor]:
    """timm Swin (features_only) -> the DyHead repo's SwinTransformer keys, + output norms norm1..3 and index buffers."""
    out = {}
    g = torch.Generator().manual_seed(7)
    for key, value in body.items():
        name = _dotted(key)
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", name)
        if m:  # timm downsamples at the start of stage i, the reference at the end of stage i - 1
            name = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[prefix + name] = value
        if name.endswith("attn.relative_position_bias_table"):
            window = (int(round(value.shape[0] ** 0.5)) + 1) // 2
            out[prefix + name.replace("relative_position_bias_table", "relative_position_index")] = window_index(window)
    for level, c in zip((1, 2, 3), out_channels):
        out[f"{prefix}norm{level}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        out[f"{prefix}norm{level}.bias"] = 0.1 * torch.randn(c, generator=g)
    return out


def swin_to_unfold_order(value: Tensor) -> Tensor:
    """MMDetection's ``swin_converter`` reordering (original Swin PatchMerging -> nn.Unfold order), verbatim logic."""
    if value.dim() == 1:
        c = value.shape[0]
        return value.reshape(4, c // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(c)
    out_ch, in_ch = value.shape
    return value.reshape(out_ch, 4, in_ch // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_ch, in_ch)


def timm_swin_to_mmdet(body: dict[str, Tensor], out_channels: list[int]) -> dict[str, Tensor]:
    official = timm_swin_to_official(body, out_channels, prefix="")
    out = {}
    for key, value in official.items():
        name = key.replace("patch_embed.proj.", "patch_embed.projection.")
        name = re.sub(r"^layers\.", "stages.", name)
        name = (
            name.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        )
        if ".downsample." in name:
            value = swin_to_unfold_order(value)
        out[f"backbone.{name}"] = value
    return out
