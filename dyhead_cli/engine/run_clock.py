"""Speed, ETA and memory of a training run, for the log lines and the progress bar."""

from __future__ import annotations

import resource
import time

import torch


def autocast_dtype(accelerator) -> str:
    """The dtype autocast really uses inside ``accelerator.autocast()`` ('float32' when it is off)."""
    kind = accelerator.device.type
    with accelerator.autocast():
        on = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if on else torch.float32
    return str(dtype).replace("torch.", "")


def evals_left(epoch: int, last_epoch: int, every: int) -> int:
    """Evaluations still to come after ``epoch`` epochs: every ``every`` epochs, and one at the end."""
    due = {e for e in range(epoch + 1, last_epoch + 1) if every > 0 and e % every == 0}
    return len(due | {last_epoch}) if epoch < last_epoch else 0


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or on CPU the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Clock:
    """Speed and ETA: seconds per step (evaluations left out) and the last evaluation's duration (before
    the first one: the validation images at the training speed, a rough upper bound)."""

    def __init__(self, images_per_step: int, val_images: int) -> None:
        self.images_per_step, self.val_images = images_per_step, val_images
        self.eval_s: float | None = None
        self.step_s: float | None = None
        self.restart(0)

    def restart(self, step: int) -> None:
        self.t0 = self.last_t = self.now = time.perf_counter()
        self.step0 = self.last_step = self.step = step

    def stepped(self, step: int) -> None:
        now = time.perf_counter()
        if step > self.step0:
            self.step_s = (now - self.t0) / (step - self.step0)
        self.now, self.step = now, step

    def images_per_s(self) -> float:
        speed = (self.step - self.last_step) * self.images_per_step / max(self.now - self.last_t, 1e-9)
        self.last_t, self.last_step = self.now, self.step
        return speed

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds

    def eta(self, steps_left: int, evals_left: int) -> float:
        step_s = self.step_s or 0.0
        eval_s = self.eval_s if self.eval_s is not None else self.val_images * step_s / max(1, self.images_per_step)
        return steps_left * step_s + evals_left * eval_s
