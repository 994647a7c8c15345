"""Checks a training makes before it generates data or creates its run directory, so that a typo costs
seconds: the precision and device (Accelerate's settings first), the model (built on the meta device:
no memory, no weights), the trackers, and the data paths."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from PIL import Image

from dyhead_cli.data.coco import CocoDetection
from dyhead_cli.data.images import IMAGE_ERRORS
from dyhead_cli.engine.inference import choose_device
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import DataConfig, ModelConfig, TrainConfig

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def accelerate_choice(t: TrainConfig, resume: bool) -> tuple[str, bool]:
    """(mixed precision, cpu) for the Accelerator: what ``accelerate launch``/``accelerate config`` or the
    ``ACCELERATE_MIXED_PRECISION``/``ACCELERATE_USE_CPU`` variables set, else the recipe's values.

    ``accelerate launch`` always sets both variables, "no" and "False" when the user chose nothing, so
    those two count as unset. A resumed run keeps its precision: another one is refused.
    """
    env_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    mp = env_mp if env_mp and env_mp != "no" else t.mixed_precision
    if mp not in ("no", "fp16", "bf16"):
        raise DyheadError(f"mixed precision '{mp}' (from Accelerate's settings) is not one of no, fp16, bf16")
    if resume and mp != t.mixed_precision:
        raise DyheadError(
            f"Accelerate asks for mixed precision '{mp}' but the run trained with train.mixed_precision = "
            f"'{t.mixed_precision}': a resumed run keeps its precision (launch it without --mixed_precision)"
        )
    cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes") or choose_device(t.device).type == "cpu"
    )
    if mp == "fp16" and (cpu or not torch.cuda.is_available()):
        raise DyheadError("mixed precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    return mp, cpu


def check_model(cfg: ModelConfig) -> None:
    """Build the model on the meta device (no memory, no pretrained weights): unknown backbones, heads or
    options fail here. A model that cannot be built on meta (an op without a meta kernel) is built once on
    the CPU instead, without weights."""
    from dyhead_cli.models.build import build_model

    probe = copy.deepcopy(cfg)
    probe.backbone.pretrained = False
    probe.backbone.pretrained_file = ""
    try:
        with torch.device("meta"):
            build_model(probe)
    except Exception:  # noqa: BLE001 - not every model's init runs on meta tensors (torch 2.11: timm's RegNet)
        build_model(probe)  # on the CPU, without weights: a real mistake raises its own one-line error here
    if cfg.backbone.pretrained_file and not Path(cfg.backbone.pretrained_file).is_file():
        raise DyheadError(f"model.backbone.pretrained_file not found: {cfg.backbone.pretrained_file}")


def check_trackers(names: list[str]) -> None:
    """Every tracker of ``train.log_with`` must be importable: one line naming the package to install."""
    from importlib.util import find_spec

    for name in names:
        package = TRACKER_PACKAGES[name]
        if find_spec(package) is None:
            extra = " (pip install 'dyhead[tensorboard]')" if name == "tensorboard" else ""
            raise DyheadError(f'train.log_with = ["{name}"] needs the {package} package: pip install {package}{extra}')


def check_inputs(d: DataConfig) -> list[Path]:
    """The data files and folders must be there (unless the synthetic set will be made); returns them."""
    paths = [Path(d.train_images), Path(d.train_ann), Path(d.val_images), Path(d.val_ann)]
    if d.synthetic:
        return paths
    for key, path, want_dir in (
        ("data.train_ann", paths[1], False),
        ("data.train_images", paths[0], True),
        ("data.val_ann", paths[3], False),
        ("data.val_images", paths[2], True),
    ):
        if not path.exists():
            raise DyheadError(f"{key} not found: {path}")
        if want_dir != path.is_dir():
            raise DyheadError(f"{key} = {path} should be a {'folder' if want_dir else 'file'}")
    return paths


def check_val_images(dataset: CocoDetection) -> None:
    """Every validation image file must exist and start as an image (its header read, not its pixels:
    well under a millisecond each), before the first training step rather than at the first evaluation."""
    if dataset.skip_corrupt:
        return
    check_image_files(dataset, "validation", "data.val_images / data.val_ann")
    for i in range(len(dataset)):
        path = dataset.image_path(i)
        try:
            with Image.open(path):
                pass
        except IMAGE_ERRORS as e:
            raise DyheadError(f"cannot read validation image {path}: {e}; replace it, or set data.skip_corrupt") from None


def check_train_images(dataset: CocoDetection) -> None:
    """Every training image file must exist (a stat each: a second or so for COCO's 118k), before the first
    step rather than when the loader reaches it; an unreadable one is still found when it is read."""
    if not dataset.skip_corrupt:
        check_image_files(dataset, "training", "data.train_images / data.train_ann")


def check_image_files(dataset: CocoDetection, what: str, keys: str) -> None:
    missing = [dataset.image_path(i) for i in range(len(dataset)) if not dataset.image_path(i).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DyheadError(
            f"{what} image not found: {missing[0]}{more}, listed in {dataset.ann_file}; fix {keys}, or set "
            f"data.skip_corrupt (dyhead data check lists every problem of the data set)"
        )
