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
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
    signal.signal(signal.SIGCHLD, chld := lambda signum, frame: None)  # as PyTorch's DataLoader sets one
    before = {s: signal.getsignal(s) for s in watched}
    stop = StopRequests()
    with stop:
        assert not stop.requested(ONE_PROCESS) and signal.getsignal(signal.SIGCHLD) is chld
        deliver(signals[0])
        assert stop.requested(ONE_PROCESS) and stop.name == signal.Signals(signals[0]).name
        assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL  # workers dying of the signal interrupt nothing
        assert "stopping after this step" in capfd.readouterr().err
        if raised is None:
            deliver(signals[1])  # the request stands
            assert stop.name == "SIGTERM"
        else:
            with pytest.raises(raised):
                deliver(signals[1])
    assert {s: signal.getsignal(s) for s in watched} == before
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def test_interrupt_raises_what_the_cli_reports():
    stop = StopRequests()
    stop.signum = signal.SIGTERM
    with pytest.raises(Terminated):
        stop.interrupt()
    stop.signum = signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stop.interrupt()
