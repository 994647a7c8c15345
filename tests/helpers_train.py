"""A tiny recipe for end-to-end training tests: seconds per run on a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

TINY = """
name = "tiny"

[model]
head = "{head}"

[model.backbone]
name = "test_resnet"

[model.fpn]
channels = 32

[model.dyhead]
num_blocks = {blocks}

[data]
synthetic = true
train_images = "{root}/train"
train_ann = "{root}/annotations/train.json"
val_images = "{root}/val"
val_ann = "{root}/annotations/val.json"
synthetic_num_train = 24
synthetic_num_val = 6
synthetic_image_size = 96
min_sizes = [96, 128]
max_size = 160
test_min_size = 96
num_workers = 0

[train]
epochs = 2
batch_size = 2
optimizer = "adamw"
lr = 0.001
warmup_steps = 2
log_every = 1
eval_every = 1
checkpoint_every = 3
device = "cpu"

[eval]
batch_size = 4
"""


def write_tiny_recipe(folder: Path, data_root: Path, head: str = "atss", blocks: int = 1) -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY.format(root=data_root.as_posix(), head=head, blocks=blocks))
    return path
