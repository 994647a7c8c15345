"""Running a trained detector: load it from a checkpoint, choose the device, run batches, turn its
detections into COCO result rows in the data set's own category ids.

Category ids: with an annotation file, its category ids (matched to the model's classes by name, else
by position among the sorted ids when the counts agree); otherwise the checkpoint's (metadata
``category_ids``), else the categories of the recipe's ``data.val_ann`` when that file is there and names
the same classes, else 1..K.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dyhead_cli.data.loaders import alone_groups
from dyhead_cli.engine import recipes
from dyhead_cli.engine.checkpoint import load_model_weights, load_weights
from dyhead_cli.engine.recipe_fit import check_recipe_fits
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import ModelConfig, Recipe

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # the choices of every --device option and of train.device


@dataclass
class LoadedDetector:
    model: nn.Module
    recipe: Recipe
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def load_detector(weights: Path, recipe_path: Path | None = None, overrides: Sequence[str] = ()) -> LoadedDetector:
    """Rebuild the model from the checkpoint's recipe (or ``recipe_path``), load its weights, eval mode.

    The checkpoint is complete: the backbone is built without its pretrained weights (no download, no
    ``pretrained_file`` read), since every tensor comes from the checkpoint.
    """
    state, meta = load_checkpoint(weights)
    stored = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else None
    if recipe_path is not None:
        recipe = recipes.load(recipe_path, list(overrides))
        check_recipe_fits(recipe, meta, recipe_path, weights)
        names = (stored or {}).get("model", {}).get("class_names") or []
        if not recipe.model.class_names and names and recipe.model.num_classes in (len(names), 80):
            recipe.model.class_names, recipe.model.num_classes = list(names), len(names)
    elif stored is not None:
        recipe = recipes.from_dict(json.loads(json.dumps(stored)), list(overrides))
    else:
        raise DyheadError(f"{weights} carries no recipe in its metadata: pass --recipe (or convert it with 'dyhead convert')")
    model = build_for_weights(recipe.model)
    load_model_weights(model, state, source=str(weights))
    model.eval()
    names = list(recipe.model.class_names) or [f"class_{k}" for k in range(recipe.model.num_classes)]
    return LoadedDetector(model, recipe, names, meta)


def build_for_weights(cfg: ModelConfig) -> nn.Module:
    """``build_model`` for a model whose weights are loaded next: no pretrained backbone weights are fetched
    or read (``pretrained = false``, ``pretrained_file = ""``); ``cfg`` itself is left as it is."""
    backbone = dataclasses.replace(cfg.backbone, pretrained=False, pretrained_file="")
    return build_model(dataclasses.replace(cfg, backbone=backbone))


REFERENCE_SUFFIXES = (".pth", ".pt", ".pkl", ".bin", ".ckpt", ".tar")


def load_checkpoint(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``load_weights``, with a hint to ``dyhead convert`` when ``weights`` is not one of our checkpoints."""
    weights = Path(weights)
    if weights.is_dir():
        raise DyheadError(
            f"--weights {weights} is a folder: give a .safetensors checkpoint (e.g. {weights / 'best.safetensors'})"
        )
    try:
        return load_weights(weights)
    except DyheadError:
        if weights.is_file() and weights.suffix.lower() == ".pt2":
            raise DyheadError(
                f"{weights} is a torch.export program (dyhead export --format torch-export), which predict does not run: "
                f"give the .safetensors checkpoint it came from, or an ONNX export (.onnx)"
            ) from None
        if weights.is_file() and (weights.suffix.lower() in REFERENCE_SUFFIXES or not is_safetensors(weights)):
            target = weights.with_name(f"{weights.stem}_dyhead.safetensors")  # never the source's own name
            raise DyheadError(
                f"{weights} is not a dyhead checkpoint (.safetensors); an official or MMDetection checkpoint must be "
                f"converted first: dyhead convert {weights} {target.name} --from official|mmdet"
            ) from None
        raise


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (100 << 20)


