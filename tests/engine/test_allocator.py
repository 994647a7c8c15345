"""The dyhead process keeps freed memory for reuse (glibc's mallopt), unless told not to."""

from __future__ import annotations

import sys

import pytest

from dyhead_cli.engine import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_thresholds(monkeypatch):
    monkeypatch.delenv("DYHEAD_MALLOC", raising=False)
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("not glibc")
    assert allocator.keep_freed_memory() is True


def test_system_malloc_is_left_alone(monkeypatch):
    monkeypatch.setenv("DYHEAD_MALLOC", "system")
    called = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: called.append(a))
    assert allocator.keep_freed_memory() is False and not called


def test_the_cli_sets_it_at_start(monkeypatch):
    from typer.testing import CliRunner

    from dyhead_cli.cli import app

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0 and calls == [1]
