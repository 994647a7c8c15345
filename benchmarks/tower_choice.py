"""Pick the CUDA tower's defaults from a ``gpu_tower.py --sweep`` report, and optionally write them into the source.

    python benchmarks/tower_choice.py tower.json            # print what the report chooses (and why)
    python benchmarks/tower_choice.py tower.json --write    # also set them in models/deform_triton.py, dyhead_cuda.py

Why: the fused deformable conv's tiles and method (``deform_triton.CONFIG`` / ``METHOD``, per dtype) and the
block's end (``dyhead_cuda.EPILOGUE``) are chosen by measurement on a GPU, and device time is short: the GPU
check (``gpu_check.py --apply-tower-choice``) runs this between the tower timings and the detector benchmarks,
so the benchmarks time what the sweep found, and the same command here turns the returned report into the
same source change.

Rules (each a measured win, never a guess):
  - tiles and method, per swept precision: the configuration with the smallest geometric mean, over the
    report's batch sizes, of its ``fused-graph`` median divided by the current default's (the report's
    ``machine.fused_deform_conv``), if it is at least ``--margin`` (3%) faster, was timed at every batch
    size and its outputs are as close to the float32 reference as the default's (at most 1.5x its error);
    float16 takes bfloat16's choice (both 16-bit types, the same bytes per tile; the sweep times bf16 only);
  - for a batch of one image (``deform_triton.SINGLE``): the fastest accurate configuration at batch 1 when
    it is at least the margin faster there than the one above, else none (the same);
  - the block's end (``dyhead_cuda.EPILOGUES``): each end's ``fused-<end>-graph`` rows against the modules'
    end's ``fused-graph`` rows, the geometric mean over the 16-bit precisions and batches and float32 below
    batch 8 (where the fused conv runs in float32), for the ends whose float32 check against the reference
    passed and whose 16-bit errors are within 1.5x of the modules' end's; the fastest, unless it is within
    the margin of the report's current default (``machine.dyhead_epilogue``), which then stays.
Exit 1 when the report cannot be read or a source line to rewrite is not where it is expected.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRITON_SOURCE = ROOT / "dyhead_cli" / "models" / "deform_triton.py"
CUDA_SOURCE = ROOT / "dyhead_cli" / "models" / "dyhead_cuda.py"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ERROR_SLACK = 1.5  # a candidate's error against the float32 reference may be this many times the default's
SAMPLED_MIN_BATCH = 8  # float32 from here on runs grid_sample + GEMM, not the fused conv (dyhead_cuda)
Config = tuple[int, int, int, int, int, str]


def parse_config(variant: str) -> Config | None:
    """'fused-graph (64, 256, 64, 8, 2, taps)' -> (64, 256, 64, 8, 2, 'taps'); None for other rows."""
    m = re.fullmatch(r"fused-graph \((\d+), (\d+), (\d+), (\d+), (\d+), (\w+)\)", variant)
    if not m:
        return None
    *tiles, method = m.groups()
    return (*(int(t) for t in tiles), method)  # type: ignore[return-value]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def default_config(report: dict[str, Any], precision: str) -> Config:
    """The tiles and method the report's run had as ``precision``'s default (its ``machine`` record)."""
    current = report["machine"]["fused_deform_conv"][DTYPES[precision]]
    return (*current["tiles"], current["method"])


def choose_tiles(report: dict[str, Any], precision: str, margin: float) -> tuple[Config | None, str]:
    """(the configuration to use, or None to keep the default; why) from the sweep rows of ``precision``."""
    default = default_config(report, precision)
    batches = report["settings"]["batches"]
    rows: dict[Config, dict[int, dict[str, Any]]] = {}
    for r in report["results"]:
        config = parse_config(r["variant"])
        if config is not None and r["precision"] == precision:
            rows.setdefault(config, {})[r["batch"]] = r
    if default not in rows or set(rows[default]) != set(batches):
        return None, f"{precision}: the default {default} was not timed at every batch size {batches}; kept"
    base = rows[default]
    scored = []
    for config, by_batch in rows.items():
        if set(by_batch) != set(batches):
            continue
        accurate = all(
            by_batch[b]["max_abs_diff_vs_fp32_strict_reference"]
            <= ERROR_SLACK * base[b]["max_abs_diff_vs_fp32_strict_reference"] + 1e-6
            for b in batches
        )
        if accurate:
            scored.append((geomean([by_batch[b]["median_ms"] / base[b]["median_ms"] for b in batches]), config))
    ratio, best = min(scored)
    times = ", ".join(f"b{b} {rows[best][b]['median_ms']:.1f} vs {base[b]['median_ms']:.1f} ms" for b in batches)
    if best == default or ratio > 1.0 - margin:
        return None, f"{precision}: the default {default} kept (best other: {best} at {ratio:.3f}x of it)"
    return best, f"{precision}: {best} at {ratio:.3f}x of the default {default} ({times})"


def fused_epilogue(variant: str) -> str:
    """The block end (``dyhead_cuda.EPILOGUES``) of a fused variant of gpu_tower.py (which imports this
    naming): "fused[-graph]" -> "modules", "fused-<end>[-graph]" -> "<end>"."""
    base = variant.removesuffix("-graph")
    return "modules" if base == "fused" else base.removeprefix("fused-")


def variant_epilogue(variant: str) -> str | None:
    """The block end a CUDA-graph row of the fused tower ran (``fused_epilogue``), None for other rows."""
    if not (variant.startswith("fused") and variant.endswith("-graph")) or " " in variant:
        return None
    return fused_epilogue(variant)


def choose_epilogue(report: dict[str, Any], margin: float) -> tuple[str, str]:
    """(the block end to use, why) from the fused-graph and fused-<end>-graph rows: each end's geometric mean
    ratio to the modules' end; the fastest, unless it is within the margin of the current default."""
    current = report["machine"].get("dyhead_epilogue", "modules")
    strict = report.get("fp32_strict", {})
    by_case: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in report["results"]:
        end = variant_epilogue(r["variant"])
        if end is None or (r["precision"] == "fp32" and r["batch"] >= SAMPLED_MIN_BATCH):
            continue
        by_case.setdefault((r["precision"], r["batch"]), {})[end] = r
    ratios: dict[str, float] = {"modules": 1.0}
    reasons = []
    for end in sorted({e for rows in by_case.values() for e in rows} - {"modules"}):
        check = strict.get(f"fused-{end}")
        if not check or not check["max_abs_diff_vs_reference"] < 1e-3 * max(1.0, check["max_abs_reference"]):
            reasons.append(f"{end}: float32 check against the reference missing or failed ({check})")
            continue
        cases = [(key, rows) for key, rows in sorted(by_case.items()) if "modules" in rows and end in rows]
        worse = [
            f"{p} b{b}"
            for (p, b), rows in cases
            if p != "fp32"
            and rows[end]["max_abs_diff_vs_fp32_strict_reference"]
            > ERROR_SLACK * rows["modules"]["max_abs_diff_vs_fp32_strict_reference"] + 1e-6
        ]
        if worse or not cases:
            reasons.append(f"{end}: error above the modules' end's at {', '.join(worse)}" if worse else f"{end}: not timed")
            continue
        each = [(key, rows[end]["median_ms"] / rows["modules"]["median_ms"]) for key, rows in cases]
        ratios[end] = geomean([r for _, r in each])
        detail = ", ".join(f"{p} b{b} {r:.3f}" for (p, b), r in each)
        reasons.append(f"{end} at {ratios[end]:.3f}x of the modules' end ({detail})")
    best = min(ratios, key=ratios.get)
    if current in ratios and best != current and ratios[best] > ratios[current] * (1.0 - margin):
        best = current  # within the margin of the default: noise
    kept = "kept" if best == current else f"instead of {current}"
    return best, "; ".join([*reasons, f"{best} {kept}"])


