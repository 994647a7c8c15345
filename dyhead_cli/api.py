"""The Python API, ``dyhead_cli.load(weights)`` -> a ``Predictor`` to call on images.

This module sits on top of the layers (outside them, like ``cli.py``): it only gathers what the engine
offers under short names. See ``engine/predictor.py`` for what a predictor accepts and returns.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dyhead_cli.engine.predictor import Predictor, load_predictor
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import ModelConfig, Recipe, load_recipe

__all__ = ["ModelConfig", "Predictor", "Recipe", "build_model", "load", "load_recipe"]


def load(
    weights: str | Path,
    device: str = "auto",
    *,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    score_thr: float | None = None,
    classes: Sequence[str | int] | None = None,
    iou: float | None = None,
    max_det: int | None = None,
    tile: int = 0,
    tile_overlap: float | None = None,
    batch_size: int | None = None,
    half: bool = False,
    bf16: bool = False,
    **extra: Any,
) -> Predictor:
    """A ready predictor for a checkpoint (``.safetensors``; the recipe travels in its metadata).

    ``predictor(images)`` -> one ``Detections`` per image (``.boxes`` (N, 4) xyxy in original pixels,
    ``.scores``, ``.labels``, ``.names``, ``.category_ids``, ``.plot()``, ``.to_coco(image_id)``), with
    the recipe's resize and batching, the same numbers as ``dyhead predict`` with the same options:
    ``score_thr``, ``classes`` (names or category ids), ``iou``, ``max_det``, ``tile`` / ``tile_overlap``,
    ``batch_size`` (default: the recipe's ``eval.batch_size``), ``device`` auto | cpu | cuda[:N].
    """
    if not isinstance(weights, (str, Path)):
        raise DyheadError(f"weights must be the path of a .safetensors checkpoint, got {type(weights).__name__}")
    path = Path(weights)
    if path.suffix.lower() in (".onnx", ".pt2", ".engine", ".torchscript"):
        raise DyheadError(f"{path}: exported models cannot be loaded yet; load the .safetensors checkpoint")
    numbers = {"score_thr": score_thr, "iou": iou, "tile_overlap": tile_overlap}
    counts = {"max_det": max_det, "tile": tile, "batch_size": batch_size}
    for name, value in {**numbers, **counts}.items():  # checked here, not as a TypeError deep inside
        whole = name in counts
        if value is not None and (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))):
            raise DyheadError(f"{name} must be {'a whole number' if whole else 'a number'}, got {value!r}")
    unknown = sorted(set(extra) - EXTRA_OPTIONS)
    if unknown:
        options = [n for n in inspect.signature(load).parameters if n not in ("weights", "extra")]
        raise DyheadError(f"load() has no option {unknown[0]!r}; its options: {', '.join(options + sorted(EXTRA_OPTIONS))}")
    if tile_overlap is not None and not tile:
        raise DyheadError(f"tile_overlap={tile_overlap} applies to tiled inference only: give tile=SIZE too")
    if tile_overlap is not None:
        extra["tile_overlap"] = tile_overlap  # else the predictor's default
    device = str(device)  # a torch.device too
    if isinstance(classes, (str, int)):
        classes = [classes]  # one class, not the letters of its name
    try:
        return load_predictor(
            path,
            device,
            recipe,
            overrides,
            iou,
            max_det,
            score_thr=score_thr,
            classes=classes,
            tile=tile,
            batch_size=batch_size,
            half=half,
            bf16=bf16,
            **extra,
        )
    except DyheadError as e:  # the engine names the command line's flags; here they are keyword arguments
        raise DyheadError(keyword_names(str(e))) from None


EXTRA_OPTIONS = {"ann_categories"}  # passed on to the Predictor as they are
# the command line's flag for each keyword argument of ``load`` that the engine's messages name
FLAGS = {
    "--tile-overlap": "tile_overlap",
    "--tile": "tile",
    "--score-thr": "score_thr",
    "--max-det": "max_det",
    "--batch-size": "batch_size",
    "--classes": "classes",
    "--iou": "iou",
    "--device": "device",
    "--weights": "weights",
    "--recipe": "recipe=PATH",
    "--set": "overrides",
    "--half": "half=True",
    "--bf16": "bf16=True",
}
# a flag as a message names it: after a space, a parenthesis or at the start (not inside a quoted value, a
# path or an override), and not followed by more of a name or a path
FLAG = re.compile(r"(?:(?<=^)|(?<=[\s(]))--[a-z][a-z0-9-]*(?![\w\-/\\]|\.\w)")


def keyword_names(message: str) -> str:
    """``message`` with each flag of ``FLAGS`` replaced by its keyword argument's name."""
    return FLAG.sub(lambda m: FLAGS.get(m.group(0), m.group(0)), message)
