"""Whole-detector parity with MMDetection 3.3.0 (ATSS + DyHead): the shared checker on its fixture.

``../shared/tools/check_detector_parity.py`` rebuilds the MMDetection checkpoint from the fixture, converts it
with ``dyhead convert --from mmdet``, loads it as ``dyhead predict`` does and compares every stage and the
final detections (same label, IoU > 0.99, |score diff| < 1e-3, no extra one). Skips without ../shared.
"""
import os
import subprocess
import sys
from pathlib import Path

from helpers_fixtures import SHARED, fixture_path

ROOT = Path(__file__).resolve().parents[1]


def test_atss_dyhead_detections_match_mmdetection(tmp_path):
    fixture = fixture_path("detector_parity_mmdet_atss_a.safetensors")
    checker = SHARED / "tools" / "check_detector_parity.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # MMDetection's candidate order; `dyhead convert` does not set it for MMDetection sources yet.
    cmd = [sys.executable, str(checker), str(fixture), "--threads", "1", "--workdir", str(tmp_path),
           "--set", "model.head_options.postprocess=mmdet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert last.startswith("detector parity: 200/200 detections matched"), last