KEEP: Any = object()  # choose_single: batch 1 was not timed, the source's choice stays


def choose_single(report: dict[str, Any], precision: str, chosen: Config, margin: float) -> tuple[Any, str]:
    """(the configuration a batch of one image takes, None: the chosen one, KEEP: not timed; why): the
    fastest accurate sweep row at batch 1, where it is at least ``margin`` faster there than ``chosen``."""
    default = default_config(report, precision)
    at_one = {
        config: r
        for r in report["results"]
        if r["precision"] == precision and r["batch"] == 1 and (config := parse_config(r["variant"])) is not None
    }
    if chosen not in at_one or default not in at_one:
        return KEEP, f"{precision}: batch 1 not timed for {chosen} and {default}: one image's choice kept"
    limit = ERROR_SLACK * at_one[default]["max_abs_diff_vs_fp32_strict_reference"] + 1e-6
    accurate = {c: r for c, r in at_one.items() if r["max_abs_diff_vs_fp32_strict_reference"] <= limit}
    best = min(accurate, key=lambda c: accurate[c]["median_ms"])
    ms, base = accurate[best]["median_ms"], at_one[chosen]["median_ms"]
    if best == chosen or ms > (1.0 - margin) * base:
        return None, f"{precision}: one image takes the same ({best} {ms:.1f} ms at batch 1 vs {base:.1f})"
    return best, f"{precision}: one image takes {best} ({ms:.1f} ms at batch 1 vs {base:.1f} for {chosen})"


