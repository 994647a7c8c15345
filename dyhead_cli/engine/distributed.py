"""Process-group hygiene for multi-process runs (``accelerate launch``, ``torchrun``).

Why: a process that exits with its torch.distributed process group still alive can abort at interpreter
shutdown ("terminate called without an active exception", SIGABRT): Gloo's worker threads outlive the
objects they use (pytorch/pytorch#190489). A finished multi-process run then exits non-zero at random.
PyTorch asks every process to call ``destroy_process_group`` at the end; an ``atexit`` handler does it while
the interpreter is still whole, also when the run ends by an exception, and leaves repeated in-process
calls (the Python API) working, which a destroy at the end of ``train`` would not.
"""

from __future__ import annotations

import atexit
import functools

import torch


def destroy_process_group() -> None:
    """Destroy the default process group if there is one (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Register ``destroy_process_group`` to run at interpreter exit, once per process."""
    atexit.register(destroy_process_group)
