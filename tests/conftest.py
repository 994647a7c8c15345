"""Shared test set-up: keep torch to the 2 cores CI has, and skip GPU tests without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small forwards on a shared 2-core machine: one thread avoids OpenMP spin-waits.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------------
# a tiny trained model, shared by the predict and visualize tests

TINY = """
name = "predict-tiny"

[model]
head = "atss"

[model.backbone]
name = "test_resnet"
pretrained = false

[model.fpn]
channels = 32

[model.dyhead]
num_blocks = 1

[model.head_options]
score_thresh = 0.01  # a briefly trained model scores low: keep enough detections for a non-zero AP

[data]
synthetic = true
train_images = "{root}/train"
train_ann = "{root}/annotations/train.json"
val_images = "{root}/val"
val_ann = "{root}/annotations/val.json"
synthetic_num_train = 12
synthetic_num_val = 8
synthetic_image_size = 128
min_sizes = [128]
max_size = 256
test_min_size = 128
num_workers = 0

[train]
epochs = 100
max_steps = 8
batch_size = 2
optimizer = "adamw"
lr = 0.003
warmup_steps = 3
log_every = 4
eval_every = 0
device = "cpu"

[eval]
batch_size = 4
"""

_RUN: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> dict[str, Path]:
    """Train the tiny recipe once per session (shared with test_visualize); return its paths."""
    if not _RUN:
        from dyhead_cli.engine.train import train
        from dyhead_cli.recipe import load_recipe

        root = tmp_path_factory.mktemp("predict_run")
        recipe_path = root / "tiny.toml"
        recipe_path.write_text(TINY.format(root=(root / "synthetic").as_posix()))
        torch.manual_seed(0)
        train(load_recipe(recipe_path), root / "run")
        _RUN.update(
            root=root,
            recipe=root / "run" / "recipe.toml",  # the resolved recipe train() writes (class names, num_classes)
            weights=root / "run" / "last.safetensors",
            val_ann=root / "synthetic" / "annotations" / "val.json",
            val_images=root / "synthetic" / "val",
        )
    return dict(_RUN)


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> dict[str, Path]:
    """A tiny ATSS + DyHead model trained once per session (predict and visualize tests use it)."""
    return trained_run(tmp_path_factory)
