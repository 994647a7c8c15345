"""dyhead visualize: boxes (predictions, ground truth, side by side) and the DyHead attention pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dyhead_cli.cli import app
from dyhead_cli.commands.visualize.attention import Prepared, sampling_points, trace_dyhead
from dyhead_cli.commands.visualize.command import parse_level, parse_point
from dyhead_cli.commands.visualize.drawing import heat_colours
from dyhead_cli.models.build import build_model
from dyhead_cli.recipe import BackboneConfig, DyHeadConfig, FPNConfig, ModelConfig

runner = CliRunner()


def invoke(args: list) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def check_picture(path: Path, min_size: tuple[int, int] = (200, 150)) -> Image.Image:
    """A real PNG of a sensible size that is not blank."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    assert image.width >= min_size[0] and image.height >= min_size[1], image.size
    assert image.width <= 4000 and image.height <= 4000, image.size
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    return image


def test_predictions_and_ground_truth_side_by_side(run, tmp_path: Path) -> None:
    images = [run["val_images"] / "000001.jpg", run["val_images"] / "000002.jpg"]
    out = tmp_path / "vis"
    result = invoke(
        [
            "visualize",
            *images,
            "--weights",
            run["weights"],
            "--ann",
            run["val_ann"],
            "--out",
            out,
            "--score-thr",
            "0.05",
            "--size",
            "256",
        ]
    )
    assert result.exit_code == 0, result.output
    for name in ("000001.png", "000002.png"):
        image = check_picture(out / name)
        assert image.width >= 2 * 256 and image.height >= 256  # two panels of 256 px side by side
    # the ground truth panel carries the annotation's colour for its category: compare left and right halves
    left = np.asarray(Image.open(out / "000001.png").convert("RGB"))[:, :256]
    assert left.std() > 10


