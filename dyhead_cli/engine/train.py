"""The training loop: Accelerate for devices, processes and mixed precision; our own small loop for the rest.

Why our own sampler and accumulation instead of ``accelerator.prepare(dataloader)``/``accumulate``: a
resumed run must continue exactly where the last checkpoint left off. The data order of an epoch is a
permutation seeded by (seed, epoch), each sample's augmentation is seeded by (seed, epoch, index), and a
checkpoint records how many batches of the epoch were consumed: resuming skips them and replays nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dyhead_cli.data.coco import build_dataset
from dyhead_cli.engine.checkpoint import (
    load_model_weights,
    load_train_state,
    read_safetensors,
    save_train_state,
    save_weights,
)
from dyhead_cli.data.loaders import EpochSampler, EpochSeeded, train_loader, val_loader
from dyhead_cli.engine.evaluate import coco_evaluate, metrics_json
from dyhead_cli.engine.inference import choose_device, predict_coco
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model
from dyhead_cli.engine import recipes
from dyhead_cli.recipe import Recipe, TrainConfig, save_recipe, to_dict

STATE_FILE = "state.safetensors"


# ----------------------------------------------------------------------------------------------------
# data


# ----------------------------------------------------------------------------------------------------
# optimisation


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and per-level scales (every parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up from ``warmup_factor``, then step decay at fractions of the run, or cosine."""
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, step / max(1, total_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    drops = sum(step >= int(f * total_steps) for f in cfg.lr_steps)
    return warm * cfg.lr_gamma**drops


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


# ----------------------------------------------------------------------------------------------------
# the run


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    best_ap: float = -1.0


class MetricsLog:
    """``metrics.jsonl``: one JSON object per event, appended and flushed at once."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train_from_files(
    recipe_path: Path, out: Path | None, resume: Path | None, overrides: list[str], reporter: Reporter | None = None
) -> dict[str, Any]:
    """``dyhead train RECIPE [--out DIR] [--resume DIR] [--set k=v]``."""
    recipe = recipes.load(recipe_path, overrides)
    if resume is not None:
        if not (Path(resume) / STATE_FILE).is_file():
            raise DyheadError(f"--resume {resume}: no {STATE_FILE} there (was a checkpoint ever written?)")
        return train(recipe, Path(resume), resume=True, reporter=reporter)
    return train(recipe, Path(out) if out else default_run_dir(recipe), reporter=reporter)


class Reporter:
    """What a training run tells whoever watches it; the command layer draws it (the base class is silent).

    Only the main process reports.
    """

    def start(self, total_steps: int, completed: int) -> None:
        """The run begins (or resumes at ``completed``) and will end at ``total_steps``."""

    def step(self, step: int, info: dict[str, Any] | None) -> None:
        """Optimizer step ``step`` is done; ``info`` (loss, named losses, lr, images/s) every ``log_every`` steps."""

    def message(self, text: str) -> None:
        """A line worth showing (resume, evaluation results, the end)."""

    def finish(self) -> None:
        """The run ended (normally or not)."""


def train(recipe: Recipe, run_dir: Path, resume: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir``; return the last evaluation's metrics (empty if none ran)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = recipe.train
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DyheadError("train.mixed_precision = 'fp16' needs a CUDA device; use 'bf16' on CPU")
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=choose_device(t.device).type == "cpu")
    main = accelerator.is_main_process
    reporter = reporter if reporter is not None and main else Reporter()
    set_seed(t.seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl", main)
    dataset = build_dataset(recipe.data, "train", seed=t.seed)
    if not recipe.model.class_names:
        recipe.model.class_names = list(dataset.class_names)
    if recipe.model.num_classes != len(dataset.class_names):
        if recipe.model.num_classes == 80 and len(dataset.class_names) != 80:
            recipe.model.num_classes = len(dataset.class_names)  # the default: take the data set's
        else:
            raise DyheadError(
                f"model.num_classes = {recipe.model.num_classes} but {recipe.data.train_ann} has {len(dataset.class_names)} categories"
            )
    if recipe.model.class_names != list(dataset.class_names):
        raise DyheadError(f"model.class_names {recipe.model.class_names} differ from the data set's {dataset.class_names}")
    if main:
        save_recipe(recipe, run_dir / "recipe.toml")
    recipe_dict = to_dict(recipe)
    category_ids = list(dataset.cat_ids)  # label i <-> the data set's category id, for predict

    model = build_model(recipe.model)
    optimizer = build_optimizer(t, model)
    state = RunState()
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    if resume:
        tensors, _ = read_safetensors(run_dir / STATE_FILE)
        load_model_weights(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, str(run_dir / STATE_FILE))
        counters, ema_tensors = load_train_state(run_dir / STATE_FILE, optimizer)
        state = RunState(**counters)
        if ema is not None and ema_tensors:
            ema.shadow = ema_tensors
        log.write("resume", step=state.step, epoch=state.epoch)
        reporter.message(f"resuming {run_dir} at step {state.step} (epoch {state.epoch})")
    model, optimizer = accelerator.prepare(model, optimizer)

    seeded = EpochSeeded(dataset, t.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(EpochSampler(len(dataset), t.batch_size, t.seed, 0, rank, world, 0, t.grad_accum)) // t.grad_accum
    total_steps = min(t.max_steps or 10**12, t.epochs * steps_per_epoch)
    val_batches = val_data = None
    metrics: dict[str, Any] = {}

    def checkpoint() -> None:
        if not main:
            return
        raw = accelerator.unwrap_model(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one
        save_train_state(run_dir / STATE_FILE, inner, vars(state), ema.shadow if ema else None, model=raw.state_dict())
        export = raw if ema is None else _with_weights(raw, ema.shadow)
        save_weights(run_dir / "last.safetensors", export, recipe_dict, {"step": state.step, "epoch": state.epoch, "category_ids": category_ids})
        log.write("checkpoint", step=state.step, epoch=state.epoch, path=str(run_dir / "last.safetensors"))

    def evaluate_now() -> dict[str, Any]:
        nonlocal val_batches, val_data
        if val_batches is None:
            val_batches, val_data = val_loader(recipe)
        raw = accelerator.unwrap_model(model)
        net = raw if ema is None else _with_weights(build_model(recipe.model), ema.shadow).to(accelerator.device)
        results = predict_coco(net, val_batches, accelerator.device, list(val_data.cat_ids))
        raw.train()
        return coco_evaluate(val_data.coco, results)

    model.train()
    reporter.start(total_steps, state.step)
    try:
        last_time, last_step = time.perf_counter(), state.step
        while state.step < total_steps and state.epoch < t.epochs:
            loader = train_loader(seeded, recipe, state.epoch, rank, world, state.batch_in_epoch)
            for batch in loader:
                micro = state.batch_in_epoch % t.grad_accum
                sync = micro == t.grad_accum - 1
                losses = forward_losses(model, batch, accelerator)
                loss = sum(losses.values())
                bad = accelerator.reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=accelerator.device), "sum")
                if bad.item() > 0:
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    log.write("error", step=state.step + 1, epoch=state.epoch, message="non-finite loss", losses=values)
                    kept = run_dir / "last.safetensors"
                    raise DyheadError(
                        f"loss became non-finite at step {state.step + 1} (epoch {state.epoch}): {values}; training stopped"
                        + (f", the last good checkpoint is {kept}" if kept.exists() else "")
                    )
                context = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                with context:
                    accelerator.backward(loss / t.grad_accum)
                state.batch_in_epoch += 1
                if not sync:
                    continue
                if t.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                set_lr(optimizer, t.lr * lr_factor(state.step, total_steps, t))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
                if state.step % t.log_every == 0 or state.step == total_steps:
                    now = time.perf_counter()
                    speed = (state.step - last_step) * t.batch_size * t.grad_accum * world / max(now - last_time, 1e-9)
                    last_time, last_step = now, state.step
                    values = {k: round(accelerator.reduce(v.detach(), "mean").item(), 6) for k, v in losses.items()}
                    total = round(sum(values.values()), 6)
                    lr = optimizer.param_groups[0]["lr"]
                    log.write("train", step=state.step, epoch=state.epoch, loss=total, lr=lr, images_per_s=round(speed, 2), **values)
                    reporter.step(state.step, {"loss": total, "lr": lr, "images_per_s": speed, **values})
                else:
                    reporter.step(state.step, None)
                if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                    checkpoint()
                if state.step >= total_steps:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
            if state.step >= total_steps:
                state.epoch = max(state.epoch, math.ceil(state.step / max(1, steps_per_epoch)))
                state.batch_in_epoch = 0
            if state.step >= total_steps or (t.eval_every > 0 and state.epoch % t.eval_every == 0):
                metrics = evaluate_now() if main else {}
                if main:
                    log.write("eval", step=state.step, epoch=state.epoch, **metrics_json(metrics))
                    reporter.message(f"epoch {state.epoch} step {state.step}: AP {metrics['AP']:.1f}  AP50 {metrics['AP50']:.1f}")
                    if metrics["AP"] > state.best_ap:
                        state.best_ap = metrics["AP"]
                        raw = accelerator.unwrap_model(model)
                        save_weights(run_dir / "best.safetensors", raw if ema is None else _with_weights(raw, ema.shadow), recipe_dict, {"step": state.step, "AP": metrics["AP"], "category_ids": category_ids})
            checkpoint()
            accelerator.wait_for_everyone()
    finally:
        reporter.finish()
    if world > 1:
        # DDP broadcasts rank 0's buffers (BatchNorm statistics) at each forward; after the last one every
        # replica has updated its own, so make them rank 0's again.
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer, src=0)
    if os.environ.get("DYHEAD_SAVE_EVERY_RANK") == "1":  # debugging aid: compare replicas after a DDP run
        save_weights(run_dir / f"rank{rank}.safetensors", accelerator.unwrap_model(model), recipe_dict)
    if main:
        reporter.message(f"done: {run_dir} (last.safetensors, best.safetensors, metrics.jsonl)")
    return metrics


def forward_losses(model: nn.Module, batch: dict[str, Any], accelerator) -> dict[str, Tensor]:
    device = accelerator.device
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    with accelerator.autocast():
        losses = model(images, batch["image_sizes"], targets)
    return {k: v.float() for k, v in losses.items()}


def _with_weights(model: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(weights)
    return clone
