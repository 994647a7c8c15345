"""The training loop: Accelerate for devices, processes and mixed precision; our own small loop for the rest.

Why our own sampler and accumulation instead of ``accelerator.prepare(dataloader)``/``accumulate``: a
resumed run must continue exactly where the last checkpoint left off. The data order of an epoch is a
permutation seeded by (seed, epoch), each sample's augmentation is seeded by (seed, epoch, index), and a
checkpoint records how many batches of the epoch were consumed: resuming skips them and replays nothing.

Order of work, so that a mistake costs seconds and a crash loses nothing: resolve the recipe and the
precision, build the model on the meta device, check the paths and that the output folder can be
written (``engine.run_dir``), load (or make) the data and check the validation images, and only then
create and lock the run directory. At each epoch end the checkpoint is written before the evaluation.
A step whose loss or gradients are not finite stops the run before ``optimizer.step()``, so the last
checkpoint holds the state before that step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from dyhead_cli.data.coco import CocoDetection, build_dataset
from dyhead_cli.data.loaders import (
    EpochSampler,
    EpochSeeded,
    aspect_groups,
    clean_worker_errors,
    train_loader,
)
from dyhead_cli.engine import recipes
from dyhead_cli.engine.checkpoint import (
    atomic_write_text,
    load_model_weights,
    load_train_state,
    read_safetensors,
    save_train_state,
    save_weights,
)
from dyhead_cli.engine.distributed import destroy_process_group_at_exit
from dyhead_cli.engine.env_info import write_env
from dyhead_cli.engine.evaluate import (
    coco_evaluate,
    metrics_json,
    predict_shard,
    write_plots,
)
from dyhead_cli.engine.interrupts import StopRequests
from dyhead_cli.engine.optim import (  # noqa: F401 (re-exported)
    EMA,
    build_optimizer,
    grad_norm,
    lr_factor,
    param_groups,
    set_lr,
)
from dyhead_cli.engine.preflight import (
    accelerate_choice,
    check_inputs,
    check_model,
    check_trackers,
    check_train_images,
    check_val_images,
)
from dyhead_cli.engine.progress import Reporter
from dyhead_cli.engine.recipe_fit import category_difference
from dyhead_cli.engine.run_clock import Clock, autocast_dtype, evals_left, memory_mb
from dyhead_cli.engine.run_dir import (
    STATE_FILE,
    RunLock,
    best_ap,
    check_out_dir,
    check_writable,
    clear_run,
    forget_failed_start,
    is_run,
    keep_previous,
    remove_stale_tmp,
    resume_recipe,
    roll_back_if_poisoned,
)
from dyhead_cli.engine.run_log import MetricsLog, read_events
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import Recipe, dump_toml, to_dict

__all__ = ["EpochSampler", "Reporter", "lr_factor", "train", "train_from_files"]


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train_from_files(
    recipe_path: Path | None,
    out: Path | None,
    resume: Path | None,
    overrides: list[str],
    reporter: Reporter | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``dyhead train [RECIPE] [--out DIR | --resume DIR] [--force] [--set k=v]``."""
    if resume is not None:
        resume = Path(resume)
        if out is not None and Path(out).resolve() != resume.resolve():
            raise DyheadError(f"--out {out} with --resume {resume}: a resumed run continues in its own folder; drop --out")
        if force:
            raise DyheadError("--force starts a run over; it does not go with --resume")
        recipe, changes = resume_recipe(resume, recipe_path, overrides)
        return train(recipe, resume, resume=True, reporter=reporter, changes=changes)
    if recipe_path is None:
        raise DyheadError("give a RECIPE to train (or --resume RUN_DIR to continue a run)")
    recipe = recipes.load(recipe_path, overrides)
    return train(
        recipe, Path(out) if out else default_run_dir(recipe), reporter=reporter, force=force, inputs=[Path(recipe_path)]
    )


