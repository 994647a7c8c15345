"""engine/interrupts.py: the first signal is a request, the second interrupts; handlers come back."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from dyhead_cli.engine.interrupts import StopRequests
from dyhead_cli.errors import Terminated

ONE_PROCESS = SimpleNamespace(num_processes=1)


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_first_signal_asks_second_interrupts(sig, raised, capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequests()
    with stop:
        assert not stop.requested(ONE_PROCESS)
        os.kill(os.getpid(), sig)
        assert stop.requested(ONE_PROCESS) and stop.name == signal.Signals(sig).name
        assert "stopping after this step" in capfd.readouterr().err
        with pytest.raises(raised):
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before
    with pytest.raises(raised):
        stop.interrupt()
