"""The DyHead tower's key map from the reference implementations' state dicts to ours.

``convert_dyhead`` handles the DyHead tower of the official code (``dyhead_tower.<i>.``) and of
MMDetection (``dyhead_blocks.<i>.``), whatever prefix comes before (``backbone.``, ``neck.1.``...).
The whole detector (backbone, FPN, head) is converted in ``convert/mapping.py``.

``read_reference_checkpoint`` reads ``.pth``/``.pkl``/``.safetensors`` files without ever running code a
pickle names: torch files go through ``torch.load(weights_only=True)`` (NumPy arrays and scalars are the
only extra types allowed in), plain pickles (detectron2's ``.pkl``: a dict of NumPy arrays) through an
unpickler that resolves nothing but NumPy's array/dtype/scalar reconstructors. Anything else is refused
with a one-line message saying how to re-save the weights.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from dyhead_cli.errors import DyheadError

# reference key (after "<tower>.<i>.") -> our key (after "blocks.<i>.")
OFFICIAL_KEYS = {
    "DyConv.0.conv.weight": "spatial_high.weight",
    "DyConv.0.conv.bias": "spatial_high.bias",
    "DyConv.0.bn.weight": "spatial_high.norm.weight",
    "DyConv.0.bn.bias": "spatial_high.norm.bias",
    "DyConv.1.conv.weight": "spatial_mid.weight",
    "DyConv.1.conv.bias": "spatial_mid.bias",
    "DyConv.1.bn.weight": "spatial_mid.norm.weight",
    "DyConv.1.bn.bias": "spatial_mid.norm.bias",
    "DyConv.2.conv.weight": "spatial_low.weight",
    "DyConv.2.conv.bias": "spatial_low.bias",
    "DyConv.2.bn.weight": "spatial_low.norm.weight",
    "DyConv.2.bn.bias": "spatial_low.norm.bias",
    "offset.weight": "offset.weight",
    "offset.bias": "offset.bias",
    "AttnConv.1.weight": "scale_attn.weight",
    "AttnConv.1.bias": "scale_attn.bias",
    "relu.fc.0.weight": "task_attn.fc1.weight",
    "relu.fc.0.bias": "task_attn.fc1.bias",
    "relu.fc.2.weight": "task_attn.fc2.weight",
    "relu.fc.2.bias": "task_attn.fc2.bias",
}

MMDET_KEYS = {
    "spatial_conv_high.conv.weight": "spatial_high.weight",
    "spatial_conv_high.norm.weight": "spatial_high.norm.weight",
    "spatial_conv_high.norm.bias": "spatial_high.norm.bias",
    "spatial_conv_mid.conv.weight": "spatial_mid.weight",
    "spatial_conv_mid.norm.weight": "spatial_mid.norm.weight",
    "spatial_conv_mid.norm.bias": "spatial_mid.norm.bias",
    "spatial_conv_low.conv.weight": "spatial_low.weight",
    "spatial_conv_low.norm.weight": "spatial_low.norm.weight",
    "spatial_conv_low.norm.bias": "spatial_low.norm.bias",
    "spatial_conv_offset.weight": "offset.weight",
    "spatial_conv_offset.bias": "offset.bias",
    "scale_attn_module.1.weight": "scale_attn.weight",
    "scale_attn_module.1.bias": "scale_attn.bias",
    "task_attn_module.conv1.conv.weight": "task_attn.fc1.weight",
    "task_attn_module.conv1.conv.bias": "task_attn.fc1.bias",
    "task_attn_module.conv2.conv.weight": "task_attn.fc2.weight",
    "task_attn_module.conv2.conv.bias": "task_attn.fc2.bias",
}

SOURCES = {"official": ("dyhead_tower", OFFICIAL_KEYS), "mmdet": ("dyhead_blocks", MMDET_KEYS)}


def convert_dyhead(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Return the DyHead part of a reference ``state_dict`` under our ``DyHead`` key names.

    Keys outside the tower are ignored (a whole detector's state dict may be passed). MMDetection's
    deformable convs have no bias (GroupNorm follows): we fill zeros, which computes the same thing.
    A key inside the tower that we do not know is an error listing the keys.
    """
    if source not in SOURCES:
        raise DyheadError(f"convert_dyhead: source must be 'official' or 'mmdet', got {source!r}")
    tower, table = SOURCES[source]
    pattern = re.compile(rf"(?:^|\.){tower}\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        match = pattern.search(key)
        if match is None:
            continue
        index, rest = match.groups()
        if rest not in table:
            unknown.append(key)
            continue
        ours = f"blocks.{index}.{table[rest]}"
        if ours.endswith(("fc1.weight", "fc2.weight")) and value.dim() == 4:
            value = value.flatten(1)  # 1x1 conv (O, I, 1, 1) -> Linear (O, I)
        out[ours] = value
    if unknown:
        raise DyheadError(f"convert_dyhead: unknown {source} DyHead keys: {', '.join(sorted(unknown))}")
    if not out:
        raise DyheadError(f"convert_dyhead: no '{tower}.<i>.' keys found in the {source} state dict")
    if source == "mmdet":
        for key in [
            k
            for k in out
            if k.endswith("spatial_mid.weight") or k.endswith("spatial_low.weight") or k.endswith("spatial_high.weight")
        ]:
            bias_key = key[: -len("weight")] + "bias"
            out.setdefault(bias_key, torch.zeros(out[key].shape[0], dtype=out[key].dtype))
    return out
