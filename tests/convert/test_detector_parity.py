"""Whole-detector parity with MMDetection 3.3.0 (ATSS + DyHead): the shared checker on its fixture.

``../shared/tools/check_detector_parity.py`` rebuilds the MMDetection checkpoint from the fixture, converts it
with ``dyhead convert --from mmdet``, loads it as ``dyhead predict`` does and compares every stage and the
final detections (same label, IoU > 0.99, |score diff| < 1e-3, no extra one). Skips without ../shared.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers_fixtures import SHARED, fixture_path

ROOT = Path(__file__).resolve().parents[2]


def test_atss_dyhead_detections_match_mmdetection(tmp_path):
    fixture = fixture_path("detector_parity_mmdet_atss_a.safetensors")
    checker = SHARED / "tools" / "check_detector_parity.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # no --set: `dyhead convert` itself must choose MMDetection's offset mode, post-processing and padding
    cmd = [sys.executable, str(checker), str(fixture), "--threads", "1", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert last.startswith("detector parity: 200/200 detections matched"), last


# ----------------------------------------------------------------------------------------------------
# `dyhead predict` on the fixture's raw pictures, with our own resizing, normalisation and padding


def project_api() -> dict:
    """Every project-internal name this file uses, in one place (adapt it when code moves)."""
    from dyhead_cli.cli import app

    return {"app": app}


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as iou

    return iou(a.double(), b.double()) if len(a) and len(b) else torch.zeros(len(a), len(b), dtype=torch.float64)


def matched(ref: dict, ours: dict, iou_min: float = 0.99, score_tol: float = 1e-3) -> tuple[int, int]:
    """(reference detections matched by one of ours with the same label, IoU > iou_min, |score diff| <
    score_tol; detections of ours left over). Greedy over the reference by descending score."""
    iou = box_iou(ref["boxes"], ours["boxes"])
    used = torch.zeros(len(ours["scores"]), dtype=torch.bool)
    count = 0
    for i in ref["scores"].argsort(descending=True).tolist():
        ok = (
            ~used
            & (ours["labels"] == ref["labels"][i])
            & (iou[i] > iou_min)
            & ((ours["scores"] - ref["scores"][i]).abs() < score_tol)
        )
        if ok.any():
            used[int(torch.nonzero(ok)[0])] = True
            count += 1
    return count, int((~used).sum())


def test_predict_on_the_raw_images_matches_the_reference(tmp_path):
    """The padding fix end to end: our resize + normalise-then-zero-pad reproduce MMDetection's detections."""
    import json

    from PIL import Image
    from safetensors import safe_open
    from typer.testing import CliRunner

    fixture = fixture_path("detector_parity_mmdet_atss_a.safetensors")
    with safe_open(str(fixture), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keys = json.loads(meta["state_dict_keys"])
    ckpt = tmp_path / "mmdet.pth"
    torch.save(
        {
            "meta": json.loads(meta["meta_json"]),
            "state_dict": {
                k: tensors[f"state_dict.{k}"].float()
                if tensors[f"state_dict.{k}"].is_floating_point()
                else tensors[f"state_dict.{k}"]
                for k in keys
            },
        },
        ckpt,
    )
    app = project_api()["app"]
    runner = CliRunner()
    converted = tmp_path / "converted.safetensors"
    result = runner.invoke(app, ["convert", str(ckpt), str(converted), "--from", "mmdet"])
    assert result.exit_code == 0, result.output
    total = found = extra = 0
    for name in json.loads(meta["images"]):
        image_meta = json.loads(meta[f"image_meta.{name}"])
        picture = tmp_path / f"{name}.png"
        Image.fromarray(tensors[f"image.{name}"].numpy()).save(picture)  # lossless: the reference's own pixels
        long_side, short_side = image_meta["resize"]["scale"]  # MMDetection's Resize(scale=(long, short), keep_ratio)
        out = tmp_path / f"preds_{name}.json"
        result = runner.invoke(
            app,
            [
                "predict",
                str(picture),
                "--weights",
                str(converted),
                "--out",
                str(out),
                "--workers",
                "0",
                "--set",
                f"data.test_min_size={short_side}",
                "--set",
                f"data.max_size={long_side}",
            ],
        )
        assert result.exit_code == 0, result.output
        rows = json.loads(out.read_text())
        cats = json.loads((tmp_path / f"preds_{name}.images.json").read_text())["categories"]
        label_of = {c["id"]: k for k, c in enumerate(cats)}
        ours = {
            "boxes": torch.tensor(
                [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)], dtype=torch.float64
            ).reshape(-1, 4),
            "scores": torch.tensor([r["score"] for r in rows], dtype=torch.float64),
            "labels": torch.tensor([label_of[r["category_id"]] for r in rows]),
        }
        ref = {k: tensors[f"det.{name}.{k}"] for k in ("boxes", "scores", "labels")}
        ref = {"boxes": ref["boxes"].double(), "scores": ref["scores"].double(), "labels": ref["labels"].long()}
        m, e = matched(ref, ours)
        total, found, extra = total + len(ref["scores"]), found + m, extra + e
    print(f"dyhead predict on the raw images: {found}/{total} reference detections matched, {extra} extra")
    assert (found, extra) == (total, 0), f"{found}/{total} matched, {extra} extra"
