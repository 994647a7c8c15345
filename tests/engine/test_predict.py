"""dyhead predict: same AP as dyhead eval, odd files skipped not fatal, COCO results format, id rules."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from dyhead_cli.cli import app
from dyhead_cli.data.images import collect_images
from dyhead_cli.engine.evaluate import coco_evaluate, load_coco
from dyhead_cli.engine.inference import category_ids, load_detector
from dyhead_cli.engine.results import JsonStream, images_json_path
from dyhead_cli.errors import DyheadError

runner = CliRunner()


def invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ap_of(results: list[dict], ann: Path) -> float:
    return coco_evaluate(load_coco(ann), [dict(r) for r in results])["AP"]  # copies: loadRes adds keys in place


def evaluation_rows(run) -> list[dict]:
    """What the evaluation pipeline predicts on the validation set (labels mapped to the data set's ids)."""
    from dyhead_cli.data.loaders import val_loader
    from dyhead_cli.engine.inference import predict_coco

    det = load_detector(run["weights"])
    loader, dataset = val_loader(det.recipe)
    return predict_coco(det.model, loader, torch.device("cpu"), list(dataset.cat_ids))


def test_predictions_give_the_same_ap_as_eval(run, tmp_path: Path) -> None:
    # 1. the annotation file's image list: its image and category ids
    preds = tmp_path / "ann" / "preds.json"
    result = invoke(["predict", run["val_ann"], "--weights", run["weights"], "--images", run["val_images"], "--out", preds])
    assert result.exit_code == 0, result.output
    assert "predicted 8 of 8 images" in result.output
    rows = json.loads(preds.read_text())
    assert rows, "the tiny model gives detections (score_thresh 0.01)"
    assert {r["category_id"] for r in rows} <= {1, 3, 7, 10}  # the synthetic data set's own (gappy) ids
    assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, evaluation_rows(run)))  # the very same detections
    ap = ap_of(rows, run["val_ann"])
    assert ap > 0.0

    metrics = tmp_path / "metrics.json"
    result = invoke(["eval", run["recipe"], "--weights", run["weights"], "--json", metrics])
    assert result.exit_code == 0, result.output
    eval_ap = json.loads(metrics.read_text())["AP"]
    assert ap == pytest.approx(eval_ap, abs=1e-5), "dyhead eval and dyhead predict disagree (category ids?)"

    # 2. the folder of images (no annotation file), other batch size, worker processes: ids by sorted path
    preds2 = tmp_path / "folder" / "preds.json"
    result = invoke(
        ["predict", run["val_images"], "--weights", run["weights"], "--out", preds2, "--batch-size", "3", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    listing = json.loads(images_json_path(preds2).read_text())
    names = [im["file_name"] for im in listing["images"]]
    assert names == sorted(names) and [im["id"] for im in listing["images"]] == list(range(1, 9))
    gt_id = {im["file_name"]: im["id"] for im in json.loads(run["val_ann"].read_text())["images"]}
    to_gt = {im["id"]: gt_id[im["file_name"]] for im in listing["images"]}
    remapped = [dict(r, image_id=to_gt[r["image_id"]]) for r in json.loads(preds2.read_text())]
    # category ids without an annotation file: the recipe's data set categories (same names), not 1..K
    assert [c["id"] for c in listing["categories"]] == [1, 3, 7, 10]
    assert sorted(map(json.dumps, remapped)) == sorted(map(json.dumps, rows))  # same-size images: batching changes nothing
    assert ap_of(remapped, run["val_ann"]) == pytest.approx(eval_ap, abs=1e-5)


def make_odd_folder(root: Path, source: Path) -> Path:
    """A folder of awkward files: corrupt, grayscale, RGBA, CMYK, upper-case extension, nested, non-image."""
    folder = root / "odd"
    (folder / "nested" / "deeper").mkdir(parents=True)
    base = Image.open(source).convert("RGB")
    base.convert("L").resize((100, 60)).save(folder / "grey.png")
    rgba = base.convert("RGBA").resize((90, 120))
    rgba.putalpha(Image.new("L", rgba.size, 180))
    rgba.save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg", format="JPEG")
    base.save(folder / "nested" / "UPPER.JPG", format="JPEG")
    base.resize((64, 150)).save(folder / "nested" / "deeper" / "tall.webp", format="WEBP")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def test_folder_with_odd_and_corrupt_images(run, tmp_path: Path) -> None:
    folder = make_odd_folder(tmp_path, run["val_images"] / "000001.jpg")
    out = tmp_path / "preds.json"
    result = invoke(["predict", folder, "--weights", run["weights"], "--out", out])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "broken.jpg" in result.output
    assert "predicted 5 of 6 images (1 unreadable, skipped)" in result.output
    listing = json.loads(images_json_path(out).read_text())
    assert Path(listing["root"]) == folder
    by_name = {im["file_name"]: im for im in listing["images"]}
    assert sorted(by_name) == ["cmyk.jpg", "grey.png", "nested/UPPER.JPG", "nested/deeper/tall.webp", "rgba.png"]
    assert listing["skipped"] == ["broken.jpg"]
    # stable ids: sorted relative paths -> 1..N, the skipped file keeps its number (absent from the list)
    assert [im["id"] for im in listing["images"]] == [2, 3, 4, 5, 6] and "broken.jpg" < "cmyk.jpg"
    assert (by_name["grey.png"]["width"], by_name["grey.png"]["height"]) == (100, 60)
    assert (by_name["nested/deeper/tall.webp"]["width"], by_name["nested/deeper/tall.webp"]["height"]) == (64, 150)

    rows = json.loads(out.read_text())
    assert rows
    cat_ids = {c["id"] for c in listing["categories"]}
    for r in rows:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert isinstance(r["image_id"], int) and isinstance(r["category_id"], int) and r["category_id"] in cat_ids
        assert isinstance(r["score"], float) and 0.0 <= r["score"] <= 1.0
        x, y, w, h = r["bbox"]
        im = next(i for i in listing["images"] if i["id"] == r["image_id"])
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01  # original pixels
    assert {r["image_id"] for r in rows} <= set(by_name[n]["id"] for n in by_name)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(images_json_path(out)))
        dt = gt.loadRes(str(out))
    assert len(dt.getAnnIds()) == len(rows)


def test_score_threshold_and_explicit_files(run, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = invoke(
        [
            "predict",
            run["val_images"] / "000003.jpg",
            run["val_images"] / "000002.jpg",
            "--weights",
            run["weights"],
            "--out",
            out,
            "--score-thr",
            "0.1",
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert all(r["score"] >= 0.1 for r in rows)
    names = [im["file_name"] for im in json.loads(images_json_path(out).read_text())["images"]]
    assert names == ["000002.jpg", "000003.jpg"]


def test_bf16_runs_or_says_why(run, tmp_path: Path) -> None:
    """bfloat16 autocast on CPU: results, or (when an op lacks a bfloat16 CPU kernel) one line naming --bf16."""
    out = tmp_path / "p.json"
    result = invoke(
        ["predict", run["val_images"] / "000002.jpg", "--weights", run["weights"], "--out", out, "--bf16", "--device", "cpu"]
    )
    if result.exit_code == 0:
        assert isinstance(json.loads(out.read_text()), list)
    else:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "--bf16" in lines[0], result.output
        assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--half", "--device", "cpu"], "--half (float16) needs a CUDA device"),
        (["--half", "--bf16"], "exclude each other"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    ],
)
def test_bad_options_are_one_line(run, tmp_path: Path, extra: list[str], message: str) -> None:
    result = invoke(["predict", run["val_images"], "--weights", run["weights"], "--out", tmp_path / "p.json", *extra])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "p.json").exists()


def test_missing_inputs_are_one_line(run, tmp_path: Path) -> None:
    result = invoke(["predict", tmp_path / "nowhere", "--weights", run["weights"]])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    result = invoke(["predict", run["val_images"], "--weights", tmp_path / "missing.safetensors"])
    assert result.exit_code == 1 and "checkpoint not found" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke(["predict", tmp_path / "empty", "--weights", run["weights"]])
    assert result.exit_code == 1 and "no images found" in result.output


def test_collect_images_rules(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for name in ["a/z.PNG", "a/sub/b.jpeg", "a/c.TIFF", "b/x.bmp", "a/readme.md", "a/.x.jpg"]:
        (tmp_path / name).write_bytes(b"")
    listed = collect_images([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "z.PNG"])
    assert listed.root == tmp_path
    assert [(e.id, e.file_name) for e in listed.entries] == [(1, "a/c.TIFF"), (2, "a/sub/b.jpeg"), (3, "a/z.PNG"), (4, "b/x.bmp")]
    with pytest.raises(DyheadError, match="readme.md: not an image or video"):
        collect_images([tmp_path / "a" / "readme.md"])  # a named file is probed (PIL, then OpenCV) whatever its name
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": "x.bmp"}], "categories": [{"id": 4, "name": "c"}]}))
    with pytest.raises(DyheadError, match="must be the only PATH"):
        collect_images([ann, tmp_path / "b"])
    listed = collect_images([ann], images_dir=tmp_path / "b")
    assert [(e.id, e.path) for e in listed.entries] == [(7, tmp_path / "b" / "x.bmp")]
    assert listed.ann_categories == [{"id": 4, "name": "c"}]
    assert collect_images([ann]).entries[0].path == tmp_path / "x.bmp"  # default: the annotation file's folder
    with pytest.raises(DyheadError, match="--images is only used with a COCO annotation file"):
        collect_images([tmp_path / "b"], images_dir=tmp_path)


def test_category_ids_rules(run, tmp_path: Path) -> None:
    det = load_detector(run["weights"])
    assert det.class_names == ["circle", "square", "triangle", "cross"]
    ids = lambda cats: [c["id"] for c in cats]  # noqa: E731
    assert ids(category_ids(det)) == [1, 3, 7, 10]  # from the recipe's val_ann (it exists and names them)
    det.meta["category_ids"] = [5, 6, 7, 8]
    assert ids(category_ids(det)) == [5, 6, 7, 8]  # stored in the checkpoint: wins
    del det.meta["category_ids"]
    det.recipe.data.val_ann = str(tmp_path / "gone.json")
    assert ids(category_ids(det)) == [1, 2, 3, 4]  # nothing known: 1..K
    shuffled = [
        {"id": 40, "name": "cross"},
        {"id": 2, "name": "square"},
        {"id": 9, "name": "circle"},
        {"id": 11, "name": "triangle"},
    ]
    assert ids(category_ids(det, shuffled)) == [9, 2, 11, 40]  # an annotation file: matched by name
    with pytest.raises(DyheadError, match="do not match the model's 4 classes"):
        category_ids(det, [{"id": 1, "name": "dog"}])


def test_recipe_override_and_set(run, tmp_path: Path) -> None:
    det = load_detector(run["weights"], overrides=["model.head_options.detections_per_img=5"])
    assert det.recipe.model.head_options.detections_per_img == 5
    det = load_detector(run["weights"], recipe_path=run["recipe"])
    assert det.recipe.name == "predict-tiny"


def test_json_stream_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    stream = JsonStream(path)
    stream.write([{"a": 1}, {"b": [1.5, 2]}])
    assert not path.exists()  # only the temporary file until close()
    stream.write([])
    stream.write([{"c": None}])
    stream.close()
    assert json.loads(path.read_text()) == [{"a": 1}, {"b": [1.5, 2]}, {"c": None}]
    assert list(tmp_path.iterdir()) == [path]
    aborted = JsonStream(tmp_path / "other.json")
    aborted.write([{"a": 1}])
    aborted.abort()
    assert list(tmp_path.iterdir()) == [path]
    empty = JsonStream(tmp_path / "empty.json")
    empty.close()
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_images_json_path() -> None:
    assert images_json_path(Path("x/preds.json")) == Path("x/preds.images.json")
    assert images_json_path(Path("x/preds")) == Path("x/preds.images.json")
