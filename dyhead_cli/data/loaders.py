"""Every DataLoader of the project: training (seeded, sharded, resumable), validation, and plain images.

All of them yield ``collate`` batches: a zero-padded (B, 3, Hp, Wp) float batch of 0..255 pixels plus each
image's real size; the detector normalises and zeroes the padding itself.
"""

from __future__ import annotations

import signal
from collections.abc import Hashable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dyhead_cli.data.coco import CocoDetection, build_dataset
from dyhead_cli.data.images import ImageEntry, ImageFiles
from dyhead_cli.data.transforms import shortest_edge_size
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import Recipe


def collate(batch: Sequence[dict[str, Any] | None], size_divisibility: int = 128) -> dict[str, Any]:
    """Stack items into one zero-padded float batch (values stay 0..255; normalisation is the model's job).

    ``images`` is (B, 3, Hp, Wp) with Hp, Wp the largest size rounded up to ``size_divisibility`` (so every
    FPN level divides evenly); ``image_sizes`` keeps each image's real (h, w). ``None`` items (skipped
    corrupt images) are dropped and counted in ``num_skipped``; a batch of only ``None`` has B = 0.
    """
    items = [b for b in batch if b is not None]
    num_skipped = len(batch) - len(items)
    if items:
        max_h = max(it["image"].shape[1] for it in items)
        max_w = max(it["image"].shape[2] for it in items)
        pad_h, pad_w = padded_size((max_h, max_w), size_divisibility)
    else:
        pad_h = pad_w = 0
    images = torch.zeros((len(items), 3, pad_h, pad_w), dtype=torch.float32)
    for i, it in enumerate(items):
        _, h, w = it["image"].shape
        images[i, :, :h, :w] = it["image"]
    return {
        "images": images,
        "image_sizes": [tuple(it["size"]) for it in items],
        "orig_sizes": [tuple(it["orig_size"]) for it in items],
        "image_ids": [it["image_id"] for it in items],
        "targets": [{"boxes": it["boxes"], "labels": it["labels"]} for it in items],
        "num_skipped": num_skipped,
    }


