"""Every source key of a reference checkpoint onto our ``Detector``'s state dict, or listed as dropped.

Backbone ``backbone.body.*`` = timm's own names, FPN ``fpn.fpn.*`` = torchvision's, DyHead ``dyhead.*``
through ``convert_dyhead``, head ``head.*``. An unmapped key, a missing one or a shape mismatch is a
``DyheadError`` that lists the keys.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import Tensor

from dyhead_cli.convert.capabilities import ReferenceModel, list_keys, one
from dyhead_cli.convert.dyhead_keys import SOURCES, convert_dyhead
from dyhead_cli.errors import DyheadError

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
        stem = one(state, "bottom_up.stem.conv1.weight")
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
        patch = one(state, "bottom_up.patch_embed.proj.weight")
        prefix = patch[: -len("patch_embed.proj.weight")]
        renames = [(r"^patch_embed\.(proj|norm)\.", r"patch_embed.\1."), (r"^layers\.(\d+)\.blocks\.", r"layers.\1.blocks.")]
        sub_block = {}
    else:
        prefix = "backbone."
        renames = [
            (r"^patch_embed\.projection\.", "patch_embed.proj."),
            (r"^patch_embed\.norm\.", "patch_embed.norm."),
            (r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks."),
        ]
        sub_block = {"attn.w_msa.": "attn.", "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2."}
    for key in list(state):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
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


# per source: the head's key prefix, its predictor names -> ours, its tower prefixes (cls, box) per head
HEAD_KEYS = {
    "official": (
        "head.",
        {"cls_logits": "cls_logits", "bbox_pred": "bbox_pred", "centerness": "centerness", "cls_score": "cls_logits"},
        {"atss": ("cls_tower", "bbox_tower"), "retinanet": ("cls_subnet", "bbox_subnet")},
    ),
    "mmdet": (
        "bbox_head.",
        {"atss_cls": "cls_logits", "atss_reg": "bbox_pred", "atss_centerness": "centerness"},
        {"atss": ("cls_convs", "reg_convs")},
    ),
}


def _map_head(mp: _Mapping, ref: ReferenceModel) -> None:
    """Predictors, per-level scales and towers of a dense head (see ``HEAD_KEYS``)."""
    state = mp.state
    prefix, names, towers = HEAD_KEYS[ref.source]
    pattern = re.compile(rf"^{re.escape(prefix)}({'|'.join(names)})\.(weight|bias)$")
    for key in list(state):
        m = pattern.match(key)
        if m:
            mp.put(f"head.{names[m.group(1)]}.{m.group(2)}", key)
        m = re.match(rf"^{re.escape(prefix)}scales\.(\d+)\.scale$", key)
        if m:  # mmcv's Scale is 0-d, ours (1,)
            mp.put(f"head.scales.{m.group(1)}.scale", key, state[key].reshape(1))
    cls_tower, box_tower = towers.get(ref.head, towers["atss"])
    _map_tower(mp, f"{prefix}{cls_tower}.", "cls_tower", ref.source)
    _map_tower(mp, f"{prefix}{box_tower}.", "bbox_tower", ref.source)


def _map_rcnn_head(mp: _Mapping) -> None:
    """detectron2's RPN and RoI heads -> ours: the same modules under other names (our class order is
    detectron2's, background last, and our deltas are class-major like its ``bbox_pred``: nothing to permute)."""
    renames = {
        "proposal_generator.rpn_head.": "head.rpn.",
        "roi_heads.box_head.": "head.box_head.",
        "roi_heads.box_predictor.": "head.box_predictor.",
    }
    pattern = re.compile(
        r"^(proposal_generator\.rpn_head\.|roi_heads\.box_head\.|roi_heads\.box_predictor\.)"
        r"(conv|objectness_logits|anchor_deltas|fc1|fc2|cls_score|bbox_pred)\.(weight|bias)$"
    )
    for key in list(mp.state):
        m = pattern.match(key)
        if m:
            mp.put(f"{renames[m.group(1)]}{m.group(2)}.{m.group(3)}", key)


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
    if ref.head == "faster_rcnn":
        _map_rcnn_head(mp)
    else:
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
        problems.append(f"unmapped source keys: {list_keys(unmapped)}")
    if wrong:
        problems.append(f"shape mismatch: {list_keys(wrong)}")
    if missing:
        problems.append(f"no source for our keys: {list_keys(missing)}")
    if unexpected:
        problems.append(f"mapped onto keys our model does not have: {list_keys(unexpected)}")
    if problems:
        raise DyheadError("conversion incomplete: " + "; ".join(problems))
