"""How the engine tells whoever watches a run what it is doing; ``commands/`` draws it (a rich progress
bar in a terminal, plain lines in a log file). The base class is silent, so library callers and
non-main processes report nothing.
"""

from __future__ import annotations

from typing import Any


class Reporter:
    """Callbacks of a training run and of an evaluation. Only the main process reports."""

    def start(self, total_steps: int, completed: int) -> None:
        """The run begins (or resumes at ``completed``) and will end at ``total_steps``."""

    def step(self, step: int, info: dict[str, Any] | None) -> None:
        """Optimizer step ``step`` is done. Every ``log_every`` steps ``info`` has: ``total_steps``,
        ``epoch``, ``epochs``, ``loss`` and each ``loss_*``, ``lr``, ``images_per_s``, ``eta_s`` (seconds
        to the end, evaluations included), ``memory_mb`` (peak CUDA memory, or the process's resident
        memory on CPU); otherwise None."""

    def eval_start(self, num_images: int) -> None:
        """An evaluation over ``num_images`` validation images begins (this process's share)."""

    def eval_advance(self, num_images: int) -> None:
        """``num_images`` more images were run."""

    def eval_end(self, seconds: float) -> None:
        """The evaluation's inference ended after ``seconds``."""

    def message(self, text: str) -> None:
        """A line worth showing (resume, evaluation results, skipped images, the end)."""

    def finish(self) -> None:
        """The run ended (normally or not)."""
