"""``dyhead benchmark --onnx FILE``: an exported model under onnxruntime, timed in the same run as the
PyTorch model (same images, same thread count, calls interleaved with the PyTorch ones).

The exported graph takes the batch as it is (a fixed-size export needs ``--size`` equal to its own);
it is timed end to end, post-processing included when it was exported with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import ModelConfig


def load_onnx(path: Path, threads: int) -> tuple[Any, dict[str, Any]]:
    """The onnxruntime-backed detector with ``threads`` intra-op threads, and its report entry."""
    from dyhead_cli.engine.onnx_runner import OnnxDetector

    model = OnnxDetector(path, threads=threads)
    info = {
        "name": f"{path.name} (onnxruntime {_ort_version()}, CPU)",
        "file": str(path),
        "params": None,
        "weights_bytes": path.stat().st_size,
        "flops_per_image": {},
        "config": {k: model.meta[k] for k in ("size", "dynamic", "batch", "postprocess", "half")},
    }
    return model, info


def check_same_model(cfg: ModelConfig, source: str, model: Any) -> None:
    """Refuse an ONNX file that holds another model than the one timed beside it: the two timings are
    printed as a ratio, which would compare two different networks."""
    from dyhead_cli.engine.recipe_fit import first_conflict, model_conflicts

    conflicts = model_conflicts(cfg, model.meta["recipe"])
    if conflicts:
        raise DyheadError(
            f"--onnx {model.path} holds another model than {source}: "
            f"{first_conflict(conflicts, f'in {source}', 'in the ONNX file')}; give the recipe it was exported from (--recipe)"
        )


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def onnx_call(model: Any, images: Tensor, image_sizes: list, device: str) -> Callable[[], Any]:
    if device != "cpu":
        raise DyheadError("--onnx times onnxruntime on the CPU: drop --gpu")
    if not model.dynamic and tuple(images.shape[-2:]) != tuple(model.size):
        raise DyheadError(
            f"--onnx {model.path} was exported for {model.size[0]}x{model.size[1]}: pass --size {model.size[0]}x{model.size[1]}"
        )

    def call():
        with torch.inference_mode():
            return model(images, image_sizes)

    return call