def category_ids(det: LoadedDetector, ann_categories: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """[{"id", "name"}] per model label 0..K-1: the data set's own category ids (see the module docstring)."""
    k = len(det.class_names)
    named = bool(det.recipe.model.class_names)
    if ann_categories is not None:
        cats = match_categories(det.class_names, named, ann_categories)
        if cats is None:
            have = ", ".join(c["name"] for c in ann_categories)
            raise DyheadError(
                f"the annotation file's {len(ann_categories)} categories ({have}) do not match the model's {k} classes "
                f"({', '.join(det.class_names)})"
            )
        return cats
    stored = det.meta.get("category_ids")
    if isinstance(stored, list) and len(stored) == k and all(isinstance(i, int) for i in stored):
        return [{"id": i, "name": n} for i, n in zip(stored, det.class_names)]
    val_ann = Path(det.recipe.data.val_ann) if det.recipe.data.val_ann else None
    if val_ann is not None and val_ann.is_file():
        try:
            data = json.loads(val_ann.read_bytes())
            found = sorted(
                ({"id": c["id"], "name": str(c.get("name", c["id"]))} for c in data["categories"]), key=lambda c: c["id"]
            )
            cats = match_categories(det.class_names, named, found)
            if cats is not None:
                return cats
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no usable data set file: fall back to 1..K
    return [{"id": i + 1, "name": n} for i, n in enumerate(det.class_names)]


def match_categories(class_names: list[str], named: bool, cats: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    by_name = {c["name"]: c for c in cats}
    if named and len(by_name) == len(cats) and all(n in by_name for n in class_names):
        return [{"id": by_name[n]["id"], "name": n} for n in class_names]
    if len(cats) == len(class_names) and not named:
        return [dict(c) for c in cats]  # the data set's order: label k = k-th smallest id
    return None


def choose_device(name: str) -> torch.device:
    """auto (CUDA when there is one) | cpu | cuda[:N]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DyheadError(f"--device {name}: no CUDA device is available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DyheadError(f"--device {name!r} is not a device (try cuda or cuda:0)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DyheadError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        return device
    raise DyheadError(f"--device must be auto, cpu or cuda[:N], got {name!r}")


def autocast_dtype(half: bool, bf16: bool, device: torch.device) -> torch.dtype | None:
    if half and bf16:
        raise DyheadError("--half and --bf16 exclude each other")
    if half:
        if device.type != "cuda":
            raise DyheadError("--half (float16) needs a CUDA device; use --bf16 on CPU")
        return torch.float16
    if bf16:
        return torch.bfloat16
    return None


def forward_alone(model: nn.Module, images: torch.Tensor, sizes, orig_sizes, size_divisibility: int | None) -> list[dict]:
    """``model(images, sizes)`` with each image padded as if it were alone (see ``data.loaders.alone_groups``):
    a batch of mixed padded sizes runs one size group at a time, cropped to it. ``images`` (B, 3, Hp, Wp)
    with each image at the top left; ``size_divisibility`` None runs the batch as it is."""
    if getattr(model, "pads_itself", False):  # a fixed-size ONNX graph pads every input to its own size anyway
        size_divisibility = None
    groups = alone_groups(sizes, size_divisibility) if size_divisibility else []
    if len(groups) <= 1 and (not groups or groups[0][1] == tuple(images.shape[-2:])):
        return model(images, sizes, original_sizes=orig_sizes)
    out: list[dict] = [{} for _ in sizes]
    for indices, (h, w) in groups:
        part = images if len(indices) == len(sizes) else images[indices]
        found = model(
            part[:, :, :h, :w].contiguous(), [sizes[i] for i in indices], original_sizes=[orig_sizes[i] for i in indices]
        )
        for i, det in zip(indices, found):
            out[i] = det
    return out


def run_model(
    model: nn.Module,
    images: torch.Tensor,
    sizes,
    orig_sizes,
    device: torch.device,
    dtype: torch.dtype | None,
    size_divisibility: int | None = None,
) -> list[dict]:
    """The detector under autocast (each image padded alone with ``size_divisibility``, see
    ``forward_alone``); an op without a kernel for the autocast type is a user-facing error."""
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return forward_alone(model, images, sizes, orig_sizes, size_divisibility)
    except (RuntimeError, NotImplementedError) as e:
        if dtype is not None and ("BFloat16" in str(e) or "Half" in str(e)):
            flag = "--bf16" if dtype == torch.bfloat16 else "--half"
            raise DyheadError(
                f"{flag}: an op of this model has no {dtype} kernel on {device.type} ({str(e).splitlines()[0][-120:]}); run without {flag}"
            ) from None
        raise


@torch.no_grad()
def predict_coco(
    model: nn.Module,
    loader,
    device: torch.device,
    cat_of_label: list[int],
    autocast_dtype=None,
    progress=None,
    size_divisibility: int | None = None,
) -> list[dict]:
    """Run ``model`` over a loader of the data set's collated batches (through ``run_model``: each image
    padded alone with ``size_divisibility``); return COCO result dicts."""
    model.eval()
    results: list[dict] = []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        sizes, orig = batch["image_sizes"], batch["orig_sizes"]
        detections = run_model(model, images, sizes, orig, device, autocast_dtype, size_divisibility)
        for image_id, det in zip(batch["image_ids"], detections):
            results.extend(detections_to_coco(det, int(image_id), cat_of_label))
        if progress is not None:
            progress(len(batch["image_ids"]))
    return results


def detections_to_coco(det: dict, image_id: int, cat_of_label: list[int]) -> list[dict]:
    boxes = det["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = det["scores"].float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    return [
        {
            "image_id": image_id,
            "category_id": int(cat_of_label[label]),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for box, score, label in zip(xywh, scores, labels)
    ]
