"""``dyhead benchmark``: latency, throughput, memory, parameters and FLOPs, stage by stage (see measure.py)."""

from __future__ import annotations

from typing import Any

from dyhead_cli.commands.benchmark.measure import benchmark_from_cli, render_table
from dyhead_cli.commands.console import console, err_console


def run(**kwargs: Any) -> dict:
    report = benchmark_from_cli(
        **kwargs, log=lambda message: err_console.print(message, style="dim", markup=False, highlight=False)
    )
    console.print(render_table(report))
    return report
