"""Outputs that would destroy inputs, folder walks that loop, sizes that exhaust memory, full disks, markup in
names, exit codes, and the last line of defence in ``run_guarded``: every command, generated inputs.

Each refusal is checked by ``expect_refusal``: one ``error:`` line, the documented exit code, no traceback,
no file under the protected folders written, changed or removed.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from helpers_bad_inputs import check_clean_run, coco_file, expect_refusal, invoke, make_checkpoint, snapshot, write_image

from dyhead_cli.engine import results as results_module
from dyhead_cli.errors import DyheadError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_outputs")
    weights, recipe = make_checkpoint(root)
    images = root / "images"
    write_image(images / "a.png")
    write_image(images / "b.jpg", seed=1)
    ann = coco_file(
        root / "ann.json",
        [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}, {"id": 2, "file_name": "b.jpg", "width": 64, "height": 64}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "area": 100.0, "iscrowd": 0}],
    )
    return {"root": root, "weights": weights, "recipe": recipe, "images": images, "ann": ann}


def _protect(world, tmp_path):
    return (world["root"], tmp_path)


# ----------------------------------------------------------------------------------------------------
# predict: outputs


def predict_cases(w: dict[str, Path], t: Path) -> dict[str, tuple[list, str]]:
    (t / "afolder").mkdir(exist_ok=True)
    (t / "other.safetensors").write_bytes(b"a trained model")
    (t / "notes.txt").write_text("mine")
    (t / "parentfile").write_text("a file")
    img = w["images"] / "a.png"
    return {
        "out-is-weights": (["predict", img, "--weights", w["weights"], "--out", w["weights"]], "checkpoint --weights"),
        "out-is-annotation-input": (["predict", w["ann"], "--weights", w["weights"], "--out", w["ann"]], "input"),
        "out-is-recipe": (["predict", img, "--weights", w["weights"], "--recipe", w["recipe"], "--out", w["recipe"]], "--recipe"),
        "out-is-image": (["predict", img, "--weights", w["weights"], "--out", img], "input"),
        "out-is-a-folder": (["predict", img, "--weights", w["weights"], "--out", t / "afolder"], "is a folder"),
        "out-empty": (["predict", img, "--weights", w["weights"], "--out", ""], "--out must name a file"),
        "classes-empty": (["predict", img, "--weights", w["weights"], "--classes", ",", "--out", t / "p.json"], "--classes"),
        "out-replaces-other-checkpoint": (
            ["predict", img, "--weights", w["weights"], "--out", t / "other.safetensors"],
            "already exists",
        ),
        "out-replaces-other-file": (["predict", img, "--weights", w["weights"], "--out", t / "notes.txt"], "already exists"),
        "out-under-a-file": (
            ["predict", img, "--weights", w["weights"], "--out", t / "parentfile" / "p.json"],
            "is a file, not a folder",
        ),
        "weights-is-pth": (["predict", img, "--weights", _pth(t), "--out", t / "p.json"], "dyhead convert"),
        "weights-is-garbage": (["predict", img, "--weights", t / "notes.txt", "--out", t / "p.json"], "dyhead convert"),
        "weights-is-not-safetensors": (  # the hint's DST is never the source itself (convert refuses that)
            ["predict", img, "--weights", _garbage(t / "bad.safetensors"), "--out", t / "p.json"],
            "dyhead convert " + str(t / "bad.safetensors") + " bad_dyhead.safetensors",
        ),
        "weights-is-pt2": (
            ["predict", img, "--weights", _garbage(t / "m.pt2"), "--out", t / "p.json"],
            "is a torch.export program",
        ),
        "weights-is-folder": (["predict", img, "--weights", t / "afolder", "--out", t / "p.json"], "is a folder"),
        "weights-missing": (["predict", img, "--weights", t / "none.safetensors", "--out", t / "p.json"], "not found"),
        "image-missing": (["predict", t / "none.png", "--weights", w["weights"], "--out", t / "p.json"], "no such file"),
        "workers-huge": (["predict", img, "--weights", w["weights"], "--workers", 100000, "--out", t / "p.json"], "--workers"),
        "batch-size-zero": (
            ["predict", img, "--weights", w["weights"], "--batch-size", 0, "--out", t / "p.json"],
            "--batch-size",
        ),
        "score-thr-nan": (
            ["predict", img, "--weights", w["weights"], "--score-thr", "nan", "--out", t / "p.json"],
            "--score-thr",
        ),
        "device-bogus": (["predict", img, "--weights", w["weights"], "--device", "tpu", "--out", t / "p.json"], "--device"),
        # --save naming the images' own folder would draw over the photos (a file given alone: its folder)
        "save-into-the-input-folder": (
            ["predict", w["images"], "--weights", w["weights"], "--out", t / "p.json", "--save", w["images"]],
            "would draw over the input",
        ),
        "save-beside-the-input-file": (
            ["predict", img, "--weights", w["weights"], "--out", t / "p.json", "--save", w["images"]],
            f"would draw over the input {img}",
        ),
        "save-is-a-file": (
            ["predict", img, "--weights", w["weights"], "--out", t / "p.json", "--save", t / "notes.txt"],
            "is a file, not a folder",
        ),
    }


def _garbage(path: Path) -> Path:
    path.write_text("not a checkpoint")
    return path


def _pth(t: Path) -> Path:
    path = t / "model.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    return path


PREDICT_CASES = [
    "out-is-weights",
    "out-is-annotation-input",
    "out-is-recipe",
    "out-is-image",
    "out-is-a-folder",
    "out-empty",
    "classes-empty",
    "out-replaces-other-checkpoint",
    "out-replaces-other-file",
    "out-under-a-file",
    "image-list-is-annotation-input",
    "weights-is-pth",
    "weights-is-garbage",
    "weights-is-not-safetensors",
    "weights-is-pt2",
    "weights-is-folder",
    "weights-missing",
    "image-missing",
    "workers-huge",
    "batch-size-zero",
    "score-thr-nan",
    "device-bogus",
    "save-into-the-input-folder",
    "save-beside-the-input-file",
    "save-is-a-file",
]


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_predict_refuses_before_any_work(world, tmp_path, case):
    if case == "image-list-is-annotation-input":  # --out X whose image list X.images.json is the input
        ann = world["root"] / "in.images.json"
        ann.write_bytes(world["ann"].read_bytes())
        args = ["predict", ann, "--weights", world["weights"], "--images", world["images"], "--out", world["root"] / "in.json"]
        expect_refusal(args, "input", protect=_protect(world, tmp_path))
        ann.unlink()
        return
    args, expect = predict_cases(world, tmp_path)[case]
    expect_refusal(args, expect, protect=_protect(world, tmp_path))


def test_predict_with_every_image_unreadable_exits_non_zero_and_writes_nothing(world, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    (bad / "y.png").write_bytes(b"")
    result = invoke(["predict", bad, "--weights", world["weights"], "--out", tmp_path / "p.json"])
    check_clean_run(result)
    assert result.exit_code == 1 and "none of the 2 images could be read" in result.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "p.images.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temporary file left either


def test_predict_replaces_its_own_previous_results(world, tmp_path):
    out = tmp_path / "p.json"
    out.write_text("[]")
    result = invoke(["predict", world["images"] / "a.png", "--weights", world["weights"], "--out", out])
    check_clean_run(result)
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(out.read_text()), list)


def test_full_disk_while_writing_results_is_one_line_and_keeps_the_old_file(world, tmp_path, monkeypatch):
    out = tmp_path / "p.json"
    out.write_text("[]\n")
    real_open = open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(results_module, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    expect_refusal(
        ["predict", world["images"] / "a.png", "--weights", world["weights"], "--out", out],
        (f"cannot write {out}", "disk is full"),
        protect=_protect(world, tmp_path),
    )


@pytest.mark.parametrize("folder", ["/sys", "/proc/dyhead-no-such-folder"])
def test_unwritable_output_folders_are_one_line_naming_the_path(world, tmp_path, folder):
    """Root ignores permission bits: /sys refuses new files and /proc new folders even to root."""
    out = Path(folder) / "p.json"
    result = expect_refusal(
        ["predict", world["images"] / "a.png", "--weights", world["weights"], "--out", out],
        str(out),
        protect=_protect(world, tmp_path),
    )
    assert "cannot write" in result.stderr


def test_loading_our_checkpoint_never_reads_backbone_weights(tmp_path, monkeypatch):
    """A checkpoint trained with pretrained = true / pretrained_file predicts offline, without that file."""
    weights, _ = make_checkpoint(tmp_path / "ck", pretrained=True, pretrained_file=str(tmp_path / "gone.safetensors"))
    write_image(tmp_path / "a.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm

    def no_download(*args, **kwargs):
        raise AssertionError("tried to load pretrained backbone weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_download)
    result = invoke(["predict", tmp_path / "a.png", "--weights", weights, "--out", tmp_path / "p.json"])
    check_clean_run(result)
    assert result.exit_code == 0, result.output + result.stderr


def test_non_utf8_file_names_give_valid_json(world, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.fsencode(str(folder)) + b"/caf\xe9.png"
    write_image(Path(os.fsdecode(raw)))
    result = invoke(["predict", folder, "--weights", world["weights"], "--out", tmp_path / "p.json"])
    check_clean_run(result)
    assert result.exit_code == 0, result.stderr
    text = (tmp_path / "p.images.json").read_bytes().decode("utf-8")
    listing = json.loads(text)
    name = listing["images"][0]["file_name"]
    name.encode("utf-8")  # no lone surrogates: strict readers accept it
    assert name == "caf\\xe9.png"


def test_markup_in_file_names_is_printed_as_text(world, tmp_path):
    folder = tmp_path / "[red]imgs[bold]"
    write_image(folder / "[b]good.png")
    (folder / "x[" / "red]bad.jpg").parent.mkdir()
    (folder / "x[" / "red]bad.jpg").write_bytes(b"broken")  # its path reads ".../x[/red]bad.jpg"
    result = invoke(["predict", folder, "--weights", world["weights"], "--out", tmp_path / "p.json"])
    check_clean_run(result)
    assert result.exit_code == 0, result.stderr
    assert "[red]imgs[bold]/x[/red]bad.jpg" in result.stderr.replace("\n", "")


# ----------------------------------------------------------------------------------------------------
# folder walking: links followed once per real path


@pytest.mark.parametrize("command", ["predict", "visualize"])
def test_symlink_loops_end_and_list_each_image_once(world, tmp_path, command):
    folder = tmp_path / "loop"
    write_image(folder / "a.png")
    write_image(folder / "sub" / "b.png", seed=1)
    os.symlink(".", folder / "self")
    os.symlink("..", folder / "sub" / "up")
    os.symlink("sub", folder / "alias")
    os.symlink(folder, tmp_path / "outside")
    if command == "predict":
        result = invoke(["predict", folder, tmp_path / "outside", "--weights", world["weights"], "--out", tmp_path / "p.json"])
        check_clean_run(result)
        assert result.exit_code == 0, result.stderr
        names = [im["file_name"] for im in json.loads((tmp_path / "p.images.json").read_text())["images"]]
        assert len(names) == 2 and len({Path(n).name for n in names}) == 2
    else:
        result = invoke(["visualize", folder, "--weights", world["weights"], "--out", tmp_path / "vis"])
        check_clean_run(result)
        assert result.exit_code == 0, result.stderr
        assert len(list((tmp_path / "vis").iterdir())) == 2


# ----------------------------------------------------------------------------------------------------
# visualize


def visualize_cases(w: dict[str, Path], t: Path) -> dict[str, tuple[list, str]]:
    (t / "afile").write_text("x")
    base = ["visualize", w["images"], "--weights", w["weights"]]
    preds = t / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    notlist = t / "notlist.json"
    notlist.write_text(json.dumps({"a": 1}))
    return {
        "out-is-a-file": ([*base, "--out", t / "afile"], "is a file, not a folder"),
        "out-is-the-image-folder": ([*base, "--out", w["images"]], "input"),
        "out-is-the-ann-image-folder": (
            ["visualize", "--ann", w["ann"], "--images", w["images"], "--out", w["images"]],
            "--images folder this command reads",
        ),
        "size-huge": ([*base, "--size", 1_000_000, "--out", t / "vis"], "4096"),
        "size-tiny": ([*base, "--size", 10, "--out", t / "vis"], "--size"),
        "limit-negative": ([*base, "--limit", -1, "--out", t / "vis"], "--limit"),
        "score-thr-out-of-range": ([*base, "--score-thr", 3, "--out", t / "vis"], "--score-thr"),
        "preds-row-lacks-category": (
            ["visualize", "--preds", preds, "--ann", w["ann"], "--out", t / "vis"],
            "[0] lacks 'category_id'",
        ),
        "preds-not-a-list": (["visualize", "--preds", notlist, "--ann", w["ann"], "--out", t / "vis"], "not a COCO results list"),
        "preds-without-image-list": (["visualize", "--preds", _good_preds(t), "--out", t / "vis"], "image list not found"),
        "video": (["visualize", _video(t), "--weights", w["weights"], "--out", t / "vis"], "clip.avi is a video"),
    }


def _video(t: Path) -> Path:
    import cv2
    import numpy as np

    path = t / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    for k in range(2):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    return path


def _good_preds(t: Path) -> Path:
    path = t / "good.json"
    path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}]))
    return path


VISUALIZE_CASES = [
    "out-is-a-file",
    "out-is-the-image-folder",
    "out-is-the-ann-image-folder",
    "size-huge",
    "size-tiny",
    "limit-negative",
    "score-thr-out-of-range",
    "preds-row-lacks-category",
    "preds-not-a-list",
    "preds-without-image-list",
    "video",
    "attention-bad-point",
]


@pytest.mark.parametrize("case", VISUALIZE_CASES)
def test_visualize_refuses_before_any_work(world, tmp_path, case):
    if case == "attention-bad-point":
        args = [
            "visualize",
            world["images"] / "a.png",
            "--weights",
            world["weights"],
            "--attention",
            "--point",
            "nan,1",
            "--out",
            tmp_path / "vis",
        ]
        expect_refusal(args, "--point", protect=_protect(world, tmp_path))
        return
    args, expect = visualize_cases(world, tmp_path)[case]
    expect_refusal(args, expect, protect=_protect(world, tmp_path))


def test_visualize_with_every_image_unreadable_exits_non_zero(world, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    result = invoke(["visualize", bad, "--weights", world["weights"], "--out", tmp_path / "vis"])
    check_clean_run(result)
    assert result.exit_code == 1 and "error: none of the 1 images could be read" in result.stderr  # was exit 0
    assert not (tmp_path / "vis").exists() or not any((tmp_path / "vis").iterdir())  # nothing drawn


def test_visualize_never_draws_over_an_input_image(world, tmp_path):
    """An output picture named like an input PNG in the --out folder: refused, the PNG kept."""
    folder = tmp_path / "mix"
    write_image(folder / "a.png")
    expect_refusal(
        ["visualize", folder / "a.png", "--weights", world["weights"], "--out", folder],
        "input",
        protect=_protect(world, tmp_path),
    )


def test_images_with_one_name_get_one_picture_each(world, tmp_path):
    folder = tmp_path / "same"
    write_image(folder / "x.jpg")
    write_image(folder / "x.png", seed=1)
    write_image(folder / "d" / "y.png", seed=2)
    write_image(folder / "d__y.png", seed=3)
    result = invoke(["visualize", folder, "--weights", world["weights"], "--out", tmp_path / "vis"])
    check_clean_run(result)
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "vis").iterdir())) == 4


# ----------------------------------------------------------------------------------------------------
# convert: outputs (checked before the source is even read)


def convert_cases(t: Path) -> dict[str, tuple[list, str]]:
    src = t / "ref.safetensors"
    src.write_bytes(b"reference weights")
    pth = t / "ref.pth"
    pth.write_bytes(b"reference weights")
    mine = t / "mine.toml"
    mine.write_text('name = "mine"\n')
    existing = t / "old.safetensors"
    existing.write_bytes(b"an earlier conversion")
    (t / "afolder.safetensors").mkdir()
    (t / "parentfile").write_text("x")
    conv = ["convert", pth]
    return {
        "dst-is-src": (["convert", src, src, "--from", "official"], "source checkpoint SRC"),
        "default-recipe-out-is-recipe": ([*conv, t / "mine.safetensors", "--from", "official", "--recipe", mine], "--recipe"),
        "recipe-out-is-src": ([*conv, t / "new.safetensors", "--from", "official", "--recipe-out", pth], "source checkpoint SRC"),
        "recipe-out-is-dst": (
            [*conv, t / "new.safetensors", "--from", "official", "--recipe-out", t / "new.safetensors"],
            "same file",
        ),
        "dst-exists": ([*conv, existing, "--from", "official"], "--force"),
        "dst-is-a-folder": ([*conv, t / "afolder.safetensors", "--from", "official"], "is a folder"),
        "dst-under-a-file": ([*conv, t / "parentfile" / "x.safetensors", "--from", "official"], "is a file, not a folder"),
        "dst-wrong-suffix": ([*conv, t / "x.pth", "--from", "official"], ".safetensors"),
    }


CONVERT_CASES = [
    "dst-is-src",
    "default-recipe-out-is-recipe",
    "recipe-out-is-src",
    "recipe-out-is-dst",
    "dst-exists",
    "dst-is-a-folder",
    "dst-under-a-file",
    "dst-wrong-suffix",
]


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_never_overwrites_its_inputs(tmp_path, case):
    args, expect = convert_cases(tmp_path)[case]
    expect_refusal(args, expect, protect=(tmp_path,))


# ----------------------------------------------------------------------------------------------------
# data synth


def synth_cases(t: Path) -> dict[str, tuple[list, str]]:
    (t / "afile").write_text("x")
    mine = t / "mydata"
    (mine / "annotations").mkdir(parents=True)
    (mine / "annotations" / "train.json").write_text('{"images": []}')
    return {
        "image-size-huge": (["data", "synth", t / "s", "--image-size", 100_000], "2048"),
        "image-size-tiny": (["data", "synth", t / "s", "--image-size", 8], "32"),
        "num-train-huge": (["data", "synth", t / "s", "--num-train", 10**9], "100000"),
        "num-val-negative": (["data", "synth", t / "s", "--num-val", -1], "val"),
        "seed-negative": (["data", "synth", t / "s", "--seed", -1], "seed"),
        "out-is-a-file": (["data", "synth", t / "afile"], "is a file"),
        "out-under-a-file": (["data", "synth", t / "afile" / "s"], "is a file, not a folder"),
        "out-holds-other-data": (["data", "synth", mine, "--num-train", 1, "--num-val", 1, "--image-size", 32], "--force"),
    }


SYNTH_CASES = [
    "image-size-huge",
    "image-size-tiny",
    "num-train-huge",
    "num-val-negative",
    "seed-negative",
    "out-is-a-file",
    "out-under-a-file",
    "out-holds-other-data",
]


@pytest.mark.parametrize("case", SYNTH_CASES)
def test_data_synth_refuses_before_any_work(tmp_path, case):
    args, expect = synth_cases(tmp_path)[case]
    expect_refusal(args, expect, protect=(tmp_path,))


def test_data_synth_prints_markup_in_paths_as_text(tmp_path):
    out = tmp_path / "[/red]set[bold]"
    result = invoke(["data", "synth", out, "--num-train", 1, "--num-val", 1, "--image-size", 32])
    check_clean_run(result)
    assert result.exit_code == 0 and str(out) in result.stdout.replace("\n", "")
    again = invoke(["data", "synth", out, "--num-train", 1, "--num-val", 1, "--image-size", 32])  # its own set again: fine
    assert again.exit_code == 0, again.stderr


# ----------------------------------------------------------------------------------------------------
# run_guarded: whatever escapes a command is one line


def _raise(exc: BaseException):
    def command(*args, **kwargs):
        raise exc

    return command


GUARD_CASES = {
    "internal-bug": (KeyError("boom"), 2, ("internal error", "DYHEAD_DEBUG=1")),
    "disk-full": (OSError(errno.ENOSPC, "No space left on device", "/data/out.json"), 1, ("/data/out.json", "disk is full")),
    "read-only": (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), 1, ("/mnt/ro/x", "read-only")),
    "worker-prefix": (
        DyheadError(
            "Caught DyheadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\ndyhead_cli.errors.DyheadError: cannot read image a.jpg'
        ),
        1,
        ("error: cannot read image a.jpg",),
    ),
    "markup-in-message": (DyheadError("bad name [/red] and [model] kept"), 1, ("[/red] and [model] kept",)),
    "memory": (MemoryError(), 1, ("out of memory",)),
    "recursion": (RecursionError(), 1, ("nested too deeply",)),
}


@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_run_guarded_prints_one_line_for_anything(monkeypatch, tmp_path, case):
    from dyhead_cli.commands import data as data_command

    exc, code, expect = GUARD_CASES[case]
    monkeypatch.setattr(data_command, "check", _raise(exc))
    monkeypatch.delenv("DYHEAD_DEBUG", raising=False)
    result = expect_refusal(["data", "check", tmp_path / "a.json", "--images", tmp_path], expect, code=code, protect=(tmp_path,))
    assert "dyhead_cli.errors" not in result.stderr


def test_dyhead_debug_shows_the_traceback(monkeypatch, tmp_path):
    from dyhead_cli.commands import data as data_command

    monkeypatch.setattr(data_command, "check", _raise(KeyError("boom")))
    result = invoke(["data", "check", tmp_path / "a.json", "--images", tmp_path], env={"DYHEAD_DEBUG": "1"})
    assert isinstance(result.exception, KeyError)


def test_every_command_catches_the_same_way(monkeypatch, world, tmp_path):
    """predict and visualize go through run_guarded too: an OSError deep inside is one line."""
    from dyhead_cli.engine import inference

    monkeypatch.setattr(
        inference, "load_weights", _raise(PermissionError(errno.EACCES, "Permission denied", str(world["weights"])))
    )
    for args in (
        ["predict", world["images"], "--weights", world["weights"], "--out", tmp_path / "p.json"],
        ["visualize", world["images"], "--weights", world["weights"], "--out", tmp_path / "vis"],
    ):
        expect_refusal(args, (str(world["weights"]), "Permission denied"), protect=_protect(world, tmp_path))


def test_snapshot_sees_a_changed_file(tmp_path):
    """The harness itself: a test that cannot fail would prove nothing."""
    (tmp_path / "a").write_text("1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("2")
    assert snapshot(tmp_path) != before
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("new")
    assert snapshot(tmp_path) != before


def test_sigterm_is_an_interrupt_that_cleans_up(monkeypatch, world, tmp_path):
    """SIGTERM (kill, timeout, Slurm, docker stop) in the middle of predict: one line, exit 143, and no
    temporary file left beside --out (it used to kill the process where it stood)."""
    import signal

    from dyhead_cli.engine import predictor

    def terminated_while_detecting(self, items):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(predictor.Predictor, "detect", terminated_while_detecting)
    args = ["predict", world["images"], "--weights", world["weights"], "--out", tmp_path / "p.json"]
    expect_refusal(args, "error: terminated (SIGTERM)", code=143, protect=_protect(world, tmp_path))
    assert signal.getsignal(signal.SIGTERM) == before  # put back when the command ends


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_group_is_one_line_with_workers(world, tmp_path, signum):
    """`timeout`, Slurm and `kill -- -PGID` signal every process of the group, DataLoader workers too: a
    worker that died first made PyTorch print "Exception ignored in ... __del__" (and at times an internal
    error) before our line. Now: the one line and exit 143 / 130, and no output file."""
    import signal
    import subprocess
    import sys
    import time

    images = tmp_path / "many"
    for i in range(400):
        write_image(images / f"{i:03d}.png", size=96, seed=i)
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "dyhead_cli.cli", "predict", str(images), "--weights", str(world["weights"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--workers", "2", "--batch-size", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a job under `timeout` or Slurm
    )
    deadline = time.time() + 120
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while time.time() < deadline and len(children.read_text().split()) < 2 and proc.poll() is None:
        time.sleep(0.05)  # until both workers run
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, getattr(signal, signum))
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    want = ("error: terminated (SIGTERM)", 143) if signum == "SIGTERM" else ("error: interrupted", 130)
    assert (lines, proc.returncode) == ([want[0]], want[1]), stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_outputs_never_replace_annotation_files_or_land_in_the_data(world, tmp_path):
    """`eval --json` replaced the validation annotation file it had just read, `--plots` wrote PNGs into the
    image folder (read as images later), `predict --out` replaced any .json (an annotation file too)."""
    protect = _protect(world, tmp_path)
    eval_args = ["eval", world["recipe"], "--weights", world["weights"]]
    expect_refusal([*eval_args, "--json", world["ann"]], "is the validation annotation file data.val_ann", protect=protect)
    expect_refusal([*eval_args, "--plots", world["images"]], "is the validation images data.val_images", protect=protect)
    elsewhere = tmp_path / "instances_val.json"
    elsewhere.write_bytes(world["ann"].read_bytes())
    args = ["predict", world["images"], "--weights", world["weights"], "--out", elsewhere]
    expect_refusal(args, f"--out {elsewhere} is a COCO annotation file, not an output of this command", protect=protect)
    ours = tmp_path / "p.json"
    for _ in range(2):  # an earlier prediction (and its image list) is still replaced
        assert invoke(["predict", world["images"], "--weights", world["weights"], "--out", ours]).exit_code == 0


def test_weights_with_nan_are_refused_not_silent(world, tmp_path):
    """A checkpoint with a NaN tensor predicted "0 detections" and exit 0; now one line naming the tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(world["weights"]), "pt") as f:
        meta = f.metadata()
    state = load_file(str(world["weights"]))
    state["head.cls_logits.bias"] = torch.full_like(state["head.cls_logits.bias"], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad), metadata=meta)
    args = ["predict", world["images"], "--weights", bad, "--out", tmp_path / "p.json"]
    expect_refusal(
        args, (str(bad), "NaN or infinite values in 1 tensor(s) (head.cls_logits.bias)"), protect=_protect(world, tmp_path)
    )
    expect_refusal(["eval", world["recipe"], "--weights", bad], "head.cls_logits.bias", protect=_protect(world, tmp_path))