def test_ground_truth_only_and_predictions_file(run, tmp_path: Path) -> None:
    out = tmp_path / "gt"
    result = invoke(
        ["visualize", "--ann", run["val_ann"], "--images", run["val_images"], "--out", out, "--limit", "2", "--size", "200"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000002.png"]
    check_picture(out / "000001.png", (200, 200))

    preds = tmp_path / "preds.json"
    assert invoke(["predict", run["val_images"], "--weights", run["weights"], "--out", preds]).exit_code == 0
    out = tmp_path / "from_preds"
    result = invoke(["visualize", run["val_images"] / "000003.jpg", "--preds", preds, "--out", out, "--score-thr", "0"])
    assert result.exit_code == 0, result.output
    image = check_picture(out / "000003.png", (512, 512))
    assert image.width < 2 * 512  # one panel: predictions only


def test_predictions_of_a_video_are_drawn_on_its_frames(run, tmp_path: Path) -> None:
    """``visualize --preds`` of ``predict VIDEO``: one picture per predicted frame, read from the video."""
    import cv2

    frames = [np.asarray(Image.open(run["val_images"] / f"00000{i}.jpg").convert("RGB")) for i in (1, 2, 3)]
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, frames[0].shape[1::-1])
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()
    preds = tmp_path / "preds.json"
    result = invoke(["predict", video, "--weights", run["weights"], "--out", preds, "--vid-stride", "2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "vis"
    result = invoke(["visualize", "--preds", preds, "--out", out, "--score-thr", "0", "--size", "200"])
    assert result.exit_code == 0, result.output
    assert "not found" not in result.output and "skipped" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["clip__frame000000.png", "clip__frame000002.png"]
    first, third = (np.asarray(check_picture(out / n, (128, 128)).convert("RGB")) for n in sorted(p.name for p in out.iterdir()))
    assert np.abs(first.astype(int) - third.astype(int)).mean() > 5  # two different frames


def test_attention_pictures(run, tmp_path: Path) -> None:
    out = tmp_path / "att"
    image = run["val_images"] / "000004.jpg"
    result = invoke(["visualize", image, "--weights", run["weights"], "--attention", "--out", out, "--size", "256"])
    assert result.exit_code == 0, result.output
    check_picture(out / "000004_scale_attention.png", (400, 100))
    check_picture(out / "000004_spatial_attention.png", (256, 256))
    check_picture(out / "000004_feature_activity.png", (300, 128))
    result = invoke(
        [
            "visualize",
            image,
            "--weights",
            run["weights"],
            "--attention",
            "--out",
            out / "p",
            "--point",
            "30,90",
            "--level",
            "P4",
            "--block",
            "1",
        ]
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "p").glob("*.png"))) == 3


def test_attention_pictures_name_the_levels_of_a_faster_rcnn_pyramid(tmp_path: Path) -> None:
    """Faster R-CNN's pyramid is P2..P6: --level P2 is its finest level, P7 is refused by name."""
    from dyhead_cli.engine.checkpoint import save_weights
    from dyhead_cli.recipe import RCNNConfig, Recipe, to_dict

    torch.manual_seed(0)
    cfg = ModelConfig(
        num_classes=3,
        head="faster_rcnn",
        backbone=BackboneConfig(name="test_resnet"),
        fpn=FPNConfig(channels=32, levels=[2, 3, 4, 5, 6], top_block="maxpool"),
        dyhead=DyHeadConfig(num_blocks=1),
        rcnn=RCNNConfig(rpn_post_nms_top_n=50, fc_dim=32),
    )
    weights = tmp_path / "frcnn.safetensors"
    save_weights(weights, build_model(cfg).eval(), to_dict(Recipe(model=cfg)))
    image = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "att"
    args = ["visualize", image, "--weights", weights, "--attention", "--out", out, "--size", "256", "--device", "cpu"]
    result = invoke([*args, "--level", "P2", "--point", "40,40"])
    assert result.exit_code == 0, result.output
    check_picture(out / "picture_scale_attention.png", (400, 100))
    check_picture(out / "picture_feature_activity.png", (300, 128))
    result = invoke([*args, "--level", "P7"])
    assert result.exit_code != 0
    assert "--level must be one of P2, P3, P4, P5, P6 for this model, got 'P7'" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention"], "--attention needs --weights"),
        ([], "nothing to draw"),
        (["--attention", "--weights", "W", "--point", "500,5"], "lies outside"),
        (["--attention", "--weights", "W", "--level", "P9"], "--level must be one of P3, P4, P5, P6, P7 for this model"),
        (["--attention", "--weights", "W", "--block", "4"], "--block must be within 1..1"),
        (["--weights", "W", "--preds", "p.json"], "not both"),
    ],
)
def test_mistakes_are_one_line(run, tmp_path: Path, args: list[str], message: str) -> None:
    args = [run["weights"] if a == "W" else a for a in args]
    result = invoke(["visualize", run["val_images"] / "000001.jpg", "--out", tmp_path, *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output


def tiny_model(blocks: int = 2):
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_classes=3,
        backbone=BackboneConfig(name="test_resnet"),
        fpn=FPNConfig(channels=32),
        dyhead=DyHeadConfig(num_blocks=blocks),
    )
    return build_model(cfg).eval()


def test_trace_matches_the_blocks_forward() -> None:
    model = tiny_model(blocks=2)
    with torch.no_grad():  # a non-zero offset conv, so the deformable sampling is exercised
        for block in model.dyhead.blocks:
            block.offset.weight.normal_(0, 0.02)
    images = torch.rand(1, 3, 128, 96) * 255
    traces, error = trace_dyhead(model, images)
    assert error < 1e-4
    assert len(traces) == 2 and len(traces[0].inputs) == 5
    with torch.no_grad():
        final = model.features(images)
    for mine, theirs in zip(traces[-1].outputs, final):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    for trace in traces:
        assert set(trace.scale[0]) == {"mid", "high"} and set(trace.scale[-1]) == {"mid", "low"}
        assert set(trace.scale[2]) == {"low", "mid", "high"}
        assert all(0.0 <= v <= 1.0 for level in trace.scale for v in level.values())
        assert trace.offsets[0].shape[1] == 18 and trace.masks[0].shape[1] == 9


def test_sampling_points_follow_the_offsets() -> None:
    offset = torch.zeros(1, 18, 4, 5)
    mask = torch.full((1, 9, 4, 5), 0.25)
    taps = sampling_points(offset, mask, (2, 3))
    assert [(r, c) for r, c, _, _, _ in taps] == [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (3, 4)]
    assert all(sr == r and sc == c and m == 0.25 for r, c, sr, sc, m in taps)
    offset[0, 0, 2, 3], offset[0, 1, 2, 3] = 0.5, -1.5  # tap 0: (dy, dx)
    r, c, sr, sc, _ = sampling_points(offset, mask, (2, 3))[0]
    assert (sr, sc) == (r + 0.5, c - 1.5)


def test_small_parsers_and_colours() -> None:
    assert parse_point("12,34.5") == (12.0, 34.5) and parse_point(None) is None
    assert parse_level("p5", (3, 4, 5, 6, 7)) == 2 and parse_level("7", (3, 4, 5, 6, 7)) == 4
    assert parse_level("P2", (2, 3, 4, 5, 6)) == 0 and parse_level("P6", (2, 3, 4, 5, 6)) == 4
    ends = heat_colours(np.array([0.0, 1.0, 2.0, np.nan]))
    assert ends.dtype == np.uint8 and tuple(ends[0]) == (68, 1, 84) and tuple(ends[1]) == tuple(ends[2]) == (253, 231, 37)
    assert tuple(ends[3]) == (68, 1, 84)
    assert Prepared(torch.zeros(1, 3, 8, 8), (8, 8), (8, 8)).size == (8, 8)


def test_docs_pictures_are_small_pngs() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    for name in ("predictions", "scale_attention", "spatial_attention", "feature_activity"):
        name = f"visualize_{name}.png"
        path = docs / name
        assert path.stat().st_size < 300_000
        check_picture(path)


def test_an_image_is_matched_by_name_only_when_its_listed_file_is_gone(tmp_path: Path) -> None:
    """train/000001.jpg was drawn with the boxes of val/000001.jpg from val.json, without a word."""
    from dyhead_cli.commands.visualize.command import ImageIndex

    for folder in ("val", "train"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "000001.jpg").write_bytes(b"x")
    index = ImageIndex.from_images([{"id": 7, "file_name": "000001.jpg"}], tmp_path / "val")
    assert index.find(tmp_path / "val" / "000001.jpg") == 7
    assert index.find(tmp_path / "train" / "000001.jpg") is None  # another image of the same name
    (tmp_path / "val" / "000001.jpg").unlink()  # the data set moved: the name is all there is to go by
    assert index.find(tmp_path / "train" / "000001.jpg") == 7


def test_frame_pictures_are_named_by_video_and_frame() -> None:
    from dyhead_cli.commands.visualize.command import output_names

    frames = [Path("/v/clip.avi#frame=000000"), Path("/v/clip.mp4#frame=000000"), Path("/v/sub/clip.avi#frame=000002")]
    assert output_names(frames, Path("/v")) == [
        "clip__frame000000.avi.png",
        "clip__frame000000.mp4.png",
        "sub__clip__frame000002.png",
    ]


def test_predictions_of_a_folder_drawn_with_an_annotation_file_use_their_own_ids(run, tmp_path: Path) -> None:
    """``predict FOLDER`` numbers the images by sorted path; an annotation file may number them otherwise.
    With ``--ann``, the results' ids are read through their ``.images.json`` (each image got another's boxes
    before); results without one are taken as the annotation file's ids, and refused when none of them is."""
    import json
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    names = {1: "c.jpg", 2: "a.jpg", 3: "b.jpg"}  # sorted paths give a = 1, b = 2, c = 3
    for i, name in names.items():
        shutil.copy(run["val_images"] / f"00000{i}.jpg", folder / name)
    data = json.loads(Path(run["val_ann"]).read_text())
    data["images"] = [dict(im, file_name=names[im["id"]]) for im in data["images"] if im["id"] in names]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in names]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    preds = tmp_path / "p.json"
    assert invoke(["predict", folder, "--weights", run["weights"], "--out", preds]).exit_code == 0
    common = ["--preds", preds, "--score-thr", "0.05", "--size", "200"]
    alone, paired = tmp_path / "alone", tmp_path / "paired"
    assert invoke(["visualize", folder / "c.jpg", *common, "--out", alone]).exit_code == 0
    result = invoke(["visualize", *common, "--ann", ann, "--images", folder, "--out", paired])
    assert result.exit_code == 0 and "not in" not in result.output, result.output
    single = np.asarray(Image.open(alone / "c.png").convert("RGB"))
    both = np.asarray(Image.open(paired / "c.png").convert("RGB"))
    assert both.shape[1] > 2 * 200 and np.array_equal(both[: single.shape[0], -single.shape[1] :], single)

    images_json = tmp_path / "p.images.json"
    images_json.unlink()  # results of another tool: their ids are the annotation file's
    result = invoke(["visualize", *common, "--ann", ann, "--images", folder, "--out", tmp_path / "other"])
    assert result.exit_code == 0, result.output
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps([dict(r, image_id=r["image_id"] + 100) for r in json.loads(preds.read_text())]))
    result = invoke(["visualize", "--preds", other, "--ann", ann, "--images", folder, "--out", tmp_path / "none"])
    assert result.exit_code == 1 and "none of the 3 image ids in" in result.output and "is an image of" in result.output
    assert not (tmp_path / "none").exists()
