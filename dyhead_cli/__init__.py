"""dyhead: Dynamic Head object detectors on any timm backbone (command line ``dyhead``, and this API).

    import dyhead_cli
    model = dyhead_cli.load("runs/quickstart/last.safetensors")   # device="auto"
    results = model(["a.jpg", "b.jpg"])                             # paths, PIL, numpy, tensors, lists
    results[0].boxes, results[0].scores, results[0].names           # (N, 4) xyxy in original pixels, ...
    results[0].plot().save("a_boxes.jpg"); results[0].to_coco(image_id=1)

Also ``build_model(model_config)``, ``load_recipe(path or built-in name)``, ``builtin_recipe_names()``
and ``__version__``. The names load lazily: ``import dyhead_cli`` alone does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Detections", "Predictor", "__version__", "build_model", "builtin_recipe_names", "load", "load_recipe"]

_LAZY = {
    "load": "dyhead_cli.api",
    "build_model": "dyhead_cli.api",
    "load_recipe": "dyhead_cli.recipe",
    "builtin_recipe_names": "dyhead_cli.recipe",
    "Predictor": "dyhead_cli.engine.predictor",
    "Detections": "dyhead_cli.engine.detections",
}

if TYPE_CHECKING:  # pragma: no cover
    from dyhead_cli.api import build_model, load
    from dyhead_cli.engine.detections import Detections
    from dyhead_cli.engine.predictor import Predictor
    from dyhead_cli.recipe import builtin_recipe_names, load_recipe


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dyhead_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