def train(
    recipe: Recipe,
    run_dir: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    force: bool = False,
    changes: dict[str, list[Any]] | None = None,
    inputs: list[Path] | None = None,
) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir``; return the last evaluation's metrics (empty if none ran)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = recipe.train
    run_dir = Path(run_dir)
    t.mixed_precision, cpu = accelerate_choice(t, resume)
    check_model(recipe.model)
    check_trackers(t.log_with)
    data_paths = check_inputs(recipe.data)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=cpu, log_with=t.log_with or None, project_dir=str(run_dir))
    t.device = accelerator.device.type if accelerator.device.type in ("cpu", "cuda") else t.device
    main = accelerator.is_main_process
    world = accelerator.num_processes
    if world > 1:
        destroy_process_group_at_exit()  # else Gloo's threads may abort the process as it exits
    reporter = reporter if reporter is not None and main else Reporter()
    if main:
        if not resume:
            check_out_dir(run_dir, list(inputs or []) + data_paths, force)
        check_writable(run_dir)
    set_seed(t.seed)

    dataset = build_dataset(recipe.data, "train", seed=t.seed)
    resolve_classes(recipe, dataset)
    val_data = build_dataset(recipe.data, "val")
    difference = category_difference(
        list(zip(dataset.cat_ids, dataset.class_names)), list(zip(val_data.cat_ids, val_data.class_names))
    )
    if difference:  # labels are positions among each file's sorted ids: they would not line up
        raise DyheadError(
            f"validation annotation file {recipe.data.val_ann} lists other categories than {recipe.data.train_ann}: it {difference}"
        )
    check_train_images(dataset)
    check_val_images(val_data)
    category_ids = list(dataset.cat_ids)  # label i <-> the data set's category id, for predict

    lock = RunLock(run_dir)
    created = not run_dir.exists()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        if not resume and is_run(run_dir) and not force:
            lock.release()
            check_out_dir(run_dir, [], force)  # another run appeared since the check: refuse the same way
        if force and not resume:
            clear_run(run_dir)
        remove_stale_tmp(run_dir)
        if not resume:
            atomic_write_text(run_dir / "recipe.toml", dump_toml(to_dict(recipe)))
        write_env(
            run_dir / "env.json",
            {
                "mixed_precision": accelerator.mixed_precision,
                "device": str(accelerator.device),
                "num_processes": world,
                "distributed_type": str(accelerator.distributed_type),
                "resumed": resume,
            },
        )
        if t.log_with:
            accelerator.init_trackers(recipe.name, config=_scalars(to_dict(recipe)))
    accelerator.wait_for_everyone()
    progress = {"stepped": False}  # set by _run at its first optimizer step
    try:
        return _run(recipe, run_dir, resume, reporter, accelerator, dataset, val_data, category_ids, changes or {}, progress)
    finally:
        if main:
            if t.log_with:
                accelerator.end_training()
            if not progress["stepped"] and not resume:  # before the lock goes: no other run can be in there
                forget_failed_start(run_dir, created)
            lock.release()


def resolve_classes(recipe: Recipe, dataset: CocoDetection) -> None:
    """Take the data set's class names (and count, where the recipe keeps the default 80)."""
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


def evaluated_at(run_dir: Path, step: int) -> bool:
    """Whether metrics.jsonl records an evaluation at ``step`` (the one after a checkpoint may not have run)."""
    return any(e.get("event") == "eval" and e.get("step") == step for e in read_events(run_dir / "metrics.jsonl"))


class RunState:
    """The counters a checkpoint stores (and a resume restores)."""

    def __init__(self, step: int = 0, epoch: int = 0, batch_in_epoch: int = 0, best_ap: float = -1.0) -> None:
        self.step, self.epoch, self.batch_in_epoch, self.best_ap = step, epoch, batch_in_epoch, best_ap


