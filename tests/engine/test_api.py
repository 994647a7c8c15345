"""The Python API: the README's example runs, results equal `dyhead predict`'s, every input type agrees."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dyhead_cli
from dyhead_cli.cli import app
from dyhead_cli.engine.detections import Detections
from dyhead_cli.engine.results import images_json_path
from dyhead_cli.errors import DyheadError

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example, and this test runs it"
    return blocks[0]


def test_the_readme_python_example_runs(run, tmp_path, monkeypatch):
    """As written, in a folder laid out as after `dyhead train quickstart --out runs/quickstart`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "last.safetensors").symlink_to(run["weights"])
    (tmp_path / "data" / "synthetic").mkdir(parents=True)
    (tmp_path / "data" / "synthetic" / "val").symlink_to(run["val_images"])
    scope: dict = {}
    exec(compile(readme_python(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    results = scope["results"]
    assert len(results) == 2 and all(isinstance(r, Detections) for r in results)
    drawn = Image.open(tmp_path / "000001_boxes.jpg")
    assert drawn.size == Image.open(run["val_images"] / "000001.jpg").size
    assert scope["rows"] == results[0].to_coco(1) and all(r["image_id"] == 1 for r in scope["rows"])


def test_api_results_equal_dyhead_predict(run, tmp_path):
    out = tmp_path / "preds.json"
    result = runner.invoke(
        app, ["predict", str(run["val_images"]), "--weights", str(run["weights"]), "--out", str(out), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    listing = json.loads(images_json_path(out).read_text())
    assert listing["image_ids"] == "file stems"  # 000001.jpg ... : the annotation file's ids
    cli_rows = json.loads(out.read_text())
    assert cli_rows

    model = dyhead_cli.load(run["weights"], device="cpu")
    files = sorted(run["val_images"].glob("*.jpg"))
    results = model(files)  # the same images in the same order and batches (eval.batch_size)
    assert len(results) == len(files) == len(listing["images"])
    api_rows = [row for path, r in zip(files, results) for row in r.to_coco(int(path.stem))]
    assert sorted(map(json.dumps, api_rows)) == sorted(map(json.dumps, cli_rows))
    gt_ids = {im["file_name"]: im["id"] for im in json.loads(run["val_ann"].read_text())["images"]}
    assert {im["file_name"]: im["id"] for im in listing["images"]} == gt_ids


def test_every_input_type_gives_the_same_detections(run):
    model = dyhead_cli.load(run["weights"], device="cpu", batch_size=1)
    path = run["val_images"] / "000003.jpg"
    (want,) = model(path)
    assert len(want) > 0 and want.image_size == (128, 128)
    rgb = np.array(Image.open(path).convert("RGB"))
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    inputs = {
        "str": str(path),
        "PIL": Image.open(path),
        "numpy RGB": rgb,
        "tensor uint8": chw,
        "tensor float 0..1": chw.float() / 255,
    }
    for name, x in inputs.items():
        (got,) = model(x)
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores), name
        assert got.names == want.names and torch.equal(got.category_ids, want.category_ids), name
    (bgr,) = model(np.ascontiguousarray(rgb[:, :, ::-1]), bgr=True)
    assert torch.equal(bgr.boxes, want.boxes)
    listed = model([rgb, path, chw[None].repeat(2, 1, 1, 1)])  # a list, and a (B, 3, H, W) batch inside it
    assert len(listed) == 4 and all(torch.equal(r.boxes, want.boxes) for r in listed)

    # what a result holds
    assert want.boxes.shape == (len(want), 4) and want.boxes.dtype == torch.float32
    assert (want.boxes[:, 2:] >= want.boxes[:, :2]).all() and float(want.boxes.max()) <= 128.0 + 1e-3
    assert bool((want.scores[:-1] >= want.scores[1:]).all())  # best first
    assert set(want.names) <= {"circle", "square", "triangle", "cross"}
    assert set(want.category_ids.tolist()) <= {1, 3, 7, 10}  # the data set's own ids
    rows = want.to_coco(42)
    assert len(rows) == len(want) and rows[0]["image_id"] == 42
    assert rows[0]["bbox"][2] == pytest.approx(float(want.boxes[0, 2] - want.boxes[0, 0]), abs=0.01)
    drawn = want.plot(min_score=0.0)
    assert drawn.size == (128, 128) and np.abs(np.asarray(drawn, np.int16) - rgb).sum() > 0
    assert np.array_equal(np.asarray(want.plot(min_score=1.01)), rgb)  # nothing scores above 1: untouched


def test_api_options_and_mistakes(run):
    image = run["val_images"] / "000002.jpg"
    (everything,) = dyhead_cli.load(run["weights"], device="cpu")(image)
    (capped,) = dyhead_cli.load(run["weights"], device="cpu", max_det=5)(image)  # the head keeps its 5 best
    assert len(everything) > 5 and len(capped) == 5 and torch.equal(capped.scores, everything.scores[:5])
    keep = dyhead_cli.load(run["weights"], device="cpu", classes=["square", 10], score_thr=0.02)  # a name, a category id
    (some,) = keep(image)
    wanted = [(n in ("square", "cross")) and float(s) >= 0.02 for n, s in zip(everything.names, everything.scores)]
    assert torch.equal(some.scores, everything.scores[wanted]) and set(some.names) <= {"square", "cross"}
    # classes are filtered before the max_det cut: a class's 3 best, not what it has among the 3 best of all
    rare = next(n for n in everything.names[::-1] if everything.names.count(n) >= 3 and n not in everything.names[:3])
    best = everything.scores[[n == rare for n in everything.names]][:3]
    (few,) = dyhead_cli.load(run["weights"], device="cpu", classes=rare, max_det=3)(image)
    assert few.names == [rare] * 3 and torch.equal(few.scores, best)
    with pytest.raises(DyheadError, match="neither a class name"):
        dyhead_cli.load(run["weights"], device="cpu", classes=["sqare"])
    (one,) = dyhead_cli.load(run["weights"], device=torch.device("cpu"), classes="square", score_thr=0.02)(image)
    assert torch.equal(
        one.scores, everything.scores[[n == "square" and float(s) >= 0.02 for n, s in zip(everything.names, everything.scores)]]
    )
    # the engine's messages name the command line's flags; through the API, the keyword arguments
    for option, value, message in (
        ("max_det", 0, "max_det must be >= 1 and <= 100000, got 0"),
        ("max_det", 100_001, "max_det must be >= 1 and <= 100000, got 100001"),
        ("tile_overlap", 1.5, "tile_overlap must be in [0, 1), got 1.5"),
        ("score_thr", 2.0, "score_thr must be within 0..1, got 2.0"),
    ):
        kwargs = {option: value, **({"tile": 64} if option == "tile_overlap" else {})}
        with pytest.raises(DyheadError) as caught:
            dyhead_cli.load(run["weights"], device="cpu", **kwargs)
        assert str(caught.value) == message
    with pytest.raises(DyheadError, match=r"^tile_overlap=0.3 applies to tiled inference only: give tile=SIZE too$"):
        dyhead_cli.load(run["weights"], device="cpu", tile_overlap=0.3)
    with pytest.raises(DyheadError, match=r"^load\(\) has no option 'max_dets'; its options: device, recipe, "):
        dyhead_cli.load(run["weights"], device="cpu", max_dets=3)
    with pytest.raises(DyheadError, match=r"^classes: '--tile' is neither"):  # a value is not a flag to rename
        dyhead_cli.load(run["weights"], device="cpu", classes=["--tile"])
    with pytest.raises(DyheadError, match="weights must be the path"):
        dyhead_cli.load(5)
    for option, value, kind in (
        ("score_thr", "0.5", "a number"),
        ("batch_size", 1.5, "a whole number"),
        ("max_det", 2.5, "a whole"),
    ):
        with pytest.raises(DyheadError, match=f"{option} must be {kind}"):
            dyhead_cli.load(run["weights"], device="cpu", **{option: value})
    model = dyhead_cli.load(run["weights"], device="cpu")
    with pytest.raises(DyheadError, match="uint8"):
        model(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DyheadError, match="cannot predict on a dict"):
        model({"not": "an image"})
    with pytest.raises(DyheadError, match="must hold 0..1, its largest value is 255: divide it by 255"):
        model(torch.full((3, 8, 8), 255.0))  # 0..255 floats: all white once clamped, silently
    closed = Image.new("RGB", (8, 8))
    closed.close()
    with pytest.raises(DyheadError, match=r"cannot read this PIL image \(mode RGB, 8x8\): Operation on closed image"):
        model(closed)  # a ValueError from PIL before
    (premultiplied,) = model(Image.new("La", (16, 16), (0, 0)))  # PIL converts "La" only to "LA"
    assert premultiplied.image_size == (16, 16)
    for empty in (np.zeros((0, 0, 3), np.uint8), torch.ones(3, 0, 4)):
        with pytest.raises(DyheadError, match="at least one pixel"):
            model(empty)  # a ZeroDivisionError in the resize before
    assert dyhead_cli.build_model(dyhead_cli.load_recipe(run["recipe"]).model).__class__.__name__ == "Detector"


def test_a_batch_of_mixed_sizes_gives_each_image_its_own_detections(run):
    """Each image is padded as if alone (``forward_alone``): DyHead averages whole maps, padding included,
    so padding a square image to its wide neighbour's size changed its detections."""
    from dyhead_cli.data.loaders import collate_images
    from dyhead_cli.engine.inference import forward_alone

    square = np.array(Image.open(run["val_images"] / "000003.jpg").convert("RGB"))
    wide = np.concatenate([square, square[:, ::-1]], axis=1)  # 128x256: padded to 128x256, the square to 128x128
    alone = [dyhead_cli.load(run["weights"], device="cpu", batch_size=1)(x)[0] for x in (square, wide, square)]
    together = dyhead_cli.load(run["weights"], device="cpu", batch_size=3)([square, wide, square])
    for a, t in zip(alone, together):
        assert (
            len(a) == len(t) > 0 and torch.allclose(a.boxes, t.boxes, atol=1e-3) and torch.allclose(a.scores, t.scores, atol=1e-5)
        )

    model = dyhead_cli.load(run["weights"], device="cpu")
    dataset = model.dataset([], keep_original=True)
    items = [dataset.prepare(x, i + 1, f"image {i + 1}") for i, x in enumerate((square, wide))]
    batch = collate_images(items, 32)
    with torch.no_grad():
        padded = forward_alone(model.model, batch["images"], batch["image_sizes"], batch["orig_sizes"], None)
    assert batch["images"].shape[-2:] == (128, 256)  # both padded to the wide one's size, as before
    assert not torch.allclose(padded[0]["scores"][:5], alone[0].scores[:5], atol=1e-4)


def test_predictors_sharing_one_model_keep_their_own_classes(run):
    """Two predictors of one loaded detector: each call narrows the shared model to its own classes for
    that call only, so neither filter leaks into the other (or into later users of the model)."""
    from dyhead_cli.engine.inference import load_detector
    from dyhead_cli.engine.predictor import Predictor

    image = run["val_images"] / "000002.jpg"
    det = load_detector(Path(run["weights"]), None, ["model.head_options.detections_per_img=3"])
    (everything,) = Predictor(det, "cpu")([image])
    names = sorted(set(everything.names) | {"circle", "square"})
    a = Predictor(det, "cpu", classes=[names[0]])
    b = Predictor(det, "cpu")
    c = Predictor(det, "cpu", classes=[names[1]])
    (only_a,) = a([image])
    (all_b,) = b([image])
    (only_c,) = c([image])
    (again_a,) = a([image])
    assert set(only_a.names) == {names[0]} and len(only_a) == 3
    assert all_b.names == everything.names and torch.equal(all_b.scores, everything.scores)
    assert set(only_c.names) == {names[1]} and len(only_c) == 3
    assert again_a.names == only_a.names and torch.equal(again_a.scores, only_a.scores)
