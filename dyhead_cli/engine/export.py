"""``dyhead export``'s engine: a checkpoint's detector to an ONNX file or a torch.export program (``.pt2``).

What is exported (``ExportWrapper``): normalisation, zeroing of the padding, backbone, FPN, the DyHead tower
with its deformable convs in standard ops (``impl = "export"``: ``models/deform_export.py``), the head and,
by default, the post-processing (``models/export_postprocess.py``). Inputs and outputs:

    images       (B, 3, H, W) float32, 0..255 RGB (the model flips to BGR itself when its backbone wants it)
    image_sizes  (B, 2) int64, the (h, w) of each image inside the batch (top-left); pixels outside are
                 padding, zeroed after normalising as ``Detector`` does; pass (H, W) for unpadded images
  with post-processing:
    boxes (B, D, 4) xyxy in input pixels, scores (B, D), labels (B, D) int64, num_detections (B,) int64;
    rows >= num_detections are padding (zeros, label -1); D = ``head_options.detections_per_img``
  with ``postprocess=False``: the head's raw outputs per level, named ``<output>_p<level>`` (cls_logits_p3, ...)

Sizes: H and W must be multiples of ``SIZE_MULTIPLE`` (128, P7's stride: every level is then exactly half
the one before, which is what lets the graph keep H and W symbolic); with ``dynamic`` the batch and the
image size are symbolic (H, W >= 256: torch.export assumes no level is 1 pixel wide), else fixed to the
example's. The checkpoint's class names, category ids and recipe travel in the file's metadata
(``metadata_props`` of the ONNX model; ``dyhead.json`` inside the .pt2).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dyhead_cli.engine.checkpoint import read_metadata
from dyhead_cli.engine.inference import LoadedDetector, category_ids, load_detector
from dyhead_cli.errors import DyheadError, check_choice, first_line
from dyhead_cli.models.heads import HEADS
from dyhead_cli.recipe import to_dict

FORMATS = ("onnx", "torch-export")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
SIZE_MULTIPLE = 128
MIN_DYNAMIC_SIZE = 256
MIN_OPSET, DEFAULT_OPSET = 17, 18
METADATA_FILE = "dyhead.json"  # inside a .pt2
EXTRA_HINT = "pip install -e '.[export]'"


def require_onnx(what: str = "ONNX export") -> None:
    """One clear line when the optional ``export`` extra (onnx, onnxscript, onnxruntime) is missing."""
    missing = []
    for module in ("onnx", "onnxscript") if what == "ONNX export" else ("onnxruntime",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise DyheadError(f"{what} needs {' and '.join(missing)}, which come with the 'export' extra: {EXTRA_HINT}")


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' or 'N' (a square) -> (H, W), each a positive multiple of ``SIZE_MULTIPLE``."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise DyheadError(f"--size must be HxW (e.g. 640x640) or one number, got {text!r}") from None
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise DyheadError(
            f"--size {h}x{w} is not supported: height and width must be positive multiples of {SIZE_MULTIPLE} "
            "(the detector pads images to them)"
        )
    return h, w


@dataclass
class ExportOptions:
    format: str = "onnx"
    size: tuple[int, int] = (640, 640)
    dynamic: bool = False
    batch: int = 1
    opset: int = DEFAULT_OPSET
    postprocess: bool = True
    half: bool = False

    def check(self) -> None:
        check_choice("--format", self.format, FORMATS)
        if self.batch < 1:
            raise DyheadError(f"--batch must be at least 1, got {self.batch}")
        if self.dynamic and self.batch != 1:
            raise DyheadError(
                f"--batch {self.batch} fixes the batch of a static export; with --dynamic the batch is free: drop --batch"
            )
        if self.dynamic and min(self.size) < MIN_DYNAMIC_SIZE:
            raise DyheadError(
                f"--size {self.size[0]}x{self.size[1]}: with --dynamic both sides must be at least {MIN_DYNAMIC_SIZE}"
            )
        if self.format == "onnx" and self.opset < MIN_OPSET:
            raise DyheadError(
                f"--opset must be {MIN_OPSET} or later (GridSample needs 16, LayerNorm-era ops 17), got {self.opset}"
            )


def check_opset(opset: int) -> None:
    """The installed onnx package knows opsets up to ``onnx_opset_version()``: a later one is refused here,
    in one line, rather than failing deep inside the exporter."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise DyheadError(
            f"--opset must be within {MIN_OPSET}..{newest} (the newest opset of the installed onnx {onnx.__version__}), got {opset}"
        )


