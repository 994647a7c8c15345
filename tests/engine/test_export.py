"""``dyhead export``: in-graph post-processing, exported models against PyTorch, predict with onnxruntime, bad input."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from helpers_detection import tiny_config
from helpers_export import (
    assert_same_detections,
    export_both,
    padded_batch,
    tiny_checkpoint,
)
from safetensors.torch import save_file
from typer.testing import CliRunner

from dyhead_cli.cli import app
from dyhead_cli.engine.checkpoint import save_weights
from dyhead_cli.models.build import build_model
from dyhead_cli.models.export_postprocess import postprocess_padded
from dyhead_cli.recipe import Recipe, save_recipe, to_dict

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

HEADS = ("atss", "fcos", "retinanet")
TOWERS = (None, "official", "mmdet", "aligned")  # None: without DyHead


# ------------------------------------------------------------------------------------------------------
# the traceable post-processing, in PyTorch


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("mode", ["official", "mmdet"])
def test_padded_postprocess_equals_the_heads_postprocess(head, mode):
    torch.manual_seed(0)
    model = build_model(tiny_config(head, 0, score_thresh=0.02, postprocess=mode, detections_per_img=60)).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.add_(3.0)
        images, sizes = padded_batch(2, (256, 384), seed=1)
        outputs = model.head(model.features(images, sizes))
        ref = model.head.postprocess(outputs, sizes)
        boxes, scores, labels, count = postprocess_padded(model.head, outputs, torch.tensor(sizes))
    assert boxes.shape == (2, 60, 4) and scores.shape == (2, 60) and labels.dtype == torch.int64
    for i, r in enumerate(ref):
        n = int(count[i])
        assert n > 10  # enough detections for the comparison to mean something
        assert_same_detections({"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}, r)
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all()


def test_padded_postprocess_without_candidates_is_empty():
    torch.manual_seed(0)
    model = build_model(tiny_config("atss", 0, score_thresh=0.99)).eval()
    with torch.no_grad():
        images, sizes = padded_batch(2, (256, 256), seed=0)
        _, _, labels, count = postprocess_padded(model.head, model.head(model.features(images, sizes)), torch.tensor(sizes))
    assert count.tolist() == [0, 0] and (labels == -1).all()


# ------------------------------------------------------------------------------------------------------
# exported models against PyTorch


def check_export(tmp_path, head: str, tower: str | None) -> None:
    """Raw outputs (<= 1e-4) and detections (IoU > 0.99, score diff < 1e-4) of the .onnx and the .pt2,
    at two sizes other than the traced 256x256, a padded batch among them."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from dyhead_cli.engine.export import load_torch_export

    weights = tmp_path / f"{head}-{tower}.safetensors"
    model = tiny_checkpoint(weights, head, tower)
    for postprocess in (False, True):
        pt2, onnx_path = export_both(weights, tmp_path, postprocess)
        proto = onnx.load(str(onnx_path))
        onnx.checker.check_model(proto, full_check=True)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["class_names"]) == ["class_0", "class_1", "class_2"]
        assert len(json.loads(meta["category_ids"])) == 3
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        program, pt2_meta = load_torch_export(pt2)
        assert pt2_meta["class_names"] == meta["class_names"]
        exported = program.module()
        for batch, size, seed in ((2, (384, 256), 1), (1, (256, 512), 2)):
            images, sizes = padded_batch(batch, size, seed)
            sizes_t = torch.tensor(sizes)
            with torch.no_grad():
                raw = model.head(model.features(images, sizes))
                ref = model(images, sizes)
                from_pt2 = exported(images, sizes_t)
            from_onnx = [
                torch.from_numpy(o) for o in session.run(None, {"images": images.numpy(), "image_sizes": sizes_t.numpy()})
            ]
            if not postprocess:
                flat = [t for v in raw.values() for t in v]
                for got in (from_onnx, from_pt2):
                    assert len(got) == len(flat)
                    for a, b in zip(got, flat):
                        assert (a - b).abs().max().item() <= 1e-4
                continue
            for got in (from_onnx, from_pt2):
                boxes, scores, labels, count = got
                for i, r in enumerate(ref):
                    n = int(count[i])
                    assert_same_detections({"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}, r)


def test_export_retinanet_without_dyhead(tmp_path):
    """The representative export in the default run (the smallest graph); the full sweep is marked slow."""
    check_export(tmp_path, "retinanet", None)


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("tower", TOWERS)
def test_export_matches_pytorch(tmp_path, head, tower):
    if (head, tower) == ("retinanet", None):
        pytest.skip("in the default run")
    check_export(tmp_path, head, tower)


# ------------------------------------------------------------------------------------------------------
# the commands


def test_export_predict_and_benchmark_commands(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from PIL import Image

    weights = tmp_path / "m.safetensors"
    tiny_checkpoint(weights, "atss", None)
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(weights), "--format", "onnx", "--dynamic", "--size", "256x256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "opset 18" in result.output
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(200, 300), (320, 240)]):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    for weights_arg, preds in ((out, tmp_path / "onnx.json"), (weights, tmp_path / "torch.json")):
        result = runner.invoke(
            app, ["predict", str(folder), "--weights", str(weights_arg), "--out", str(preds), "--device", "cpu"]
        )
        assert result.exit_code == 0, result.output
    onnx_rows, torch_rows = (json.loads((tmp_path / f).read_text()) for f in ("onnx.json", "torch.json"))
    assert len(onnx_rows) == len(torch_rows) > 0

    def detections(rows: list[dict], image_id: int) -> dict[str, torch.Tensor]:
        rows = [r for r in rows if r["image_id"] == image_id]
        xywh = torch.tensor([r["bbox"] for r in rows]).reshape(-1, 4)
        return {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            "scores": torch.tensor([r["score"] for r in rows]),
            "labels": torch.tensor([r["category_id"] for r in rows]),
        }

    for image_id in {r["image_id"] for r in torch_rows}:
        assert_same_detections(detections(onnx_rows, image_id), detections(torch_rows, image_id), iou=0.98, score=2e-4)

    recipe = tmp_path / "tiny.toml"
    save_recipe(Recipe(model=tiny_config("atss", 0, score_thresh=0.02)), recipe)
    report = tmp_path / "bench.json"
    args = [
        "benchmark",
        "--recipe",
        str(recipe),
        "--size",
        "256x256",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--onnx",
        str(out),
        "--json",
        str(report),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["results"]
    assert [r["key"] for r in rows] == ["dyhead", "onnx"] and all(r["latency_ms"]["p50"] > 0 for r in rows)
    assert "onnxruntime" in rows[1]["model"] and "onnxruntime" in result.output

    # an ONNX file of another model than the one timed beside it is refused (the ratio would mislead)
    other = tmp_path / "other.toml"
    changed = tiny_config("atss", 0, score_thresh=0.02)
    changed.pixel_mean = [0.0, 0.0, 0.0]
    save_recipe(Recipe(model=changed), other)
    result = runner.invoke(app, [*args[:2], str(other), *args[3:]])
    assert "holds another model than" in _one_line_error(result) and "model.pixel_mean" in result.output


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_bad_input_is_one_line_and_leaves_no_file(tmp_path):
    weights = tmp_path / "m.safetensors"
    tiny_checkpoint(weights, "atss", None)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    rcnn = tmp_path / "rcnn.safetensors"
    cfg = tiny_config("faster_rcnn", 0)
    cfg.fpn.levels, cfg.fpn.top_block = [2, 3, 4, 5, 6], "maxpool"
    save_weights(rcnn, build_model(cfg), to_dict(Recipe(model=cfg)))
    out = tmp_path / "out" / "m.onnx"
    cases = [
        (["export", str(tmp_path / "missing.safetensors"), "--out", str(out)], "not found"),
        # no recipe: what export takes instead (it said "pass --recipe", an option export does not have)
        (["export", str(foreign), "--out", str(out)], "carries no recipe in its metadata: export takes a model checkpoint"),
        (["export", str(rcnn), "--out", str(out)], "faster_rcnn models cannot be exported yet"),
        (["export", str(rcnn), "--no-postprocess", "--out", str(out)], "export takes atss, fcos, retinanet"),
        (["export", str(weights), "--size", "300x300", "--out", str(out)], "multiples of 128"),
        (["export", str(weights), "--size", "128x128", "--dynamic", "--out", str(out)], "at least 256"),
        (["export", str(weights), "--format", "onx", "--out", str(out)], "did you mean 'onnx'"),
        (["export", str(weights), "--opset", "13", "--out", str(out)], "--opset"),
        (["export", str(weights), "--dynamic", "--size", "256x256", "--batch", "4", "--out", str(out)], "drop --batch"),
        (["export", str(weights), "--format", "torch-export", "--out", str(out)], "writes a .pt2 file; name it m.pt2"),
    ]
    if importlib.util.find_spec("onnx") is not None:  # the newest opset is the installed onnx's
        cases.append((["export", str(weights), "--opset", "99", "--out", str(out)], "--opset must be within 17.."))
    for args, expected in cases:
        line = _one_line_error(runner.invoke(app, args))
        assert expected in line, line
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.safetensors", "m.safetensors", "rcnn.safetensors"]


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    line = _one_line_error(
        runner.invoke(app, ["predict", str(tmp_path), "--weights", str(model), "--out", str(tmp_path / "p.json")])
    )
    assert "pip install -e '.[export]'" in line


def test_classes_fill_max_det_on_an_onnx_model_without_in_graph_postprocessing(tmp_path):
    """``predict --classes`` on a ``--no-postprocess`` ONNX model narrows the candidates as on PyTorch (the
    head's post-processing runs in Python there): a class's own best detections, not what it has among the
    best of all classes. A graph that post-processes itself keeps its cap of all classes, filtered after."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dyhead_cli.engine.inference import load_detector
    from dyhead_cli.engine.onnx_runner import load_onnx_detector
    from dyhead_cli.engine.predictor import Predictor

    weights = tmp_path / "m.safetensors"
    tiny_checkpoint(weights, "atss", None, detections_per_img=6)
    pixels = (torch.rand(224, 288, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    torch_det = load_detector(weights)
    (everything,) = Predictor(torch_det, "cpu")([pixels])
    rare = next(k for k in range(3) if int((everything.labels == k).sum()) < 3)  # fewer than 3 among the best 6
    (want,) = Predictor(torch_det, "cpu", classes=[f"class_{rare}"])([pixels])
    assert len(want) == 6 and set(want.labels.tolist()) == {rare}  # the class's own 6 best
    for postprocess in (False, True):
        _, onnx_path = export_both(weights, tmp_path, postprocess)
        (got,) = Predictor(load_onnx_detector(onnx_path), "cpu", classes=[f"class_{rare}"])([pixels])
        if postprocess:  # the graph's 6 best of all classes, then filtered
            assert len(got) == int((everything.labels == rare).sum()) < 6
            continue
        assert_same_detections(
            {"boxes": got.boxes, "scores": got.scores, "labels": got.labels},
            {"boxes": want.boxes, "scores": want.scores, "labels": want.labels},
            iou=0.99,
            score=1e-4,
        )


def test_a_dynamic_onnx_model_runs_a_batch_of_mixed_padded_sizes_as_pytorch_does(tmp_path):
    """Images of another padded size in one batch run apart (``forward_alone``), as in PyTorch: the dynamic
    graph padded the smaller one to its neighbour's size, and DyHead's means took the padding in."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dyhead_cli.engine.inference import forward_alone
    from dyhead_cli.engine.onnx_runner import OnnxDetector

    weights = tmp_path / "m.safetensors"
    model = tiny_checkpoint(weights, "atss", "official")
    _, onnx_path = export_both(weights, tmp_path, postprocess=True)
    onnx_model = OnnxDetector(onnx_path)
    assert onnx_model.dynamic and not onnx_model.pads_itself
    g = torch.Generator().manual_seed(5)
    images = torch.zeros(2, 3, 256, 512)
    sizes = [(256, 384), (256, 512)]  # padded alone to 256 x 384 and 256 x 512 (multiples of 128)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=g) * 255
    with torch.no_grad():
        want = forward_alone(model, images, sizes, sizes, 128)
    got = forward_alone(onnx_model, images, sizes, sizes, 128)
    for a, b in zip(got, want):
        assert len(b["scores"]) > 0
        assert_same_detections(a, b, iou=0.99, score=1e-4)
