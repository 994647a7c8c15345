"""`dyhead predict` inputs: videos, numeric file stems as ids, files that are no image, --save,
--classes / --iou / --max-det, and tiled inference (small objects in a large image)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dyhead_cli
from dyhead_cli.cli import app
from dyhead_cli.data.images import collect_images
from dyhead_cli.engine.evaluate import coco_evaluate, load_coco
from dyhead_cli.engine.results import images_json_path
from dyhead_cli.engine.tiling import merge_tiles, tile_windows

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def predict(*args) -> tuple[int, str]:
    result = runner.invoke(app, ["predict", *[str(a) for a in args]])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> None:
    codec = "mp4v" if path.suffix == ".mp4" else "MJPG"
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()


def val_frames(run, n: int) -> list[np.ndarray]:
    return [np.array(Image.open(run["val_images"] / f"{k:06d}.jpg").convert("RGB")) for k in range(1, n + 1)]


def test_a_three_frame_video_gives_three_images_of_detections(run, tmp_path):
    clip = tmp_path / "clip.mp4"
    write_video(clip, val_frames(run, 3))
    out = tmp_path / "preds.json"
    code, output = predict(clip, "--weights", run["weights"], "--out", out, "--save", tmp_path / "drawn", "--score-thr", "0.0")
    assert code == 0, output
    listing = json.loads(images_json_path(out).read_text())
    assert [im["file_name"] for im in listing["images"]] == [f"clip.mp4#frame={k:06d}" for k in range(3)]
    assert [im["id"] for im in listing["images"]] == [1, 2, 3]
    assert all((im["width"], im["height"]) == (128, 128) for im in listing["images"])
    rows = json.loads(out.read_text())
    assert {r["image_id"] for r in rows} == {1, 2, 3}  # detections on every frame

    # the API on the video gives the same detections, frame by frame
    results = dyhead_cli.load(run["weights"], device="cpu")(clip)
    assert len(results) == 3
    assert sorted(map(json.dumps, [row for k, r in enumerate(results, 1) for row in r.to_coco(k)])) == sorted(
        map(json.dumps, rows)
    )
    # and each frame's result draws on its own frame (plot() read the video as an image before)
    frame = cv2.VideoCapture(str(clip))
    for _ in range(2):
        frame.read()
    _, third = frame.read()
    assert results[2].frame == 2 and results[2].plot(min_score=1.01).size == (128, 128)
    assert np.abs(np.asarray(results[2].plot(min_score=1.01), np.int16) - third[:, :, ::-1]).mean() < 1.0

    # --save: an annotated video with the three frames, boxes drawn on them
    drawn = cv2.VideoCapture(str(tmp_path / "drawn" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = drawn.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (128, 128, 3)

    # --vid-stride 2: frames 0 and 2
    code, output = predict(clip, "--weights", run["weights"], "--out", tmp_path / "s.json", "--vid-stride", "2")
    assert code == 0, output
    names = [im["file_name"] for im in json.loads(images_json_path(tmp_path / "s.json").read_text())["images"]]
    assert names == ["clip.mp4#frame=000000", "clip.mp4#frame=000002"]


def test_image_ids_from_numeric_file_stems(tmp_path):
    folder = tmp_path / "coco"
    folder.mkdir()
    for stem in ("000000000139", "000000000285", "000000632"):
        Image.new("RGB", (8, 8)).save(folder / f"{stem}.jpg")
    listed = collect_images([folder])
    assert [(e.id, e.file_name) for e in listed.entries] == [
        (139, "000000000139.jpg"),
        (285, "000000000285.jpg"),
        (632, "000000632.jpg"),
    ]
    assert listed.id_rule == "file stems"
    Image.new("RGB", (8, 8)).save(folder / "cat.jpg")  # one name that is no number: 1..N for all
    listed = collect_images([folder])
    assert [e.id for e in listed.entries] == [1, 2, 3, 4] and listed.id_rule == "sorted paths 1..N"
    (folder / "cat.jpg").unlink()
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "139.png")  # the same number twice: 1..N
    assert collect_images([folder]).id_rule == "sorted paths 1..N"


def test_files_that_are_no_image_are_counted_and_nothing_predicted_fails(run, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    image = tmp_path / "photo"  # a PNG without an extension is recognised by its content
    shutil.copy(run["val_images"] / "000001.jpg", image)
    code, output = predict(notes, image, "--weights", run["weights"], "--out", tmp_path / "p.json")
    assert code == 0, output
    assert "notes.txt: not an image or video" in output and "(1 not an image or video)" in output
    assert "predicted 1 of 1 images" in output

    code, output = predict(notes, "--weights", run["weights"], "--out", tmp_path / "q.json")
    assert code == 1 and "notes.txt: not an image or video" in output
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, output = predict(broken, "--weights", run["weights"], "--out", tmp_path / "r.json")
    assert code == 1 and "none of the 1 images could be read" in output and "nothing predicted" in output
    assert not (tmp_path / "r.json").exists()  # no results file that looks like a run that found nothing


def test_classes_iou_max_det_and_save(run, tmp_path):
    def rows_of(*options) -> list[dict]:
        out = tmp_path / f"p{len(list(tmp_path.glob('*.json')))}.json"
        code, output = predict(run["val_images"], "--weights", run["weights"], "--out", out, *options)
        assert code == 0, output
        return json.loads(out.read_text())

    everything = rows_of()
    per_image = lambda rows: max(sum(r["image_id"] == i for r in rows) for i in {r["image_id"] for r in rows})
    assert per_image(everything) > 2
    assert per_image(rows_of("--max-det", "2")) == 2
    squares = rows_of("--classes", "square,10")  # a class name and a category id (cross)
    assert squares and {r["category_id"] for r in squares} <= {3, 10}
    # the classes are the only candidates: everything's squares and crosses, then more of them up to the cap
    wanted = {json.dumps(r, sort_keys=True) for r in everything if r["category_id"] in (3, 10)}
    assert wanted < {json.dumps(r, sort_keys=True) for r in squares} and per_image(squares) <= 100
    assert len(rows_of("--iou", "0.3")) < len(everything)  # stricter NMS keeps fewer boxes
    code, output = predict(run["val_images"], "--weights", run["weights"], "--classes", "sqare")
    assert code == 1 and "did you mean 'square'" in output

    drawn = tmp_path / "drawn"
    code, output = predict(
        run["val_images"], "--weights", run["weights"], "--out", tmp_path / "d.json", "--save", drawn, "--score-thr", "0.0"
    )
    assert code == 0 and "drawn in" in output
    saved = sorted(p.name for p in drawn.iterdir())
    assert saved == sorted(p.name for p in run["val_images"].glob("*.jpg"))
    original = np.asarray(Image.open(run["val_images"] / saved[0]), np.int16)
    assert np.abs(np.asarray(Image.open(drawn / saved[0]), np.int16) - original).mean() > 1.0  # boxes drawn


def test_tile_windows_cover_the_image_with_the_overlap_asked():
    assert tile_windows(100, 120, 128, 0.2) == []  # fits in one tile: the whole image only
    wins = tile_windows(300, 500, 128, 0.25)
    xs = sorted({w[0] for w in wins})
    ys = sorted({w[1] for w in wins})
    assert xs[0] == 0 and xs[-1] == 500 - 128 and ys[-1] == 300 - 128  # flush with the far edges
    assert all(b - a <= 96 for a, b in zip(xs, xs[1:]))  # step 128 * (1 - 0.25) or less: overlap >= 25%
    assert all(x1 - x0 == 128 and y1 - y0 == 128 for x0, y0, x1, y1 in wins)
    covered = np.zeros((300, 500), bool)
    for x0, y0, x1, y1 in wins:
        covered[y0:y1, x0:x1] = True
    assert covered.all()

    a = {"boxes": torch.tensor([[10.0, 10, 50, 50]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    b = {
        "boxes": torch.tensor([[0.0, 0, 40, 40], [0, 0, 40, 40]]),
        "scores": torch.tensor([0.8, 0.7]),
        "labels": torch.tensor([1, 2]),
    }
    merged = merge_tiles([a, b], [(0, 0), (10, 10)], iou=0.5, max_det=10)  # b's first box is a's, shifted
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7]) and merged["labels"].tolist() == [1, 2]
    assert merged["boxes"][1].tolist() == [10.0, 10.0, 50.0, 50.0]


def mosaic_case(run, tmp_path: Path) -> tuple[Path, Path]:
    """The 8 validation images, each twice, in a 4 x 4 mosaic (512 x 512 px) with their boxes: small
    objects in a large image, which the recipe's resize (shorter side 128) shrinks 4x as a whole."""
    ann = json.loads(run["val_ann"].read_text())
    images = sorted(ann["images"], key=lambda im: im["id"])[:8] * 2
    size = 128
    mosaic = np.zeros((4 * size, 4 * size, 3), np.uint8)
    gt = {
        "images": [{"id": 1, "file_name": "mosaic.png", "width": 4 * size, "height": 4 * size}],
        "categories": ann["categories"],
        "annotations": [],
    }
    for k, im in enumerate(images):
        r, c = divmod(k, 4)
        mosaic[r * size : (r + 1) * size, c * size : (c + 1) * size] = np.asarray(
            Image.open(run["val_images"] / im["file_name"]).convert("RGB")
        )
        for a in (a for a in ann["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": 1,
                    "category_id": a["category_id"],
                    "bbox": [x + c * size, y + r * size, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    (tmp_path / "mosaic").mkdir()
    Image.fromarray(mosaic).save(tmp_path / "mosaic" / "mosaic.png")
    (tmp_path / "mosaic_gt.json").write_text(json.dumps(gt))
    return tmp_path / "mosaic" / "mosaic.png", tmp_path / "mosaic_gt.json"


def found_objects(rows: list[dict], gt: Path, iou: float = 0.5) -> int:
    """Ground-truth boxes that some detection overlaps by IoU >= ``iou`` (any class, any score)."""
    from torchvision.ops import box_iou

    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    truth = torch.tensor([xyxy(a["bbox"]) for a in json.loads(gt.read_text())["annotations"]])
    if not rows:
        return 0
    return int((box_iou(truth, torch.tensor([xyxy(r["bbox"]) for r in rows])).max(1).values >= iou).sum())


def test_tiled_prediction_finds_small_objects_that_whole_image_prediction_misses(run, tmp_path):
    image, gt = mosaic_case(run, tmp_path)
    found, ap50 = {}, {}
    for tile in ("0", "128"):
        out = tmp_path / f"tile{tile}.json"
        tiling = ["--tile", tile, "--tile-overlap", "0.25"] if tile != "0" else []
        code, output = predict(image, "--weights", run["weights"], "--out", out, *tiling)
        assert code == 0, output
        rows = json.loads(out.read_text())
        assert {r["image_id"] for r in rows} == {1}
        found[tile], ap50[tile] = found_objects(rows, gt), coco_evaluate(load_coco(gt), rows)["AP50"]
    total = len(json.loads(gt.read_text())["annotations"])
    print(
        f"mosaic of {total} objects: whole image finds {found['0']} (AP50 {ap50['0']:.1f}), tiled {found['128']} (AP50 {ap50['128']:.1f})"
    )
    # the 8-step tiny model finds few objects at all (see the slow test below for a trained one);
    # shrunk 4x as a whole image, it finds fewer still
    assert found["128"] > found["0"] and ap50["128"] >= ap50["0"]
    # and the API gives the same tiled detections
    model = dyhead_cli.load(run["weights"], device="cpu", tile=128, tile_overlap=0.25)
    (result,) = model(image)
    assert sorted(map(json.dumps, result.to_coco(1))) == sorted(
        map(json.dumps, json.loads((tmp_path / "tile128.json").read_text()))
    )
    with pytest.raises(Exception, match="^tile must be at least 32"):  # the API names its keyword argument
        dyhead_cli.load(run["weights"], device="cpu", tile=8)
    # an overlap without tiles is a mistake (it would change nothing), said in one line
    for tiling in (["--tile-overlap", "0.3"], ["--tile", "0", "--tile-overlap", "0.3"]):
        code, output = predict(image, "--weights", run["weights"], "--out", tmp_path / "x.json", *tiling)
        assert code == 1 and output.strip().splitlines() == [
            "error: --tile-overlap 0.3 applies to tiled inference only: give --tile SIZE too"
        ]
        assert not (tmp_path / "x.json").exists()


def test_an_image_that_fits_in_one_tile_gives_the_untiled_detections(run):
    """--tile on an image no larger than a tile: the model's own detections. A second NMS over the tile's
    (already clipped) boxes dropped some (100 -> 77 on a helper's image)."""
    path = run["val_images"] / "000002.jpg"
    (plain,) = dyhead_cli.load(run["weights"], device="cpu")(path)
    (tiled,) = dyhead_cli.load(run["weights"], device="cpu", tile=512)(path)
    assert len(plain) > 0 and torch.equal(tiled.boxes, plain.boxes) and torch.equal(tiled.scores, plain.scores)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained long enough to find most objects (colour-by-class shapes, 200 steps)."""
    from conftest import TINY

    from dyhead_cli.engine.train import train
    from dyhead_cli.recipe import load_recipe

    root = tmp_path_factory.mktemp("tiling_run")
    text = TINY.format(root=(root / "synthetic").as_posix())
    text = text.replace("max_steps = 8", "max_steps = 200").replace("synthetic_num_train = 12", "synthetic_num_train = 64")
    text = text.replace("synthetic = true", "synthetic = true\nsynthetic_colour_by_class = true").replace(
        "batch_size = 2", "batch_size = 4"
    )
    (root / "tiny.toml").write_text(text)
    torch.manual_seed(0)
    train(load_recipe(root / "tiny.toml"), root / "run")
    return {
        "weights": root / "run" / "last.safetensors",
        "val_ann": root / "synthetic" / "annotations" / "val.json",
        "val_images": root / "synthetic" / "val",
    }


@pytest.mark.slow
def test_tiling_ap_on_a_mosaic_with_a_trained_model(trained_run, tmp_path):
    image, gt = mosaic_case(trained_run, tmp_path)
    figures = {}
    for tile in (0, 128):
        (res,) = dyhead_cli.load(trained_run["weights"], device="cpu", tile=tile, tile_overlap=0.25)(image)
        rows = res.to_coco(1)
        m = coco_evaluate(load_coco(gt), [dict(r) for r in rows])
        figures[tile] = (m["AP"], m["AP50"], found_objects(rows, gt))
    total = len(json.loads(gt.read_text())["annotations"])
    print(f"mosaic of {total} objects, (AP, AP50, found at IoU 0.5): whole image {figures[0]}, tiled {figures[128]}")
    assert figures[128][0] > figures[0][0] + 5.0 and figures[128][2] > figures[0][2]


def test_a_stopped_or_failed_predict_leaves_no_cut_video_and_no_half_output(run, tmp_path):
    """Stopped after its first frames, ``predict VIDEO --save DIR`` leaves neither results nor a cut video
    (the video was written in place: a valid file of the frames so far). ``--save`` naming the results' own
    file is refused before any work, and a run that predicts nothing leaves no folder it made."""
    from dyhead_cli.engine.predict import PredictOptions
    from dyhead_cli.engine.predict import predict as predict_engine

    clip = tmp_path / "clip.mp4"
    write_video(clip, val_frames(run, 4))
    out, drawn = tmp_path / "new" / "p.json", tmp_path / "drawn"

    def stop_after_two(summary) -> None:
        if summary.num_predicted >= 2:
            raise KeyboardInterrupt

    options = PredictOptions(device="cpu", batch_size=1, workers=0, save_dir=drawn)
    with pytest.raises(KeyboardInterrupt):
        predict_engine([clip], run["weights"], out, options, on_batch=stop_after_two)
    assert not (tmp_path / "new").exists()  # results, image list and the folder made for them: gone
    assert not drawn.exists() or not any(drawn.iterdir()), list(drawn.iterdir())
    summary = predict_engine([clip], run["weights"], out, options)
    assert summary.num_predicted == 4 and sorted(p.name for p in drawn.iterdir()) == ["clip.mp4"]  # no leftovers

    for save in (out, images_json_path(out)):
        code, output = predict(
            clip, "--weights", run["weights"], "--out", tmp_path / "o" / "p.json", "--save", tmp_path / "o" / save.name
        )
        assert code == 1 and f"is where the results go ({tmp_path / 'o' / save.name})" in output, output
        assert not (tmp_path / "o").exists()
    text = tmp_path / "text.jpg"
    text.write_text("hello world")
    code, output = predict(text, "--weights", run["weights"], "--out", tmp_path / "o1" / "p.json")
    assert code == 1 and "none of the 1 images could be read" in output and not (tmp_path / "o1").exists()
