"""``dyhead benchmark``'s report as rich tables, Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dyhead_cli.commands.benchmark.settings import STAGE_TITLES, STAGES
from dyhead_cli.commands.benchmark.timing import tower_share
from dyhead_cli.engine.paths import write_text_atomic

# ----------------------------------------------------------------------------------------------------
# output


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _g(n: int) -> str:
    return f"{n / 1e9:.2f}"


RESULT_HEADERS = ["model", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "peak MB"]
STAGE_HEADERS = ["model", "batch"] + [f"{STAGE_TITLES[n]} ms" for n in STAGES] + ["sum ms", "DyHead share"]
MODEL_HEADERS = ["model", "params M", "GFLOPs/img", "backbone", "FPN", "DyHead (deformable)", "head"]


def result_cells(r: dict) -> list[str]:
    lat = r["latency_ms"]
    return [
        r["model"],
        str(r["batch_size"]),
        f"{lat['p50']:.1f}",
        f"{lat['p90']:.1f}",
        f"{lat['p99']:.1f}",
        f"{r['images_per_s']:.2f}",
        "-" if r.get("peak_memory_kind") == "not measured" else _mb(r["peak_memory_bytes"]),
    ]


def stage_cells(r: dict) -> list[str]:
    st = r["stages_ms"]
    share = r.get("dyhead_share", tower_share(st))
    return [r["model"], str(r["batch_size"])] + [f"{st[n]:.1f}" for n in STAGES] + [f"{sum(st.values()):.1f}", f"{share:.0%}"]


def model_cells(m: dict) -> list[str]:
    f = m["flops_per_image"]
    if not f:  # an exported model (--onnx): no parameter or FLOP count
        return [m["name"]] + [""] * 6
    if "backbone" not in f:
        return [m["name"], f"{m['params'] / 1e6:.2f}", _g(f["total"]), "", "", "", ""]
    return [
        m["name"],
        f"{m['params'] / 1e6:.2f}",
        _g(f["total"]),
        _g(f["backbone"]),
        _g(f["fpn"]),
        f"{_g(f['dyhead'])} ({_g(f['dyhead_deformable'])})",
        _g(f["head"]),
    ]


def ratio_line(x: dict) -> str:
    sign = "+" if x["difference_ms"] >= 0 else "-"
    return (
        f"batch {x['batch_size']}: {x['model']} / {x['vs']} = {x['ratio_p50']:.2f}x p50 ({sign}{abs(x['difference_ms']):.1f} ms)"
    )


def tower_ratio_line(x: dict) -> str:
    return f"batch {x['batch_size']}: DyHead tower of {x['model']} / head of {x['vs']} = {x['ratio_p50']:.2f}x (stage medians)"


def _rich_table(title: str, headers: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def render_table(report: dict):
    """The report as rich tables (latency, stages, model sizes) and the ratio lines."""
    from rich.console import Group
    from rich.text import Text

    s, m = report["settings"], report["machine"]
    title = (
        f"dyhead benchmark: {s['size'][0]}x{s['size'][1]}, {s['precision']}, {s['device']}"
        f"{', channels-last' if s['channels_last'] else ''}{', compiled' if s['compile'] else ''}, "
        f"{s['threads']} threads, {s['iters']} timed after {s['warmup']} warm-up"
    )
    rows = report["results"]
    parts: list[Any] = [_rich_table(title, RESULT_HEADERS, [result_cells(r) for r in rows])]
    staged = [r for r in rows if "stages_ms" in r]
    if staged:
        parts.append(_rich_table("stages (median, each run alone)", STAGE_HEADERS, [stage_cells(r) for r in staged]))
    parts.append(_rich_table("size (GFLOPs per image)", MODEL_HEADERS, [model_cells(x) for x in report["models"].values()]))
    parts += [Text(ratio_line(x)) for x in report["ratios"]]
    parts += [Text(tower_ratio_line(x)) for x in report.get("tower_ratios", [])]
    gpu = f", {m['gpu']} (driver {m.get('driver') or '?'}, CUDA {m['cuda']})" if m["gpu"] else ""
    parts.append(
        Text(
            f"{m['cpu']} ({m['cpu_cores_usable']} cores; {m.get('cpu_vector_extensions') or 'vector extensions unknown'}; "
            f"torch kernels {m.get('torch_cpu_capability')}){gpu}; torch {m['torch']}, "
            f"torchvision {m['torchvision']}; {s.get('timer', 'timer ?')}; load average {m['load_average_start']} -> "
            f"{m['load_average_end']}",
            style="dim",
        )
    )
    return Group(*parts)


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def to_markdown(report: dict) -> str:
    """The report as a Markdown document: command, machine, settings, results, stages, ratios, notes."""
    models = report["models"]
    out = ["# dyhead benchmark", "", "```", report["command"], "```", "", "## Machine", ""]
    out += _md_table(["", ""], [[k, str(v)] for k, v in report["machine"].items()])
    out += ["", "## Settings", ""]
    out += _md_table(["", ""], [[k, str(v)] for k, v in report["settings"].items()])
    out += ["", "## Results", ""]
    out += _md_table(RESULT_HEADERS, [result_cells(r) for r in report["results"]])
    staged = [r for r in report["results"] if "stages_ms" in r]
    if staged:
        out += ["", "## Stages (median ms, each run alone)", ""]
        out += _md_table(STAGE_HEADERS, [stage_cells(r) for r in staged])
    if report["ratios"]:
        out += ["", "## Ratios", ""] + [f"- {ratio_line(x)}" for x in report["ratios"]]
        out += [f"- {tower_ratio_line(x)}" for x in report.get("tower_ratios", [])]
    out += ["", "## Models (GFLOPs per image)", ""]
    out += _md_table(
        MODEL_HEADERS + ["levels"],
        [model_cells(m) + [" ".join(f"{h}x{w}" for h, w in m.get("levels", []))] for m in models.values()],
    )
    out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def write_outputs(report: dict, json_out: Path | None, markdown_out: Path | None) -> None:
    for path, text in ((json_out, lambda: json.dumps(report, indent=2) + "\n"), (markdown_out, lambda: to_markdown(report))):
        if path is None:
            continue
        write_text_atomic(path, text())
