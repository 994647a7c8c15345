"""Running an exported ``.onnx`` detector with onnxruntime, behind the same call as ``Detector``.

``OnnxDetector(images, image_sizes, original_sizes=None)`` takes the padded batch the data loaders make
and returns per image {"boxes", "scores", "labels"} like ``Detector.forward`` in eval mode, so
``dyhead predict --weights model.onnx`` reuses the whole predict pipeline. The batch is fitted to what
the graph accepts: padded with zeros to a multiple of 128 (dynamic graphs) or to the export size
(fixed graphs; a larger image is an error), and split into the export's batch size. A graph exported
without post-processing returns raw head outputs; the head of the recipe (no weights needed) then runs
the PyTorch post-processing on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dyhead_cli.engine.export import SIZE_MULTIPLE, require_onnx
from dyhead_cli.engine.inference import LoadedDetector
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.detector import rescale_boxes
from dyhead_cli.recipe import Recipe, recipe_from_dict


def build_head(recipe: Recipe) -> torch.nn.Module:
    """The recipe's head (random weights): its post-processing needs only its settings, priors and decoding."""
    from dyhead_cli.models.fpn import FPN
    from dyhead_cli.models.heads import HEADS

    return HEADS[recipe.model.head].build(recipe.model, recipe.model.fpn.channels, FPN.strides).eval()


class OnnxDetector:
    """An onnxruntime session over a file written by ``dyhead export --format onnx`` (CPU provider)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        require_onnx("running an ONNX model")
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise DyheadError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its constant-folding notes are not for the user
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DyheadError(f"{path} is not an ONNX model onnxruntime can load: {str(e).splitlines()[0][:200]}") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("dyhead_format") != "dyhead-export/1":
            raise DyheadError(f"{path} was not written by 'dyhead export' (no dyhead metadata)")
        self.path = path
        self.meta: dict[str, Any] = {k: (v if k == "source" else json.loads(v)) for k, v in meta.items() if k != "dyhead_format"}
        self.recipe = recipe_from_dict(self.meta["recipe"])
        self.postprocess = bool(self.meta["postprocess"])
        self.dynamic = bool(self.meta["dynamic"])
        # a fixed-size graph pads every batch to its size: splitting a batch by padded size changes nothing; a
        # dynamic one takes the batch's size, so images of another padded size run apart, as in PyTorch
        self.pads_itself = not self.dynamic
        self.size = tuple(self.meta["size"])
        self.batch = self.meta["batch"]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._head = None if self.postprocess else build_head(self.recipe)

    # nn.Module-like, so code written for Detector can hold either
    def to(self, device: Any) -> OnnxDetector:
        if torch.device(device).type != "cpu":
            raise DyheadError("ONNX models run on the CPU here (onnxruntime's default provider): use --device cpu")
        return self

    def eval(self) -> OnnxDetector:
        return self

    def keep_only(self, labels: list[int] | None) -> None:
        """As ``Detector.keep_only`` where the head's post-processing runs here (a model exported with
        ``--no-postprocess``): the wanted classes fill ``detections_per_img``. A graph that post-processes keeps
        its ``detections_per_img`` best of all classes, which the caller then filters."""
        if self._head is not None:
            self._head.keep_only(labels)

    def fit(self, images: Tensor) -> Tensor:
        """Pad (B, 3, H, W) with zeros to the shape the graph accepts."""
        h, w = images.shape[-2:]
        if self.dynamic:
            th, tw = -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE
            th, tw = max(th, 2 * SIZE_MULTIPLE), max(tw, 2 * SIZE_MULTIPLE)
        else:
            th, tw = self.size
            if h > th or w > tw:
                raise DyheadError(
                    f"{self.path} takes images up to {th}x{tw}, got a {h}x{w} batch: export with --dynamic or a larger --size"
                )
        return F.pad(images, (0, tw - w, 0, th - h)) if (th, tw) != (h, w) else images

    def run(self, images: Tensor, image_sizes: Tensor) -> list[np.ndarray]:
        """One session call per chunk of the export's batch size; outputs concatenated over the batch."""
        chunk = images.shape[0] if self.batch is None else self.batch
        parts: list[list[np.ndarray]] = []
        for start in range(0, images.shape[0], chunk):
            x, s = images[start : start + chunk], image_sizes[start : start + chunk]
            n = x.shape[0]
            if n < chunk:  # the last chunk of a fixed-batch graph: fill with copies, drop them after
                x = torch.cat([x, x[-1:].expand(chunk - n, -1, -1, -1)])
                s = torch.cat([s, s[-1:].expand(chunk - n, -1)])
            feed = {"images": x.float().contiguous().numpy(), "image_sizes": s.numpy()}
            parts.append([o[:n] for o in self.session.run(None, feed)])
        return [np.concatenate(p) for p in zip(*parts)]

    def raw_outputs(self, outputs: list[np.ndarray]) -> dict[str, list[Tensor]]:
        """Flat ``<key>_p<level>`` outputs -> {key: [level tensors]} as the head returns them."""
        grouped: dict[str, list[Tensor]] = {}
        for name, value in zip(self.output_names, outputs):
            grouped.setdefault(name.rsplit("_p", 1)[0], []).append(torch.from_numpy(value))
        return grouped

    def __call__(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        sizes = torch.tensor([list(s) for s in image_sizes], dtype=torch.int64)
        outputs = self.run(self.fit(images.detach().cpu()), sizes)
        if self.postprocess:
            boxes, scores, labels, counts = (torch.from_numpy(o) for o in outputs)
            detections = [
                {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n].long()}
                for i, n in enumerate(counts.tolist())
            ]
        else:
            with torch.no_grad():
                detections = self._head.postprocess(self.raw_outputs(outputs), list(image_sizes))
        if original_sizes is not None:
            detections = [rescale_boxes(d, s, o) for d, s, o in zip(detections, image_sizes, original_sizes)]
        return detections


def load_onnx_detector(path: Path, threads: int | None = None) -> LoadedDetector:
    """``load_detector`` for an exported ONNX model: the recipe, class names and category ids come from its metadata."""
    model = OnnxDetector(path, threads)
    names = list(model.meta.get("class_names") or [f"class_{k}" for k in range(model.recipe.model.num_classes)])
    meta = {"category_ids": model.meta.get("category_ids"), "recipe": model.meta["recipe"]}
    return LoadedDetector(model, model.recipe, names, meta)  # type: ignore[arg-type]


def load_for_predict(
    weights: Path, recipe_path: Path | None, overrides: list[str] | tuple[str, ...], device: str, half: bool, bf16: bool
) -> LoadedDetector:
    """``dyhead predict --weights model.onnx``: the model, recipe and categories all come from the file."""
    if recipe_path is not None or overrides:
        raise DyheadError(
            "--recipe, --set, --iou and --max-det do not apply to an exported ONNX model: its recipe and post-processing are fixed in the file"
        )
    if half or bf16:
        raise DyheadError("--half / --bf16 do not apply to an ONNX model (export it with --half instead)")
    if device not in ("auto", "cpu"):
        raise DyheadError(f"ONNX models run on the CPU (onnxruntime's default provider): use --device cpu, not {device!r}")
    return load_onnx_detector(weights)