def choose(report: dict[str, Any], margin: float) -> tuple[dict[str, Config], dict[str, Config | None], str, list[str]]:
    """({dtype name: configuration} to change, {dtype name: configuration for one image, or None}, the
    epilogue, the reasons, one line each)."""
    changes: dict[str, Config] = {}
    singles: dict[str, Config | None] = {}
    reasons = []
    swept = sorted({r["precision"] for r in report["results"] if parse_config(r["variant"])})
    for precision in swept:
        config, why = choose_tiles(report, precision, margin)
        reasons.append(why)
        chosen = config or default_config(report, precision)
        single, why = choose_single(report, precision, chosen, margin)
        reasons.append(why)
        targets = [precision, *(["fp16"] if precision == "bf16" and "fp16" not in swept else [])]
        for target in targets:
            if config is not None:
                changes[DTYPES[target]] = config
            if single is not KEEP:
                singles[DTYPES[target]] = single
        if len(targets) > 1:
            reasons.append("fp16: takes bf16's choice (not swept)")
    epilogue, why = choose_epilogue(report, margin)
    reasons.append(why)
    return changes, singles, epilogue, reasons


def rewrite(path: Path, pattern: str, replace, expected: int) -> None:
    """Substitute ``pattern`` (one line each, re.M) in ``path``; refuse unless exactly ``expected`` lines match."""
    text = path.read_text()
    new, count = re.subn(pattern, replace, text, flags=re.M)
    if count != expected:
        raise SystemExit(f"tower_choice: {path}: expected {expected} line(s) matching {pattern!r}, found {count}")
    path.write_text(new)


def write(changes: dict[str, Config], epilogue: str, singles: dict[str, Config | None] | None = None) -> None:
    """Set the chosen tiles/methods in deform_triton.py's CONFIG / METHOD / SINGLE and the epilogue in
    dyhead_cuda.py."""
    for dtype, config in changes.items():
        tiles = ", ".join(map(str, config[:5]))
        rewrite(TRITON_SOURCE, rf"^    torch\.{dtype}: \(\d+, \d+, \d+, \d+, \d+\),$", f"    torch.{dtype}: ({tiles}),", 1)
        rewrite(TRITON_SOURCE, rf'^    torch\.{dtype}: "\w+",$', f'    torch.{dtype}: "{config[5]}",', 1)
    for dtype, single in (singles or {}).items():
        value = "None" if single is None else f'(({", ".join(map(str, single[:5]))}), "{single[5]}")'
        pattern = rf'^    torch\.{dtype}: (None|\(\(\d+, \d+, \d+, \d+, \d+\), "\w+"\)),$'
        rewrite(TRITON_SOURCE, pattern, f"    torch.{dtype}: {value},", 1)
    rewrite(CUDA_SOURCE, r'^EPILOGUE = "\w+"$', f'EPILOGUE = "{epilogue}"', 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="gpu_tower.py --json output (with --sweep)")
    p.add_argument("--margin", type=float, default=0.03, help="a change must be at least this much faster")
    p.add_argument("--write", action="store_true", help="set the choice in the source files")
    args = p.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        changes, singles, epilogue, reasons = choose(report, args.margin)
    except (OSError, ValueError, KeyError) as e:
        print(f"tower_choice: {args.report}: cannot read the report: {type(e).__name__}: {e}")
        return 1
    for line in reasons:
        print(f"tower_choice: {line}")
    summary = {
        "tiles": {k: list(v[:5]) for k, v in changes.items()},
        "methods": {k: v[5] for k, v in changes.items()},
        "single": {k: None if v is None else [*v[:5], v[5]] for k, v in singles.items()},
    }
    print(f"tower_choice: changes {json.dumps(summary)}; epilogue {epilogue}")
    if args.write:
        write(changes, epilogue, singles)
        print(f"tower_choice: written to {TRITON_SOURCE.relative_to(ROOT)} and {CUDA_SOURCE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
