"""engine/interrupts.py: the first signal is a request; a second Ctrl-C interrupts, a second SIGTERM does not
(torchrun passes its group's SIGTERM on to its workers); the previous handlers come back."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from dyhead_cli.engine.interrupts import StopRequests
from dyhead_cli.errors import Terminated

ONE_PROCESS = SimpleNamespace(num_processes=1)


def deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(1000):  # the handler runs between bytecodes
        pass


@pytest.mark.parametrize(
    "signals, raised",
    [
        ((signal.SIGINT, signal.SIGINT), KeyboardInterrupt),
        ((signal.SIGTERM, signal.SIGINT), KeyboardInterrupt),
        ((signal.SIGTERM, signal.SIGTERM), None),
    ],
)
def test_first_signal_asks_a_second_ctrl_c_interrupts(signals, raised, capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequests()
    with stop:
        assert not stop.requested(ONE_PROCESS)
        deliver(signals[0])
        assert stop.requested(ONE_PROCESS) and stop.name == signal.Signals(signals[0]).name
        assert "stopping after this step" in capfd.readouterr().err
        if raised is None:
            deliver(signals[1])  # the request stands
            assert stop.name == "SIGTERM"
        else:
            with pytest.raises(raised):
                deliver(signals[1])
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def test_interrupt_raises_what_the_cli_reports():
    stop = StopRequests()
    stop.signum = signal.SIGTERM
    with pytest.raises(Terminated):
        stop.interrupt()
    stop.signum = signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stop.interrupt()