def zero_padding_mask(image_sizes: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """(B, 2) int64 (h, w) -> (B, 1, H, W): 1 inside each image's top-left (h, w), 0 on the padding."""
    rows = torch.arange(height, device=image_sizes.device)[None, :] < image_sizes[:, :1]  # (B, H)
    cols = torch.arange(width, device=image_sizes.device)[None, :] < image_sizes[:, 1:]  # (B, W)
    return (rows[:, None, :, None] & cols[:, None, None, :]).to(dtype)


class ExportWrapper(nn.Module):
    """The traceable detector: (images, image_sizes) -> raw head outputs or padded detections (see the module doc)."""

    def __init__(self, detector: nn.Module, postprocess: bool = True, half: bool = False) -> None:
        super().__init__()
        self.detector = detector
        self.postprocess = postprocess
        self.half = half
        if hasattr(detector.dyhead, "set_impl"):
            detector.dyhead.set_impl("export")

    def output_names(self, num_levels: int) -> list[str]:
        if self.postprocess:
            return ["boxes", "scores", "labels", "num_detections"]
        keys = ["cls_logits", "bbox_reg"] + (
            ["centerness"] if getattr(self.detector.head, "centerness", None) is not None else []
        )
        return [f"{k}_p{3 + level}" for k in keys for level in range(num_levels)]

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        d = self.detector
        x = d.normalize(images.float())
        x = x * zero_padding_mask(image_sizes, x.shape[-2], x.shape[-1], x.dtype)
        if self.half:
            x = x.half()
        outputs = d.head(d.dyhead(d.fpn(d.backbone(x))))
        outputs = {k: [t.float() for t in v] for k, v in outputs.items()}
        if not self.postprocess:
            return tuple(t for v in outputs.values() for t in v)
        from dyhead_cli.models.export_postprocess import postprocess_padded

        return postprocess_padded(d.head, outputs, image_sizes)


def export_metadata(det: LoadedDetector, opts: ExportOptions, output_names: list[str], weights: Path) -> dict[str, str]:
    cats = category_ids(det)
    return {
        "dyhead_format": "dyhead-export/1",
        "class_names": json.dumps(det.class_names),
        "category_ids": json.dumps([c["id"] for c in cats]),
        "recipe": json.dumps(to_dict(det.recipe)),
        "postprocess": json.dumps(opts.postprocess),
        "dynamic": json.dumps(opts.dynamic),
        "size": json.dumps(list(opts.size)),
        "batch": json.dumps(None if opts.dynamic else opts.batch),
        "half": json.dumps(opts.half),
        "outputs": json.dumps(output_names),
        "source": str(weights),
    }


def example_inputs(opts: ExportOptions) -> tuple[Tensor, Tensor]:
    """Images in 0..255 and full image sizes; batch 2 when dynamic (torch.export specialises a batch of 1)."""
    batch = 2 if opts.dynamic else opts.batch
    h, w = opts.size
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    return images, torch.tensor([[h, w]] * batch, dtype=torch.int64)


def dynamic_shapes(opts: ExportOptions) -> dict[str, dict[int, Any]] | None:
    if not opts.dynamic:
        return None
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    kh = Dim("h_div_128", min=MIN_DYNAMIC_SIZE // SIZE_MULTIPLE, max=64)
    kw = Dim("w_div_128", min=MIN_DYNAMIC_SIZE // SIZE_MULTIPLE, max=64)
    return {"images": {0: batch, 2: SIZE_MULTIPLE * kh, 3: SIZE_MULTIPLE * kw}, "image_sizes": {0: batch}}


def default_out(weights: Path, fmt: str) -> Path:
    return weights.with_suffix(SUFFIXES[fmt])


def prepare(weights: Path, opts: ExportOptions) -> tuple[LoadedDetector, ExportWrapper]:
    """Load the checkpoint's detector and wrap it for tracing (float16 weights with ``half``)."""
    opts.check()
    metadata = read_metadata(weights)
    if metadata is not None and "recipe" not in metadata:
        raise DyheadError(
            f"{weights} carries no recipe in its metadata: export takes a model checkpoint of 'dyhead train' "
            "(RUN/last.safetensors or best.safetensors; state.safetensors is the training state) or 'dyhead convert'"
        )
    det = load_detector(weights)
    head = det.recipe.model.head
    if not HEADS[head].exportable:
        raise DyheadError(
            f"{weights}: {head} models cannot be exported yet (their proposal and RoI stages are not traced); "
            f"export takes {', '.join(name for name, spec in HEADS.items() if spec.exportable)}"
        )
    model = det.model.eval()
    if opts.half:
        model.half()
        model.pixel_mean, model.pixel_std = model.pixel_mean.float(), model.pixel_std.float()
    return det, ExportWrapper(model, opts.postprocess, opts.half).eval()


def trace(wrapper: ExportWrapper, opts: ExportOptions) -> torch.export.ExportedProgram:
    """torch.export of the wrapper; an export failure is one readable line."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(wrapper, example_inputs(opts), dynamic_shapes=dynamic_shapes(opts), strict=False)
    except DyheadError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the first line says what failed
        first = first_line(e)
        hint = " (try without --dynamic: this backbone may need a fixed input size)" if opts.dynamic else ""
        raise DyheadError(f"torch.export could not trace this model{hint}: {first[:300]}") from None


def _temporary(out: Path) -> Path:
    return out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")  # torch.export.save wants the suffix


def save_torch_export(program: torch.export.ExportedProgram, out: Path, metadata: dict[str, str]) -> None:
    tmp = _temporary(out)
    try:
        torch.export.save(program, str(tmp), extra_files={METADATA_FILE: json.dumps(metadata)})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def save_onnx(
    program: torch.export.ExportedProgram, out: Path, metadata: dict[str, str], opts: ExportOptions, output_names: list[str]
) -> int:
    """Translate the program to ONNX, check it, write it with ``metadata``; returns the opset written."""
    require_onnx()
    import onnx

    tmp = _temporary(out)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program,
                input_names=["images", "image_sizes"],
                output_names=output_names,
                opset_version=opts.opset,
                dynamo=True,
                external_data=False,
                verbose=False,
                optimize=False,  # onnxscript's rewriter takes minutes on these graphs; onnxruntime optimises at load
            )
        model = onnx_program.model_proto
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model, full_check=True)
        foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise DyheadError(f"the ONNX graph uses ops outside the default domain: {', '.join(foreign)}")
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
        return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    except DyheadError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter and onnx raise many types
        first = first_line(e)
        raise DyheadError(f"ONNX export failed: {first[:300]}") from None
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class ExportSummary:
    out: Path
    format: str
    outputs: list[str]
    opset: int | None = None


def export_model(weights: Path, opts: ExportOptions, out: Path | None = None) -> ExportSummary:
    """Export the detector of ``weights`` (a dyhead checkpoint whose metadata carries the recipe)."""
    opts.check()
    if opts.format == "onnx":
        require_onnx()
        check_opset(opts.opset)
    weights = Path(weights)
    out = Path(out) if out is not None else default_out(weights, opts.format)
    if out.is_dir():
        raise DyheadError(f"--out {out} is a folder; give a file name (e.g. {out / (weights.stem + SUFFIXES[opts.format])})")
    suffix = SUFFIXES[opts.format]
    if out.suffix.lower() != suffix:  # predict and benchmark tell the formats apart by the suffix
        raise DyheadError(f"--out {out}: --format {opts.format} writes a {suffix} file; name it {out.with_suffix(suffix).name}")
    det, wrapper = prepare(weights, opts)
    num_levels = len(getattr(det.model.head, "strides", (8, 16, 32, 64, 128)))
    names = wrapper.output_names(num_levels)
    metadata = export_metadata(det, opts, names, weights)
    program = trace(wrapper, opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.format == "torch-export":
        save_torch_export(program, out, metadata)
        return ExportSummary(out, opts.format, names)
    opset = save_onnx(program, out, metadata, opts, names)
    return ExportSummary(out, opts.format, names, opset)


def load_torch_export(path: Path) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """A .pt2 written by ``export_model`` and its metadata."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra[METADATA_FILE] or "{}")
