"""Stopping a training cleanly on Ctrl-C or SIGTERM, so that nothing trained is lost.

A cluster ends a job with SIGTERM (Slurm on pre-emption or at its time limit, ``docker stop``, Kubernetes)
and a person with Ctrl-C. Raising at once (what the CLI does for other commands) leaves a run at its last
checkpoint, up to an epoch back. While ``train`` runs, ``StopRequests`` turns the first signal into a
request instead: the loop finishes the optimizer step it is in, writes a checkpoint there, records an
``interrupted`` event and only then stops (exit 130 / 143 as before), so ``--resume`` continues from that
step. A second Ctrl-C stops at once; a second SIGTERM does not (torchrun passes the SIGTERM its process
group already got on to its workers, and a scheduler that loses patience sends SIGKILL anyway). With
several processes the ranks agree at every step (a sum over them), so all stop after the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, NoReturn

import torch

from dyhead_cli.errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A context: while inside it (main thread only), SIGINT / SIGTERM set ``signum`` the first time; a later
    SIGINT interrupts; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            self._quiet_worker_deaths()
            # os.write, not print: a signal handler may run in the middle of the console's own writing
            os.write(2, b"\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)\n")
            return
        if signum != signal.SIGINT:
            return  # SIGTERM again: a launcher passing it on (torchrun does), or a scheduler repeating it
        self.__exit__()
        self.signum = signum
        self.interrupt()

    def _quiet_worker_deaths(self) -> None:
        """The group's signal also ends the DataLoader workers, and PyTorch's SIGCHLD handler raises a worker's
        death wherever the main process is: inside an optimizer step nothing whole is left to save. Once a stop
        is asked, SIGCHLD takes its default (nothing happens; restored on exit): the step ends and the loop
        stops at its check, and a loader that still needs a dead worker says so at its next batch, between
        steps, where the state is whole."""
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._previous and self._previous:
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def requested(self, accelerator: Any) -> bool:
        """Whether any process was asked to stop (a sum over the processes when there are several)."""
        flag = self.signum is not None
        if accelerator.num_processes > 1:
            total = accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "sum")
            flag = bool(total.item() > 0)
        return flag

    def interrupt(self) -> NoReturn:
        """Raise what the CLI reports: ``Terminated`` for SIGTERM (exit 143), else ``KeyboardInterrupt`` (130)."""
        if self.signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()
