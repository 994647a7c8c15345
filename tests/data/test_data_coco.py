"""CocoDetection, collate, the transforms and build_dataloader on tiny hand-made files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyhead_cli.data.check import check_dataset
from dyhead_cli.data.coco import CocoDetection
from dyhead_cli.data.images import _to_rgb
from dyhead_cli.data.loaders import build_dataloader, collate
from dyhead_cli.data.transforms import shortest_edge_size, test_transform, train_transform
from dyhead_cli.engine.evaluate import coco_evaluate
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import DataConfig

torch.set_num_threads(1)
CATS = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]


def write_coco(root: Path, images: list[tuple[str, int, int]], anns: list[tuple[int, int, list[float]]]) -> Path:
    """images: (file name, width, height) with ids 1..; anns: (image id, category id, xywh)."""
    data = {
        "images": [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(anns)
        ],
        "categories": CATS,
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_image_modes_load_as_rgb(tmp_path: Path) -> None:
    Image.new("L", (30, 20), 77).save(tmp_path / "grey.png")
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: shows the white it is composited on
    rgba.save(tmp_path / "rgba.png")
    Image.new("RGB", (30, 20), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red in CMYK
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    names = ["grey.png", "rgba.png", "pal.png", "cmyk.jpg", "deep.png"]
    ann = write_coco(tmp_path, [(n, 30, 20) for n in names], [(i + 1, 5, [2, 3, 10, 5]) for i in range(5)])
    ds = CocoDetection(tmp_path, ann)
    items = [ds[i] for i in range(5)]
    for it in items:
        assert it["image"].dtype == torch.uint8 and it["image"].shape == (3, 20, 30)
        assert it["orig_size"] == it["size"] == (20, 30)
        assert it["labels"].tolist() == [1] and it["boxes"].tolist() == [[2, 3, 12, 8]]
    grey, rgba_t, pal, cmyk, deep = (it["image"] for it in items)
    assert grey[:, 5, 5].tolist() == [77, 77, 77]
    assert rgba_t[:, 0, 0].tolist() == [255, 255, 255] and rgba_t[:, 5, 5].tolist() == [10, 200, 30]
    assert pal[:, 5, 5].tolist() == [200, 10, 10]
    r, g, b = cmyk[:, 10, 15].tolist()
    assert r > 200 and g < 60 and b < 60
    assert deep[:, 5, 5].tolist() == [255, 255, 255]
    # premultiplied alpha (in-memory modes only, which the Python API accepts): PIL converts "La" only to "LA"
    assert _to_rgb(Image.new("La", (2, 2), (100, 255))).getpixel((0, 0)) == (100, 100, 100)
    # 16-bit: one scale, 0..65535 -> 0..255, rounded, whatever an image's peak (a peak of 256 gave black)
    for value, want in ((255, 1), (256, 1), (4095, 16), (32768, 128), (65535, 255)):
        grey = Image.fromarray(np.full((2, 2), value, np.uint16))
        assert grey.mode.startswith("I;16") and _to_rgb(grey).getpixel((0, 0)) == (want,) * 3, value
    mixed = np.array([[800, 4096]], np.uint16)  # a pixel's value does not depend on the image's brightest one
    assert _to_rgb(Image.fromarray(mixed)).getpixel((0, 0)) == _to_rgb(Image.fromarray(mixed[:, :1])).getpixel((0, 0))
    assert _to_rgb(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_image_is_loaded_as_displayed(tmp_path: Path) -> None:
    # displayed: 20 wide, 40 tall, red block in the top-left corner; stored rotated, orientation 6
    shown = np.zeros((40, 20, 3), np.uint8)
    shown[:10, :8] = (255, 0, 0)
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # exif_transpose undoes it
    assert stored.size == (40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    ann = write_coco(tmp_path, [("rot.jpg", 20, 40)], [(1, 2, [0, 0, 8, 10]), (1, 9, [5, 30, 40, 40])])
    item = CocoDetection(tmp_path, ann)[0]
    assert item["image"].shape == (3, 40, 20) and item["orig_size"] == (40, 20)
    assert item["image"][0, :10, :8].float().mean() > 200  # the red block is where the box says
    assert item["image"][0, 20:, 10:].float().mean() < 40
    assert item["boxes"].tolist() == [[0, 0, 8, 10], [5, 30, 20, 40]]  # the second one clipped to the image
    assert item["labels"].tolist() == [0, 2]


def test_an_image_of_another_size_than_its_record_is_refused(tmp_path: Path) -> None:
    # the loaded image (EXIF applied) must be as large as the JSON says, else its boxes land elsewhere;
    # training took such an image silently (detectron2 raises SizeMismatchError)
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    stored = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown 20 wide, 40 tall
    stored.save(tmp_path / "rot.jpg", exif=exif)
    ann = write_coco(tmp_path, [("a.png", 60, 20), ("rot.jpg", 40, 20)], [(1, 2, [1, 1, 5, 5])])
    ds = CocoDetection(tmp_path, ann)
    with pytest.raises(DyheadError, match=r"a.png is 30x20 but .*ann.json says 60x20; its boxes would not fit"):
        ds[0]
    with pytest.raises(DyheadError, match=r"rot.jpg is 20x40 but .* says 40x20 \(the size before its EXIF rotation"):
        ds[1]


def test_crowd_and_zero_area_boxes_are_not_targets(tmp_path: Path) -> None:
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    ann = write_coco(tmp_path, [("a.png", 50, 40)], [(1, 2, [1, 1, 5, 5]), (1, 5, [3, 3, 0, 4]), (1, 9, [60, 1, 5, 5])])
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 9, "bbox": [2, 2, 9, 9], "iscrowd": 1})
    ann.write_text(json.dumps(data))
    item = CocoDetection(tmp_path, ann)[0]
    # zero width, crowd, and a box wholly outside the image (empty once clipped) are dropped
    assert item["boxes"].tolist() == [[1, 1, 6, 6]] and item["labels"].tolist() == [0]


def test_a_category_without_a_name_is_called_by_its_id(tmp_path: Path) -> None:
    # COCO files name their categories, but the name is optional here: training used to fail at its first
    # evaluation (KeyError 'name') after all its steps, on a file that ``data check`` only warns about
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    ann = write_coco(tmp_path, [("a.png", 50, 40)], [(1, 2, [1, 1, 20, 20])])
    data = json.loads(ann.read_text())
    del data["categories"][1]["name"]
    ann.write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, ann)
    assert ds.class_names == ["a", "5", "c"]
    result = {"image_id": 1, "category_id": 2, "bbox": [1, 1, 20, 20], "score": 0.9}
    metrics = coco_evaluate(ds.coco, [result])
    assert list(metrics["per_class"]) == ["a", "5", "c"] and metrics["AP"] == pytest.approx(100.0)
    report = check_dataset(ann, tmp_path)
    assert "category id 5 has no 'name' (it is called '5')" in report.warnings and not report.errors


def test_corrupt_and_missing_images(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "good.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a JPEG")
    full = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    images = [("good.jpg", 40, 30), ("garbage.jpg", 40, 30), ("truncated.jpg", 40, 30), ("gone.jpg", 40, 30)]
    ann = write_coco(tmp_path, images, [(1, 2, [1, 1, 5, 5])])
    strict = CocoDetection(tmp_path, ann)
    for index, name in ((1, "garbage.jpg"), (2, "truncated.jpg"), (3, "gone.jpg")):
        with pytest.raises(DyheadError, match=name):
            strict[index]

    lenient = CocoDetection(tmp_path, ann, skip_corrupt=True)
    batch = [lenient[i] for i in range(4)]
    assert batch[0] is not None and batch[1:] == [None, None, None]
    assert lenient.num_skipped == 3
    out = collate(batch)
    assert out["num_skipped"] == 3 and out["images"].shape == (1, 3, 128, 128) and out["image_ids"] == [1]
    empty = collate([None, None])
    assert empty["num_skipped"] == 2 and empty["images"].shape[0] == 0 and empty["targets"] == []


def test_collate_pads_to_the_divisibility_and_keeps_sizes() -> None:
    def item(h: int, w: int, value: int) -> dict:
        return {
            "image": torch.full((3, h, w), value, dtype=torch.uint8),
            "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
            "labels": torch.tensor([1]),
            "image_id": value,
            "orig_size": (2 * h, 2 * w),
            "size": (h, w),
        }

    out = collate([item(100, 150, 7), item(130, 90, 9)], size_divisibility=128)
    images = out["images"]
    assert images.dtype == torch.float32 and images.shape == (2, 3, 256, 256)
    assert out["image_sizes"] == [(100, 150), (130, 90)] and out["orig_sizes"] == [(200, 300), (260, 180)]
    assert images[0, :, :100, :150].eq(7).all() and images[0, :, 100:].eq(0).all() and images[0, :, :, 150:].eq(0).all()
    assert images[1, :, :130, :90].eq(9).all() and images[1, :, :, 90:].eq(0).all()
    assert out["image_ids"] == [7, 9] and out["num_skipped"] == 0
    assert collate([item(100, 150, 7)], size_divisibility=32)["images"].shape == (1, 3, 128, 160)


def test_flip_moves_image_and_boxes_together() -> None:
    image = np.zeros((60, 100, 3), np.uint8)
    image[10:30, 5:25] = 255  # the object the box describes
    boxes = np.array([[5, 10, 25, 30], [60, 0, 100, 60]], np.float32)
    flip = train_transform([60], 1000, hflip_prob=1.0, color_jitter=0.0, seed=0)
    out = flip(image=image, bboxes=boxes, labels=np.array([0, 1]))
    flipped = np.asarray(out["bboxes"])
    assert out["image"].shape == (60, 100, 3)
    np.testing.assert_allclose(flipped[:, 0], 100 - boxes[:, 2], atol=1e-3)
    np.testing.assert_allclose(flipped[:, 2], 100 - boxes[:, 0], atol=1e-3)
    np.testing.assert_allclose(flipped[:, [1, 3]], boxes[:, [1, 3]], atol=1e-3)
    assert out["image"][10:30, 75:95].min() == 255 and out["image"][:, :75].max() == 0


def test_resize_backends_pillow_as_detectron2_and_opencv() -> None:
    """data.resize_backend: "pillow" is Pillow's bilinear (detectron2's resize of uint8 images, so the
    official DyHead's), which smooths when shrinking; "cv2" OpenCV's. Enlarging, they nearly agree."""
    from dyhead_cli.data.transforms import resize_image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    pil = resize_image(img, 60, 80, "pillow")
    assert np.array_equal(pil, np.asarray(Image.fromarray(img).resize((80, 60), Image.Resampling.BILINEAR)))
    cv = resize_image(img, 60, 80, "cv2")
    assert pil.shape == cv.shape == (60, 80, 3) and np.abs(pil.astype(int) - cv).mean() > 5  # noise: smoothing shows
    up = np.abs(resize_image(img, 240, 320, "pillow").astype(int) - resize_image(img, 240, 320, "cv2")).max()
    assert up <= 2
    item = test_transform(60, 100, "pillow")(image=img, bboxes=np.zeros((0, 4)), labels=np.zeros(0, np.int64))
    assert np.array_equal(item["image"], pil)
    with pytest.raises(DyheadError, match="data.resize_backend must be one of cv2, pillow, got 'pil'"):
        test_transform(60, 100, "pil")


def test_multiscale_resize_sizes_match_detectron2() -> None:
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(300, 1200, 800, 1333) == (333, 1333)  # long side capped
    # detectron2 sets the short side to 800 itself: 151 * (800 / 151) * (1333 / 1600) rounds to 666, not 667
    assert shortest_edge_size(151, 302, 800, 1333) == (666, 1333)
    assert shortest_edge_size(434, 161, 800, 1333) == (1333, 495)
    assert shortest_edge_size(640, 480, 800, 1333) == (1067, 800)
    t = train_transform([50, 80], 150, hflip_prob=0.0, color_jitter=0.0, seed=1)
    image = np.zeros((100, 200, 3), np.uint8)
    box = np.array([[20, 10, 60, 50]], np.float32)
    seen = set()
    for _ in range(30):
        out = t(image=image, bboxes=box, labels=np.array([3]))
        h, w = out["image"].shape[:2]
        seen.add((h, w))
        np.testing.assert_allclose(out["bboxes"][0], box[0] * (w / 200), atol=1e-3)
    assert seen == {(50, 100), (75, 150)}  # short side 50; short side 80 would make the long side 160 > 150
    assert test_transform(64, 1000)(image=image, bboxes=box, labels=np.array([3]))["image"].shape == (64, 128, 3)
    with pytest.raises(DyheadError):
        train_transform([], 100, 0.5, 0.0)


def test_color_jitter_changes_pixels_not_boxes() -> None:
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    box = np.array([[4, 4, 20, 20]], np.float32)
    jitter = train_transform([40], 100, hflip_prob=0.0, color_jitter=0.4, seed=0)
    out = jitter(image=image, bboxes=box, labels=np.array([0]))
    assert not np.array_equal(out["image"], image)
    np.testing.assert_allclose(out["bboxes"], box, atol=1e-3)


def test_degenerate_boxes_are_dropped_with_their_labels(tmp_path: Path) -> None:
    Image.new("RGB", (400, 200)).save(tmp_path / "a.png")
    # a 0.004 px wide box survives loading but is < 1e-3 px after the 4x downscale
    ann = write_coco(tmp_path, [("a.png", 400, 200)], [(1, 2, [10, 10, 0.004, 20]), (1, 9, [100, 50, 40, 40])])
    item = CocoDetection(tmp_path, ann, transform=test_transform(50, 1000))[0]
    assert item["size"] == (50, 100) and item["orig_size"] == (200, 400)
    assert item["labels"].tolist() == [2]
    assert torch.allclose(item["boxes"], torch.tensor([[25.0, 12.5, 35.0, 22.5]]))


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"annotations": [], "categories": CATS}), "no 'images'"),
        (json.dumps({"images": [{"id": 1, "file_name": "a"}], "annotations": [], "categories": []}), "no categories"),
        (json.dumps({"images": [{"id": 1}], "categories": CATS}), "lacks 'file_name'"),
        (json.dumps({"images": [{"id": [1], "file_name": "a"}], "categories": CATS}), "must be an integer"),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a"}],
                    "categories": CATS,
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}],
                }
            ),
            "unknown category id 4",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a"}],
                    "categories": CATS,
                    "annotations": [{"id": 1, "image_id": 3, "category_id": 2, "bbox": [0, 0, 1, 1]}],
                }
            ),
            "unknown image id 3",
        ),
    ],
)
def test_malformed_annotation_files_are_user_errors(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DyheadError, match=problem) as info:
        CocoDetection(tmp_path, path)
    assert str(path) in str(info.value)
    with pytest.raises(DyheadError, match="not found"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def _synthetic_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        train_images=str(root / "train"),
        train_ann=str(root / "annotations" / "train.json"),
        val_images=str(root / "val"),
        val_ann=str(root / "annotations" / "val.json"),
        synthetic=True, synthetic_num_train=8, synthetic_num_val=3, synthetic_image_size=64,
        min_sizes=[48, 64, 80, 96, 112], max_size=200, test_min_size=64, **kw,
    )  # fmt: skip


def test_build_dataloader_is_reproducible_and_padded(tmp_path: Path) -> None:
    cfg = _synthetic_cfg(tmp_path, color_jitter=0.2)
    first = [next(iter(build_dataloader(cfg, "train", 4, shuffle=True, num_workers=0, seed=s))) for s in (1, 1, 2)]
    assert torch.equal(first[0]["images"], first[1]["images"]) and first[0]["image_ids"] == first[1]["image_ids"]
    assert first[0]["image_ids"] != first[2]["image_ids"] or not torch.equal(first[0]["images"], first[2]["images"])
    for batch in first:
        assert batch["images"].shape[0] == 4 and batch["images"].shape[-1] % 128 == 0
        for (h, w), target in zip(batch["image_sizes"], batch["targets"]):
            assert h in (48, 64, 80, 96, 112) and h == w
            boxes = target["boxes"]
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes[:, :2] >= 0).all()
            assert target["labels"].dtype == torch.int64 and target["labels"].max() <= 3
    val = list(build_dataloader(cfg, "val", 2, shuffle=False, num_workers=0))
    assert [b["image_sizes"] for b in val] == [[(64, 64), (64, 64)], [(64, 64)]]
    assert [i for b in val for i in b["image_ids"]] == [1, 2, 3]


def test_workers_get_their_own_augmentation_streams(tmp_path: Path) -> None:
    """Forked workers inherit one random state; without reseeding both would draw the same sizes."""
    cfg = _synthetic_cfg(tmp_path, hflip_prob=0.0)
    loader = build_dataloader(cfg, "train", 1, shuffle=False, num_workers=2, seed=0)
    sizes = [batch["image_sizes"][0][0] for batch in loader]  # items alternate between worker 0 and 1
    assert len(sizes) == 8
    assert sizes[0::2] != sizes[1::2]


NO_NETWORK_ON_IMPORT = """
import urllib.request, warnings
calls = []
def refuse(self, url, *args, **kwargs):
    calls.append(getattr(url, "full_url", url))
    raise OSError("no network in this test")
urllib.request.OpenerDirector.open = refuse
warnings.simplefilter("error")
import dyhead_cli.data.transforms
import albumentations
assert not calls, calls
print("no request")
"""


def test_importing_the_transforms_asks_nothing_of_the_network() -> None:
    # albumentations checks PyPI for a newer version at import unless NO_ALBUMENTATIONS_UPDATE is set
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run([sys.executable, "-c", NO_NETWORK_ON_IMPORT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "no request" in result.stdout, result.stderr[-2000:]


FFMPEG_QUIET = """
import sys
from pathlib import Path
from dyhead_cli.data.video import video_info
path = Path(sys.argv[1])
path.write_bytes(b"\\x00\\x00\\x00\\x18ftypmp42\\x00\\x00\\x00\\x00mp42isom" + bytes(range(256)) * 8)
print(video_info(path))
"""


def test_a_broken_video_gets_no_ffmpeg_line_on_stderr(tmp_path: Path) -> None:
    # FFmpeg printed "[mov,mp4,...] moov atom not found" beside our own one-line message
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", FFMPEG_QUIET, str(tmp_path / "broken.mp4")], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr
    assert "moov" not in result.stderr and "mov,mp4" not in result.stderr, result.stderr
