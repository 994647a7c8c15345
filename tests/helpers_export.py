"""Test helpers for ``dyhead export``: tiny checkpoints, exporting both formats from one trace, comparing."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_detection import tiny_config
from torch import Tensor
from torchvision.ops import box_iou

from dyhead_cli.engine.checkpoint import save_weights
from dyhead_cli.engine.export import (
    ExportOptions,
    export_metadata,
    prepare,
    save_onnx,
    save_torch_export,
    trace,
)
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import DyHeadConfig, Recipe, to_dict


def tiny_checkpoint(path: Path, head: str, offset_mode: str | None, seed: int = 0, **head_options) -> torch.nn.Module:
    """A random tiny detector (``offset_mode`` None = no DyHead, else one block in that mode), saved with
    its recipe; returns the model in eval mode. A low candidate threshold keeps plenty of detections."""
    torch.manual_seed(seed)
    cfg = tiny_config(head, 0 if offset_mode is None else 1, score_thresh=0.02, **head_options)
    if offset_mode is not None:
        cfg.dyhead = DyHeadConfig(num_blocks=1, offset_mode=offset_mode)
    model = build_model(cfg).eval()
    with torch.no_grad():  # livelier class logits than the prior's -4.6, so NMS and the caps have work to do
        model.head.cls_logits.bias.add_(3.0)
    save_weights(path, model, to_dict(Recipe(model=cfg)))
    return model


def export_both(weights: Path, out_dir: Path, postprocess: bool, size=(256, 256)) -> tuple[Path, Path]:
    """One dynamic trace saved as .pt2 and as .onnx (what ``export_model`` does, sharing the trace)."""
    stem = out_dir / f"{weights.stem}-{'det' if postprocess else 'raw'}"
    paths = []
    for fmt, suffix in (("torch-export", ".pt2"), ("onnx", ".onnx")):
        opts = ExportOptions(format=fmt, size=size, dynamic=True, postprocess=postprocess)
        if fmt == "torch-export":
            det, wrapper = prepare(weights, opts)
            names = wrapper.output_names(5)
            program = trace(wrapper, opts)
            save_torch_export(program, stem.with_suffix(suffix), export_metadata(det, opts, names, weights))
        else:
            save_onnx(program, stem.with_suffix(suffix), export_metadata(det, opts, names, weights), opts, names)
        paths.append(stem.with_suffix(suffix))
    return paths[0], paths[1]


def padded_batch(batch: int, size: tuple[int, int], seed: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Random 0..255 images (B, 3, H, W); image 1 (when there is one) is smaller, the rest zero padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *size, generator=g) * 255
    sizes = [tuple(size)] * batch
    if batch > 1:
        h, w = size[0] - 53, size[1] - 91
        images[1, :, h:, :] = 0
        images[1, :, :, w:] = 0
        sizes[1] = (h, w)
    return images, sizes


def assert_same_detections(got: dict[str, Tensor], ref: dict[str, Tensor], iou: float = 0.99, score: float = 1e-4) -> None:
    """Every reference detection has its own counterpart: same label, IoU > ``iou``, score within ``score``."""
    assert len(got["scores"]) == len(ref["scores"]), (len(got["scores"]), len(ref["scores"]))
    if len(ref["scores"]) == 0:
        return
    ious = box_iou(ref["boxes"].float(), got["boxes"].float())
    fits = (ious > iou) & (ref["labels"][:, None] == got["labels"][None, :].long())
    fits &= (ref["scores"][:, None] - got["scores"][None, :].float()).abs() < score
    used = torch.zeros(len(got["scores"]), dtype=torch.bool)
    for i in range(len(ref["scores"])):
        free = (fits[i] & ~used).nonzero().flatten()
        assert len(free), (
            f"reference detection {i} (label {int(ref['labels'][i])}, score {float(ref['scores'][i]):.5f}) has no match"
        )
        used[free[0]] = True