def _run(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    reporter: Reporter,
    accelerator,
    dataset: CocoDetection,
    val_data: CocoDetection,
    category_ids: list[int],
    changes: dict[str, list[Any]],
    progress: dict[str, bool] | None = None,
) -> dict[str, Any]:
    t = recipe.train
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    log = MetricsLog(run_dir, main, accelerator.log if t.log_with else None)
    recipe_dict = to_dict(recipe)

    model = build_model_for(recipe)
    optimizer = build_optimizer(t, model)
    state = RunState()
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    seeded = EpochSeeded(dataset, t.seed)
    groups = aspect_groups(dataset) if recipe.data.group_by_aspect else None
    steps_per_epoch = (
        len(EpochSampler(len(dataset), t.batch_size, t.seed, 0, rank, world, 0, t.grad_accum, groups)) // t.grad_accum
    )
    total_steps = min(t.max_steps or 10**12, t.epochs * steps_per_epoch)
    last_epoch = min(t.epochs, math.ceil(total_steps / max(1, steps_per_epoch)))
    if resume:
        tensors, _ = read_safetensors(run_dir / STATE_FILE)
        load_model_weights(
            model, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, str(run_dir / STATE_FILE)
        )
        counters, ema_tensors = load_train_state(run_dir / STATE_FILE, optimizer)
        state = RunState(**counters)
        state.best_ap = max(state.best_ap, best_ap(run_dir))  # an evaluation after the last checkpoint may have set a best
        if ema is not None and ema_tensors:
            ema.shadow = ema_tensors
        if state.step > total_steps:  # refused before the resume (and its changes) is recorded
            raise DyheadError(
                f"--resume {run_dir}: the run is at step {state.step}, past the end (step {total_steps}) that train.epochs = "
                f"{t.epochs}" + (f" and train.max_steps = {t.max_steps}" if t.max_steps else "") + " give; nothing to train"
            )
        if state.step == total_steps and evaluated_at(run_dir, state.step):  # nothing recorded: nothing happens
            reporter.message(
                f"{run_dir} is finished: step {state.step} of {total_steps}, evaluated; nothing to train (more: "
                f"--resume {run_dir} --set train.max_steps=N, or train.epochs=N)"
            )
            return {}
        log.rewind(state.step)  # what was logged past the checkpoint is done again
        log.write("resume", step=state.step, epoch=state.epoch, changed=changes)
        said = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        reporter.message(
            f"resuming {run_dir} at step {state.step} (epoch {min(state.epoch + 1, last_epoch)} of {last_epoch})"
            + (f" with {said}" if said else "")
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:  # made (or loaded) on the CPU: the model it follows is on the accelerator's device now
        ema.shadow = {k: v.to(accelerator.device) for k, v in ema.shadow.items()}

    if main and not resume:
        log.write(
            "start",
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=last_epoch,
            num_processes=world,
            mixed_precision=accelerator.mixed_precision,
            autocast=autocast_dtype(accelerator),
            device=str(accelerator.device),
            train_images=len(dataset),
            val_images=len(val_data),
        )
    clock = Clock(t.batch_size * t.grad_accum * world, len(val_data))
    metrics: dict[str, Any] = {}

    def checkpoint() -> None:
        if not main:
            return
        keep_previous(run_dir)
        raw = accelerator.unwrap_model(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one
        save_train_state(run_dir / STATE_FILE, inner, vars(state), ema.shadow if ema else None, model=raw.state_dict())
        export = raw if ema is None else _with_weights(raw, ema.shadow)
        save_weights(
            run_dir / "last.safetensors",
            export,
            recipe_dict,
            {"step": state.step, "epoch": state.epoch, "category_ids": category_ids},
        )
        log.write("checkpoint", step=state.step, epoch=state.epoch, path=str(run_dir / "last.safetensors"))

    def same_buffers() -> None:
        """Make every replica's buffers (BatchNorm statistics, EMA's too) rank 0's. DDP broadcasts rank 0's
        at each forward; after the last one each replica has updated its own, so an evaluation would score
        each rank's share with another model (and the final weights would differ by rank)."""
        if world == 1:
            return
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer, src=0)
        if ema is not None:
            for tensor in ema.shadow.values():
                torch.distributed.broadcast(tensor, src=0)

    def evaluate_now() -> dict[str, Any]:
        started = time.perf_counter()
        same_buffers()
        raw = accelerator.unwrap_model(model)
        net = raw if ema is None else _with_weights(raw, ema.shadow)
        results = predict_shard(net, val_data, recipe, accelerator.device, rank, world, reporter)
        raw.train()
        if world > 1:
            from accelerate.utils import gather_object

            results = gather_object(results)  # every rank's share, to every rank; rank 0 scores them
        out = coco_evaluate(val_data.coco, results) if main else {}
        if main:
            epoch = state.epoch + (state.batch_in_epoch > 0)  # the epoch it was in, when it ended mid-epoch
            log.write("eval", step=state.step, epoch=epoch, **metrics_json(out))
            reporter.message(
                f"eval  epoch {epoch} step {state.step}: AP {out['AP']:.1f}  AP50 {out['AP50']:.1f}  AP75 {out['AP75']:.1f}  "
                f"AR100 {out['AR100']:.1f}  ({time.perf_counter() - started:.1f} s)"
            )
            if out["AP"] > state.best_ap:
                state.best_ap = out["AP"]
                save_weights(
                    run_dir / "best.safetensors",
                    net,
                    recipe_dict,
                    {"step": state.step, "AP": out["AP"], "category_ids": category_ids},
                )
                atomic_write_text(run_dir / "val_predictions.json", json.dumps(results))
                write_plots(out, val_data.coco, results, run_dir)
            _plot_results(run_dir)
        clock.evaluated(time.perf_counter() - started)
        return out

    if resume and state.step > 0 and (state.batch_in_epoch == 0 or state.step >= total_steps):
        due = state.step >= total_steps or (t.eval_every > 0 and state.epoch % t.eval_every == 0)
        if due and not evaluated_at(
            run_dir, state.step
        ):  # the run was stopped in the evaluation that follows its checkpoint: do it now
            metrics = evaluate_now()
    model.train()
    reporter.start(total_steps, state.step)
    clock.restart(state.step)
    skipped = 0
    summed: dict[str, Tensor] = {}
    stop = StopRequests()

    def stop_here() -> NoReturn:
        """At a step boundary after Ctrl-C / SIGTERM: checkpoint, record it, interrupt."""
        checkpoint()
        log.write("interrupted", step=state.step, epoch=state.epoch, signal=stop.name)
        reporter.message(f"stopped at step {state.step} ({stop.name}); continue with: dyhead train --resume {run_dir}")
        stop.interrupt()

    # whole: the counters, weights and optimizer agree, so a checkpoint may be written after an exception:
    # True from an optimizer step's end through the next group's first forward and backward (gradients are
    # not saved), False from its batch count until the step is counted (grad_accum: the whole group)
    whole = True
    stop.__enter__()  # the loop below is long; a with-block would indent it once more
    try:
        while state.step < total_steps and state.epoch < t.epochs:
            loader = train_loader(seeded, recipe, state.epoch, rank, world, state.batch_in_epoch, groups)
            for batch in clean_worker_errors(loader):
                skipped += batch["num_skipped"]
                micro = state.batch_in_epoch % t.grad_accum
                sync = micro == t.grad_accum - 1
                losses = forward_losses(model, batch, accelerator, recipe)
                loss = sum(losses.values())
                for k, v in losses.items():  # the logged losses: the mean over the accumulated micro-batches
                    summed[k] = summed[k] + v.detach() if k in summed else v.detach()
                _stop_if_not_finite(accelerator, loss, "loss", state, run_dir, log, losses)
                context = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                with context:
                    accelerator.backward(loss / t.grad_accum)
                whole = False  # from here the counters run ahead of the weights until the step is counted
                state.batch_in_epoch += 1
                if not sync:
                    continue
                if accelerator.mixed_precision == "fp16":  # the grad scaler skips inf steps itself
                    if t.clip_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                else:
                    norm = grad_norm(model.parameters(), t.clip_grad_norm)
                    _stop_if_not_finite(accelerator, norm, "gradient norm", state, run_dir, log, losses)
                losses = {k: v / t.grad_accum for k, v in summed.items()}
                summed.clear()
                set_lr(optimizer, t.lr * lr_factor(state.step, total_steps, t))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if progress is not None:
                    progress["stepped"] = True
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
                whole = True
                clock.stepped(state.step)
                if state.step % t.log_every == 0 or state.step == total_steps:
                    values = {k: round(accelerator.reduce(v.detach(), "mean").item(), 6) for k, v in losses.items()}
                    total = round(sum(values.values()), 6)
                    lr = optimizer.param_groups[0]["lr"]
                    speed = clock.images_per_s()
                    remaining_evals = evals_left(state.epoch, last_epoch, t.eval_every)
                    eta = clock.eta(total_steps - state.step, remaining_evals)
                    memory = memory_mb(accelerator.device)
                    log.write(
                        "train", step=state.step, epoch=state.epoch, loss=total, lr=lr, images_per_s=round(speed, 2), **values
                    )
                    reporter.step(
                        state.step,
                        {
                            "total_steps": total_steps,
                            "epoch": state.epoch + 1,
                            "epochs": last_epoch,
                            "loss": total,
                            "lr": lr,
                            "images_per_s": speed,
                            "eta_s": eta,
                            "memory_mb": memory,
                            **values,
                        },
                    )
                else:
                    reporter.step(state.step, None)
                if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                    checkpoint()
                if stop.requested(accelerator):
                    stop_here()
                if state.step >= total_steps:
                    break
            if state.batch_in_epoch >= steps_per_epoch * t.grad_accum:  # the epoch is complete
                whole = False
                state.epoch += 1
                state.batch_in_epoch = 0
                whole = True
                count = int(accelerator.reduce(torch.tensor([skipped], device=accelerator.device), "sum").item())
                log.write("epoch", step=state.step, epoch=state.epoch, skipped=count)
                if count:
                    reporter.message(f"epoch {state.epoch}: {count} unreadable training images skipped (data.skip_corrupt)")
                skipped = 0
            # a run that ends mid-epoch (train.max_steps) keeps its place in the epoch: a resume with a larger
            # max_steps continues there (setting the epoch as done skipped its rest, or ended the run at once)
            checkpoint()  # before the evaluation: a crash there loses no training
            if state.step >= total_steps or (t.eval_every > 0 and state.epoch % t.eval_every == 0):
                metrics = evaluate_now()
            if state.step < total_steps and stop.requested(accelerator):  # asked during the evaluation
                stop_here()
            clock.restart(state.step)
    except Exception:
        # after a signal, DataLoader workers may die of it (torchrun and Slurm signal every process), and
        # PyTorch raises that wherever the main process is: between optimizer steps of a one-process run the
        # state is whole, so save it as if the loop had reached its check; otherwise (inside a step: the
        # counters or the weights half updated; several processes: another rank may be inside a
        # collective) stop as the signal asked
        if stop.signum is None:
            raise
        if not whole or world > 1:
            reporter.message(
                f"stopped at step {state.step} without a checkpoint there (a DataLoader worker ended with the signal; "
                f"with several processes use data.num_workers = 0 for a stop with one): --resume continues from the last"
            )
            stop.interrupt()
        stop_here()
    finally:
        stop.__exit__()
        reporter.finish()
    same_buffers()
    if os.environ.get("DYHEAD_SAVE_EVERY_RANK") == "1":  # debugging aid: compare replicas after a DDP run
        save_weights(run_dir / f"rank{rank}.safetensors", accelerator.unwrap_model(model), recipe_dict)
    if main:
        _plot_results(run_dir)
        files = [n for n in ("last.safetensors", "best.safetensors", "metrics.csv", "results.png") if (run_dir / n).exists()]
        best = f"best AP {state.best_ap:.1f}; " if state.best_ap >= 0 else "not evaluated; "
        reporter.message(f"done: {run_dir} ({best}{', '.join(files)})")
    return metrics


def build_model_for(recipe: Recipe) -> nn.Module:
    from dyhead_cli.models.build import build_model

    return build_model(recipe.model)


def forward_losses(model: nn.Module, batch: dict[str, Any], accelerator, recipe: Recipe | None = None) -> dict[str, Tensor]:
    """The named losses of one batch (float32). A batch whose images were all skipped (unreadable) is run
    as one blank image with its losses times zero: every process still does a forward and a backward, so
    the processes of a distributed run stay in step."""
    device = accelerator.device
    if len(batch["image_sizes"]) == 0:
        side = recipe.data.min_sizes[0] if recipe is not None else 128
        div = recipe.data.size_divisibility if recipe is not None else 32
        padded = -(-side // div) * div
        images = torch.zeros(1, 3, padded, padded, device=device)
        targets = [{"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device)}]
        with accelerator.autocast():
            losses = model(images, [(side, side)], targets)
        return {k: v.float() * 0.0 for k, v in losses.items()}
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    with accelerator.autocast():
        losses = model(images, batch["image_sizes"], targets)
    return {k: v.float() for k, v in losses.items()}


def _stop_if_not_finite(
    accelerator, value: Tensor, what: str, state: RunState, run_dir: Path, log: MetricsLog, losses: dict[str, Tensor]
) -> None:
    """Stop (on every process) when ``value`` is not finite on any of them, before it reaches the weights.

    The weights of the failing step's forward are those the previous step wrote: when the last checkpoint
    holds exactly them, it is rolled back to the one before (``keep_previous``), so that a resume with a
    lower lr redoes the step that led here instead of starting from weights known to fail.
    """
    bad = accelerator.reduce(torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=accelerator.device), "sum")
    if bad.item() == 0:
        return
    values = {k: float(v.detach()) for k, v in losses.items()}
    step = state.step + 1
    saved = roll_back_if_poisoned(run_dir, step) if accelerator.is_main_process else None
    log.write("error", step=step, epoch=state.epoch, message=f"non-finite {what}", losses=values, checkpoint_step=saved)
    if saved is None:
        where = "; no checkpoint holds a state before it: start over with a lower train.lr"
    else:
        where = (
            f"; the checkpoint {run_dir / STATE_FILE} (step {saved}) holds the state before it: continue with "
            f"'dyhead train --resume {run_dir} --set train.lr=<lower>' (or train.clip_grad_norm)"
        )
    raise DyheadError(f"{what} became non-finite at step {step} (epoch {state.epoch + 1}): {values}; training stopped{where}")


def _plot_results(run_dir: Path) -> None:
    from dyhead_cli.engine.plots import plot_results

    plot_results(read_events(run_dir / "metrics.jsonl"), run_dir / "results.png")


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The recipe flattened for trackers' hyperparameter tables (lists as text)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _with_weights(model: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(weights)
    return clone
