"""``dyhead eval`` from the command line: signs of life in a log, the --json analysis, --plots, and a
failed write as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

DYHEAD = [sys.executable, "-m", "dyhead_cli.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_eval_json_plots_and_progress_lines(tmp_path, run):
    out, plots = tmp_path / "m.json", tmp_path / "plots"
    result = subprocess.run(
        DYHEAD + ["eval", str(run["recipe"]), "--weights", str(run["weights"]), "--json", str(out), "--plots", str(plots)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=run["root"],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "eval: 8 images" and lines[1].startswith("eval: 8 images in ")
    metrics = json.loads(out.read_text())
    assert {"AP", "AR100", "per_class", "per_class_AP50", "best_f1"} <= set(metrics)
    assert set(metrics["best_f1"]) == {"score_thr", "f1", "precision", "recall", "per_class"}
    assert sorted(p.name for p in plots.iterdir()) == ["confusion_matrix.png", "pr_curves.png"]
    assert "precision" in result.stdout and "recall" in result.stdout


def test_eval_json_into_a_read_only_folder_is_one_line(run):
    result = subprocess.run(
        DYHEAD + ["eval", str(run["recipe"]), "--weights", str(run["weights"]), "--json", "/sys/dyhead.json"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=run["root"],
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: cannot write /sys/dyhead.json: Permission denied")
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_and_benchmark_refuse_to_write_over_their_inputs(run, tmp_path):
    """--json naming the checkpoint or recipe read (or a folder) is refused before any work; the file is kept."""
    import hashlib

    weights, recipe = run["weights"], run["recipe"]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (weights, recipe)}
    cases = [
        ["eval", str(recipe), "--weights", str(weights), "--json", str(weights)],
        ["eval", str(recipe), "--weights", str(weights), "--json", str(recipe)],
        ["eval", str(recipe), "--weights", str(weights), "--json", str(tmp_path)],
        ["eval", str(recipe), "--weights", str(weights), "--plots", str(recipe)],  # a file: refused before evaluating
        ["benchmark", "--recipe", str(recipe), "--size", "64", "--iters", "1", "--warmup", "0", "--json", str(recipe)],
        ["benchmark", "--recipe", str(recipe), "--size", "64", "--iters", "1", "--warmup", "0", "--markdown", str(recipe)],
    ]
    for args in cases:
        result = subprocess.run(DYHEAD + args, env=ENV, capture_output=True, text=True, timeout=300, cwd=run["root"])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args, result.stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith("error: --") and args[-1] in lines[0], (args, lines)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (weights, recipe)}
