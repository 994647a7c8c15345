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
    assert result.stderr.strip() == "error: cannot write /sys/dyhead.json: Permission denied"
