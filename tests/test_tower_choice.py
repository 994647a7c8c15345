"""benchmarks/tower_choice.py: the CUDA tower's defaults picked from a sweep report (faster by the margin, as
accurate, timed at every batch size) and written into copies of the two source files, line for line."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def choice(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("tower_choice", ROOT / "benchmarks" / "tower_choice.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tower_choice"] = module
    spec.loader.exec_module(module)
    for name in ("TRITON_SOURCE", "CUDA_SOURCE"):
        copy = tmp_path / getattr(module, name).name
        shutil.copy(getattr(module, name), copy)
        monkeypatch.setattr(module, name, copy)
    yield module
    sys.modules.pop("tower_choice", None)


def row(precision: str, batch: int, variant: str, ms: float, diff: float = 0.03) -> dict:
    return {
        "precision": precision,
        "batch": batch,
        "variant": variant,
        "median_ms": ms,
        "max_abs_diff_vs_fp32_strict_reference": diff,
    }


def report(rows: list[dict], folded_diff: float = 5e-6) -> dict:
    return {
        "machine": {
            "fused_deform_conv": {
                "float32": {"method": "taps", "tiles": [32, 128, 32, 4, 2]},
                "bfloat16": {"method": "taps", "tiles": [64, 256, 64, 8, 2]},
                "float16": {"method": "taps", "tiles": [64, 256, 64, 8, 2]},
            }
        },
        "settings": {"batches": [1, 8]},
        "fp32_strict": {"fused-folded": {"max_abs_diff_vs_reference": folded_diff, "max_abs_reference": 1.4}},
        "results": rows,
    }


DEFAULT = "fused-graph (64, 256, 64, 8, 2, taps)"
FLAT = "fused-graph (64, 128, 64, 4, 3, flat)"


def test_a_faster_accurate_configuration_is_chosen_for_bf16_and_fp16_and_written(choice) -> None:
    rows = [
        row("bf16", 1, DEFAULT, 17.3),
        row("bf16", 8, DEFAULT, 66.0),
        row("bf16", 1, FLAT, 16.0),
        row("bf16", 8, FLAT, 50.0),
        # faster still but only at one batch size: not a candidate
        row("bf16", 1, "fused-graph (128, 256, 128, 8, 1, columns)", 5.0),
        # faster but far less accurate: not a candidate
        row("bf16", 1, "fused-graph (64, 256, 64, 8, 3, flat)", 10.0, diff=0.5),
        row("bf16", 8, "fused-graph (64, 256, 64, 8, 3, flat)", 40.0, diff=0.5),
        row("bf16", 1, "fused-graph", 18.6),
        row("bf16", 8, "fused-graph", 66.1),
        row("bf16", 1, "fused-folded-graph", 15.0),
        row("bf16", 8, "fused-folded-graph", 60.0),
    ]
    cuda = choice.CUDA_SOURCE
    cuda.write_text(re.sub(r'^EPILOGUE = "\w+"$', 'EPILOGUE = "modules"', cuda.read_text(), flags=re.M))
    changes, singles, epilogue, reasons = choice.choose(report(rows), 0.03)
    assert changes == {"bfloat16": (64, 128, 64, 4, 3, "flat"), "float16": (64, 128, 64, 4, 3, "flat")}
    # at batch 1 the columns row is 5.0 ms but timed at batch 1 only: fine for one image
    assert singles == {"bfloat16": (128, 256, 128, 8, 1, "columns"), "float16": (128, 256, 128, 8, 1, "columns")}
    assert epilogue == "folded"
    assert "fp16: takes bf16's choice (not swept)" in reasons
    choice.write(changes, epilogue, singles)
    triton = choice.TRITON_SOURCE.read_text()
    assert "    torch.bfloat16: (64, 128, 64, 4, 3),\n" in triton
    assert "    torch.float16: (64, 128, 64, 4, 3),\n" in triton
    assert '    torch.bfloat16: "flat",\n' in triton
    assert '    torch.bfloat16: ((128, 256, 128, 8, 1), "columns"),\n' in triton
    choice.write({}, epilogue, {"float16": None})
    assert "    torch.float16: None,\n" in choice.TRITON_SOURCE.read_text()
    assert 'EPILOGUE = "folded"\n' in choice.CUDA_SOURCE.read_text()
    original = (ROOT / "dyhead_cli" / "models" / "deform_triton.py").read_text()
    float32 = [line for line in original.splitlines() if line.startswith("    torch.float32: ")]
    assert len(float32) == 3 and all(line in triton.splitlines() for line in float32)  # not swept: unchanged
    assert len(triton.splitlines()) == len(original.splitlines())  # the same lines, two values changed


def test_within_the_margin_or_inaccurate_the_defaults_stay(choice) -> None:
    rows = [
        row("bf16", 1, DEFAULT, 17.3),
        row("bf16", 8, DEFAULT, 66.0),
        row("bf16", 1, FLAT, 17.0),  # 1-2% faster: noise
        row("bf16", 8, FLAT, 65.0),
        row("bf16", 1, "fused-graph", 18.6),
        row("bf16", 8, "fused-graph", 66.1),
        row("bf16", 1, "fused-folded-graph", 10.0, diff=0.2),  # fast, but its 16-bit error is 6x
        row("bf16", 8, "fused-folded-graph", 40.0),
    ]
    changes, singles, epilogue, reasons = choice.choose(report(rows), 0.03)
    assert changes == {} and epilogue == "modules"
    assert singles == {"bfloat16": None, "float16": None}  # FLAT's 17.0 ms at batch 1 is within the margin
    assert any("default (64, 256, 64, 8, 2, 'taps') kept" in r for r in reasons)
    # a failed float32 check keeps the modules' end whatever the timings
    rows[-2]["max_abs_diff_vs_fp32_strict_reference"] = 0.03
    assert choice.choose(report(rows), 0.03)[2] == "folded"
    assert choice.choose(report(rows, folded_diff=0.1), 0.03)[2] == "modules"


def test_a_source_line_not_where_expected_is_refused(choice) -> None:
    path = choice.CUDA_SOURCE
    path.write_text(re.sub(r'^EPILOGUE = "(\w+)"$', r'EPILOGUE: str = "\1"', path.read_text(), flags=re.M))
    with pytest.raises(SystemExit, match="expected 1 line"):
        choice.write({}, "folded")


def test_the_fastest_block_end_replaces_the_default_only_beyond_the_margin(choice) -> None:
    def rows(inline_ms: float) -> list[dict]:
        return [
            row("bf16", 1, "fused-graph", 14.0),
            row("bf16", 8, "fused-graph", 38.0),
            row("bf16", 1, "fused-folded-graph", 10.6),
            row("bf16", 8, "fused-folded-graph", 27.3),
            row("bf16", 1, "fused-inline-graph", inline_ms),
            row("bf16", 8, "fused-inline-graph", inline_ms * 27.3 / 10.6),
            row("fp32", 8, "fused-inline-graph", 1.0),  # float32 from batch 8 runs grid_sample: not counted
            row("fp32", 8, "fused-graph", 80.0),
        ]

    def with_default(r: dict, end: str) -> dict:
        r["machine"]["dyhead_epilogue"] = end
        r["fp32_strict"]["fused-inline"] = {"max_abs_diff_vs_reference": 5e-6, "max_abs_reference": 1.4}
        return r

    assert choice.choose_epilogue(with_default(report(rows(10.4)), "folded"), 0.03)[0] == "folded"  # 2% faster
    assert choice.choose_epilogue(with_default(report(rows(9.0)), "folded"), 0.03)[0] == "inline"  # 15% faster
    # from the modules' end, folded (0.74x) is beyond the margin whatever inline's 0.73x does
    assert choice.choose_epilogue(with_default(report(rows(10.4)), "modules"), 0.03)[0] == "inline"
    failed = with_default(report(rows(9.0)), "folded")
    failed["fp32_strict"]["fused-inline"]["max_abs_diff_vs_reference"] = 0.1
    end, why = choice.choose_epilogue(failed, 0.03)
    assert end == "folded" and "inline: float32 check against the reference missing or failed" in why


def test_without_batch_1_rows_the_single_image_choice_stays(choice) -> None:
    rows = [row("bf16", 8, DEFAULT, 66.0), row("bf16", 8, FLAT, 50.0)]
    r = report(rows)
    r["settings"]["batches"] = [8]
    changes, singles, _, reasons = choice.choose(r, 0.03)
    assert changes["bfloat16"] == (64, 128, 64, 4, 3, "flat") and singles == {}
    assert any("one image's choice kept" in line for line in reasons)
    before = [line for line in choice.TRITON_SOURCE.read_text().splitlines() if line.endswith('"columns"),')]
    choice.write(changes, "folded", singles)
    after = [line for line in choice.TRITON_SOURCE.read_text().splitlines() if line.endswith('"columns"),')]
    assert before == after