def padded_size(size: tuple[int, int], size_divisibility: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of ``size_divisibility``: the size an image is padded to alone."""
    div = max(1, int(size_divisibility))
    return -(-int(size[0]) // div) * div, -(-int(size[1]) // div) * div


def alone_groups(sizes: Sequence[tuple[int, int]], size_divisibility: int) -> list[tuple[list[int], tuple[int, int]]]:
    """The images of a batch grouped by the size each is padded to alone: [(indices, (Hp, Wp))], in order
    of first appearance.

    Inference runs each group as its own batch, cropped to that size. DyHead averages whole maps (scale
    attention, DyReLU), padding included, and the convs near an image's edge see the padding, so an image
    padded to a larger neighbour's size gives other detections. The references evaluate one image at a
    time (padded to the multiple only); per group, a batch gives their numbers whatever it holds.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(padded_size(size, size_divisibility), []).append(i)
    return [(indices, shape) for shape, indices in groups.items()]


def collate_images(items: list[dict[str, Any]], size_divisibility: int) -> dict[str, Any]:
    """``data.coco.collate`` of the readable items (same padding as evaluation) plus the ``failed`` ones."""
    good = [it for it in items if "error" not in it]
    batch = collate(good, size_divisibility=size_divisibility)
    batch["file_names"] = [it["file_name"] for it in good]
    batch["failed"] = [it for it in items if "error" in it]
    return batch


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (forked workers would share the parent's)."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def _main_process_decides(worker_id: int) -> None:
    """``worker_init_fn`` of the training and validation loaders: Ctrl-C reaches the terminal's whole process
    group, and the main process decides what it means (a training stops after its step with a checkpoint,
    ``engine/interrupts.py``), so a worker ignores it rather than dying under the batch still needed.

    SIGTERM keeps its default: ``Process.terminate`` (how a loader, or Python at exit, ends a worker) sends
    it, and a worker that outlived it would hang the exit in ``join``. A worker killed by a group-wide
    SIGTERM (torchrun, Slurm) ends the loop; with one process the training still checkpoints at its step.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochSampler(Sampler[list[int]]):
    """Batches of an epoch: a (seed, epoch)-seeded permutation, this process's shard, minus ``skip`` batches.

    With ``groups`` (one id per data set index, e.g. ``aspect_groups``) a batch holds one group only, as
    detectron2's and torchvision's references build them: walking the shuffled shard, each group fills
    its own bucket and a full bucket is a batch. What is left in the buckets at the end of the shard is
    batched as it comes (at most one mixed batch per group), so every process has the same number of
    batches, ``per_rank // batch_size`` rounded down to whole accumulation groups, with or without
    grouping. Everything follows from (seed, epoch, rank, world): a resumed run skips the same batches.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
        multiple: int = 1,
        groups: Sequence[int] | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(size, generator=g).tolist()
        per_rank = size // world
        if per_rank < batch_size * multiple:
            raise DyheadError(
                f"the training set has {size} images: too few for batch_size {batch_size} x grad_accum {multiple} on {world} process(es)"
            )
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        num_batches = per_rank // batch_size // multiple * multiple  # whole accumulation groups only
        if groups is None:
            batches = [mine[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]
        else:
            batches = grouped_batches(mine, groups, batch_size)[:num_batches]
        self.batches = batches[skip:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def grouped_batches(indices: Sequence[int], groups: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of ``batch_size`` taken in order, each from one group; the leftovers batched at the end."""
    buckets: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for index in indices:
        bucket = buckets.setdefault(groups[index], [])
        bucket.append(index)
        if len(bucket) == batch_size:
            batches.append(list(bucket))
            bucket.clear()
    rest = [i for bucket in buckets.values() for i in bucket]
    batches += [rest[i : i + batch_size] for i in range(0, len(rest) - batch_size + 1, batch_size)]
    return batches


def aspect_groups(dataset: CocoDetection) -> list[int]:
    """Per index of ``dataset``: 0 for landscape or square images, 1 for portrait (from the COCO width and
    height; an image without them counts as landscape)."""
    out = []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        w, h = info.get("width") or 0, info.get("height") or 0
        out.append(1 if h > w else 0)
    return out


def clean_worker_errors(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``loader``; a ``DyheadError`` raised in a DataLoader worker comes back with the worker's
    traceback and the exception's module path in its message: re-raise it with the user's line only."""
    iterator = iter(loader)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except DyheadError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            last = lines[-1].strip() if lines else type(e).__name__
            prefix = f"{DyheadError.__module__}.{DyheadError.__name__}: "
            raise DyheadError(last.removeprefix(prefix)) from None
        yield item


class EpochSeeded(Dataset):
    """Seeds the augmentation of each sample from (seed, epoch, index), whichever worker loads it."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % 2**32)
        return self.dataset[index]


def train_loader(
    dataset: EpochSeeded, recipe: Recipe, epoch: int, rank: int, world: int, skip: int, groups: Sequence[int] | None = None
) -> DataLoader:
    """The batches of ``epoch`` for process ``rank`` of ``world``, after the first ``skip`` (a resume)."""
    dataset.epoch = epoch
    t = recipe.train
    sampler = EpochSampler(len(dataset), t.batch_size, t.seed, epoch, rank, world, skip, t.grad_accum, groups)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=recipe.data.num_workers,
        collate_fn=partial(collate, size_divisibility=recipe.data.size_divisibility),
        worker_init_fn=_main_process_decides if recipe.data.num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


class ShardBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` in data set order; process ``rank`` of ``world`` takes every world-th batch.

    With ``groups`` (a key per index, e.g. ``padded_sizes``) each batch holds one group's images: a batch
    is filled as its group's images come, and each group's last, partial batch follows. Inference runs a
    batch of mixed padded sizes one group at a time anyway (``alone_groups``); this keeps the batches full.
    Each batch is the one a single process would form (same images, same padding), so the detections,
    and with them the AP, do not depend on the number of processes.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world: int = 1, groups: Sequence[Hashable] | None = None
    ) -> None:
        if groups is None:
            batches = [list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)]
        else:
            batches, buckets = [], {}
            for index in range(size):
                bucket = buckets.setdefault(groups[index], [])
                bucket.append(index)
                if len(bucket) == batch_size:
                    batches.append(list(bucket))
                    bucket.clear()
            batches += [bucket for bucket in buckets.values() if bucket]
        self.batches = batches[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def padded_sizes(dataset: CocoDetection, min_size: int, max_size: int, size_divisibility: int) -> list[Hashable]:
    """Per index of ``dataset``: the (Hp, Wp) its image is padded to alone at test time, from the COCO
    width and height (checked against the file when read); None where the JSON does not give them."""
    out: list[Hashable] = []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        w, h = info.get("width"), info.get("height")
        ok = isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
        out.append(padded_size(shortest_edge_size(h, w, min_size, max_size), size_divisibility) if ok else None)
    return out


def val_loader(
    recipe: Recipe, rank: int = 0, world: int = 1, dataset: CocoDetection | None = None
) -> tuple[DataLoader, CocoDetection]:
    """The validation set of ``recipe`` in ``eval.batch_size`` batches of one padded size each (this
    process's share)."""
    d = recipe.data
    dataset = dataset if dataset is not None else build_dataset(d, "val")
    groups = padded_sizes(dataset, d.test_min_size, d.max_size, d.size_divisibility)
    loader = DataLoader(
        dataset,
        batch_sampler=ShardBatches(len(dataset), recipe.eval.batch_size, rank, world, groups),
        num_workers=d.num_workers,
        collate_fn=partial(collate, size_divisibility=d.size_divisibility),
        worker_init_fn=_main_process_decides if d.num_workers > 0 else None,
    )
    return loader, dataset


def image_loader(entries: list[ImageEntry], recipe: Recipe, batch_size: int, workers: int, pin: bool = False) -> DataLoader:
    d = recipe.data
    return DataLoader(
        ImageFiles(entries, d.test_min_size, d.max_size, resize_backend=d.resize_backend),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=partial(collate_images, size_divisibility=d.size_divisibility),
        pin_memory=pin,
        persistent_workers=False,
    )


def build_dataloader(
    cfg: Any,
    split: str,
    batch_size: int,
    shuffle: bool,
    num_workers: int | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``build_dataset(cfg, split)`` that yields ``collate`` batches.

    ``seed`` fixes the shuffling order and the augmentations (per worker), so a run can be repeated.
    """
    dataset = build_dataset(cfg, split, seed=seed)
    workers = cfg.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=partial(collate, size_divisibility=cfg.size_divisibility),
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )
