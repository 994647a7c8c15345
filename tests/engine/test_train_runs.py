"""Run directories that can be trusted: what --out refuses, the lock, resume rules, fail-fast checks,
consistent checkpoints around a non-finite step, skipped images, and one-line errors for failed writes.
Each test makes its own inputs (a tiny synthetic data set, made once per module)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import write_tiny_recipe

import dyhead_cli.engine.train as engine
from dyhead_cli.engine.checkpoint import load_weights
from dyhead_cli.engine.run_dir import RunLock
from dyhead_cli.engine.train import train_from_files
from dyhead_cli.errors import DyheadError

pytestmark = pytest.mark.usefixtures("one_thread")
DYHEAD = [sys.executable, "-m", "dyhead_cli.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QUICK = ["train.max_steps=2", "train.eval_every=0", "train.checkpoint_every=0", "model.dyhead.num_blocks=0"]


def events(run: Path, kind: str | None = None) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if kind is None or r["event"] == kind]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny synthetic set, made once (the first training writes it)."""
    root = tmp_path_factory.mktemp("runs_data")
    recipe = write_tiny_recipe(root, root / "synthetic")
    train_from_files(recipe, root / "first", None, QUICK)
    return root / "synthetic"


@pytest.fixture
def recipe(tmp_path, data_root):
    return write_tiny_recipe(tmp_path, data_root)


# ----------------------------------------------------------------------------------------------------
# --out


def test_out_existing_run_is_refused_and_force_starts_over(tmp_path, recipe):
    run = tmp_path / "run"
    train_from_files(recipe, run, None, QUICK)
    before = (run / "best.safetensors").read_bytes()
    with pytest.raises(DyheadError, match=r"holds a run already: continue it with --resume .*--force"):
        train_from_files(recipe, run, None, QUICK)
    assert (run / "best.safetensors").read_bytes() == before and len(events(run, "start")) == 1
    train_from_files(recipe, run, None, QUICK, force=True)
    assert len(events(run, "start")) == 1 and len(events(run, "train")) == 2  # the old log went with --force


def test_out_of_the_wrong_kind_is_refused_before_any_work(tmp_path, recipe, data_root):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DyheadError, match="is a file"):
        train_from_files(recipe, tmp_path / "file.txt", None, QUICK)
    with pytest.raises(DyheadError, match="is \\(or is inside\\) an input"):
        train_from_files(recipe, data_root / "train" / "run", None, QUICK)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("x")
    with pytest.raises(DyheadError, match="folder with other files in it \\(todo.md\\).*--force"):
        train_from_files(recipe, tmp_path / "notes", None, QUICK)
    assert not list((data_root / "train").glob("run*"))


def test_a_run_directory_is_locked_while_a_training_writes_to_it(tmp_path, recipe):
    run = tmp_path / "run"
    run.mkdir()
    other = RunLock(run)  # another training holds the folder
    other.acquire()
    try:
        with pytest.raises(DyheadError, match=f"is in use by another training \\(pid {os.getpid()}\\)"):
            train_from_files(recipe, run, None, QUICK)
    finally:
        other.release()
    assert not (run / "metrics.jsonl").exists()
    train_from_files(recipe, run, None, QUICK)  # free again


# ----------------------------------------------------------------------------------------------------
# resume


def test_resume_takes_the_runs_recipe_and_refuses_unsafe_changes(tmp_path, recipe):
    run = tmp_path / "run"
    # settings only the run knows: a model change and a step count given with --set
    train_from_files(recipe, run, None, QUICK + ["model.fpn.channels=16"])
    saved = (run / "recipe.toml").read_bytes()
    with pytest.raises(DyheadError, match=r"--set at model\.fpn\.channels \(16 -> 32\).*weights were made for the old value"):
        train_from_files(None, None, run, ["model.fpn.channels=32"])
    with pytest.raises(DyheadError, match=r"train\.batch_size .*saved position in the epoch's data order"):
        train_from_files(None, None, run, ["train.batch_size=4"])
    with pytest.raises(DyheadError, match="continues in its own folder"):
        train_from_files(None, tmp_path / "elsewhere", run, [])
    assert (run / "recipe.toml").read_bytes() == saved  # failed resumes leave it alone
    # a safe change: more steps; recorded in metrics.jsonl, recipe.toml untouched
    train_from_files(None, None, run, ["train.max_steps=3"])
    (resume,) = events(run, "resume")
    assert resume["changed"] == {"train.max_steps": [2, 3]} and resume["step"] == 2
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3]
    assert (run / "recipe.toml").read_bytes() == saved
    assert load_weights(run / "last.safetensors")[1]["recipe"]["model"]["fpn"]["channels"] == 16
    # a later resume replays the recorded change: finished at step 3 of 3 and evaluated, it says so and
    # records nothing (it logged a resume "at step 3 (epoch 2 of 1)")
    messages = []

    class Collect(engine.Reporter):
        def message(self, text: str) -> None:
            messages.append(text)

    train_from_files(None, None, run, [], reporter=Collect())
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3] and len(events(run, "resume")) == 1
    assert messages == [
        f"{run} is finished: step 3 of 3, evaluated; nothing to train (more: --resume {run} --set train.max_steps=N, or train.epochs=N)"
    ]
    # shortened below where the run is: refused, and not recorded (a later resume would replay it)
    resumes = len(events(run, "resume"))
    with pytest.raises(
        DyheadError, match=r"the run is at step 3, past the end \(step 1\) that train.epochs = .*max_steps = 1 give"
    ):
        train_from_files(None, None, run, ["train.max_steps=1"])
    assert len(events(run, "resume")) == resumes
    # a hand edit of RUN/recipe.toml is refused, naming the key and both values; a resume-safe key is not
    text = saved.decode()
    (run / "recipe.toml").write_text(text.replace("channels = 16", "channels = 32", 1))
    with pytest.raises(DyheadError, match=r"recipe\.toml was edited after the run started: model\.fpn\.channels = 32 there, 16"):
        train_from_files(None, None, run, [])
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3]  # nothing ran
    (run / "recipe.toml").write_bytes(saved)
    train_from_files(None, None, run, [])  # undone: resumes (nothing left to do)
    # a resume-safe key edited there too: its recorded --set would override the edit (max_steps), or the edit
    # would take effect unrecorded (eval.batch_size): refused, with the value the run started with
    for old, new, message in (
        ("max_steps = 2", "max_steps = 5", r"train\.max_steps = 5 there, 2 when the run started.*--set key=value"),
        ("[eval]\nbatch_size = 4", "[eval]\nbatch_size = 8", r"eval\.batch_size = 8 there, 4 when the run started"),
    ):
        assert text.count(old) == 1, old
        (run / "recipe.toml").write_text(text.replace(old, new))
        with pytest.raises(DyheadError, match=message):
            train_from_files(None, None, run, [])
    (run / "recipe.toml").write_bytes(saved)
    # the data moved: its paths (and the run's name) may be edited; the run goes on with the new ones
    root = Path(re.search(r'^train_images = "(.*)"$', text, re.M).group(1)).parent
    moved = tmp_path / "moved_data"
    shutil.copytree(root, moved)
    (run / "recipe.toml").write_text(text.replace(f'"{root}/', f'"{moved}/').replace('name = "', 'name = "renamed-', 1))
    train_from_files(None, None, run, ["train.max_steps=4"])
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3, 4]
    assert load_weights(run / "last.safetensors")[1]["recipe"]["data"]["train_images"] == str(moved / "train")


def test_a_larger_max_steps_on_resume_continues_where_the_epoch_stood(tmp_path, recipe):
    """A run ended mid-epoch by max_steps keeps its place: the resumed run trains the epoch's remaining
    batches (12 per epoch here), crosses into the next epoch at step 12 and ends at the new max_steps. The
    epoch used to be marked done at the end, so the rest of it was skipped (a run could end early, or at once)."""
    run = tmp_path / "run"
    train_from_files(recipe, run, None, QUICK)
    assert [e["step"] for e in events(run, "eval")] == [2]  # the final evaluation, mid-epoch 0
    train_from_files(None, None, run, ["train.max_steps=14"])
    assert [e["step"] for e in events(run, "train")] == list(range(1, 15))
    assert [(e["step"], e["epoch"]) for e in events(run, "epoch")] == [(12, 1)]
    assert [e["step"] for e in events(run, "eval")] == [2, 14]
    assert load_weights(run / "last.safetensors")[1]["step"] == 14


def test_gradient_accumulation_logs_the_mean_loss_and_says_what_exists(tmp_path, recipe, monkeypatch):
    """With grad_accum = 2 a step's logged losses are the mean over its two micro-batches (the last one's
    before); `done` lists the files written (best.safetensors was named without an evaluation)."""
    seen = []
    real = engine.forward_losses

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append({k: float(v.detach()) for k, v in out.items()})
        return out

    monkeypatch.setattr(engine, "forward_losses", recording)
    messages = []

    class Collect(engine.Reporter):
        def message(self, text: str) -> None:
            messages.append(text)

    run = tmp_path / "run"
    sets = ["train.max_steps=2", "train.grad_accum=2", "train.batch_size=1", "train.eval_every=0"]
    train_from_files(recipe, run, None, sets + ["model.dyhead.num_blocks=0"], reporter=Collect())
    assert len(seen) == 4  # 2 steps x 2 micro-batches
    logged = events(run, "train")
    for step, row in enumerate(logged):
        pair = seen[2 * step : 2 * step + 2]
        for key in pair[0]:
            assert row[key] == pytest.approx((pair[0][key] + pair[1][key]) / 2, abs=2e-6), (step, key)
    assert any(m.startswith(f"done: {run} (best AP") and "best.safetensors" in m for m in messages)


def test_ema_weights_are_what_the_checkpoints_export(tmp_path, recipe):
    """train.ema_decay: last.safetensors holds the moving average, state.safetensors the raw weights
    (the average moves to the training device with the model; it stayed on the CPU before)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train_from_files(recipe, run, None, QUICK + ["train.ema_decay=0.5"])
    exported, _ = load_weights(run / "last.safetensors")
    raw = {k[len("model.") :]: v for k, v in load_file(str(run / "state.safetensors")).items() if k.startswith("model.")}
    key = "head.cls_logits.weight"
    assert not torch.equal(exported[key], raw[key]) and exported[key].device.type == "cpu"


def test_resume_with_a_recipe_file_that_disagrees_names_the_key(tmp_path, recipe):
    run = tmp_path / "run"
    train_from_files(recipe, run, None, QUICK)
    with pytest.raises(
        DyheadError, match=r"tiny.toml differs from the run's recipe.toml at model\.dyhead\.num_blocks \(0 -> 1\)"
    ):
        train_from_files(recipe, None, run, [])


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path, recipe):
    run = tmp_path / "run"
    train_from_files(recipe, run, None, QUICK)
    stale = run / ".last.safetensors.tmp-999999"  # what kill -9 in the middle of a save leaves
    stale.write_bytes(b"half a file")
    train_from_files(None, None, run, ["train.max_steps=3"])
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------------
# fail fast


def test_unknown_backbone_fails_before_any_file_is_written(tmp_path):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "fresh_data")
    result = subprocess.run(
        DYHEAD + ["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "model.backbone.name=resnet5O"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "unknown timm model 'resnet5O'" in result.stderr and "resnet50" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]  # no data generated, no run folder


def test_a_start_that_fails_leaves_no_run_behind_and_a_retry_works(tmp_path, recipe):
    """Too few images for the batch size fails after the folder was made (with recipe.toml and env.json):
    a retry with the same --out said "holds a run already", and --resume "no state.safetensors there"."""
    run = tmp_path / "run"
    with pytest.raises(DyheadError, match="too few for batch_size 1000"):
        train_from_files(recipe, run, None, QUICK + ["train.batch_size=1000"])
    assert not run.exists()
    run.mkdir()  # a folder that was there before keeps existing, empty
    with pytest.raises(DyheadError, match="too few"):
        train_from_files(recipe, run, None, QUICK + ["train.batch_size=1000"])
    assert run.is_dir() and list(run.iterdir()) == []
    train_from_files(recipe, run, None, QUICK)  # the retry, same --out
    assert [e["step"] for e in events(run, "train")] == [1, 2]


def test_a_run_that_stepped_keeps_its_folder_when_it_fails_before_logging(tmp_path, recipe, monkeypatch):
    """Trained steps, nothing logged yet (log_every 5), then a failure: the folder and its error record
    stay (the failed-start cleanup once took any run without a logged step for one that never started)."""
    calls = []
    real = engine.forward_losses

    def failing(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()} if len(calls) == 3 else out

    monkeypatch.setattr(engine, "forward_losses", failing)
    run = tmp_path / "run"
    with pytest.raises(DyheadError, match="non-finite"):
        train_from_files(recipe, run, None, ["train.max_steps=6", "train.log_every=5", "model.dyhead.num_blocks=0"])
    assert (run / "recipe.toml").is_file() and [e["event"] for e in events(run)][-1] == "error"
    # no checkpoint to resume from: a retry says so and points to --force, which starts over
    assert not (run / "state.safetensors").exists()
    with pytest.raises(DyheadError, match=r"stopped before its first checkpoint \(no state.safetensors\).*--force"):
        train_from_files(recipe, run, None, QUICK)
    monkeypatch.setattr(engine, "forward_losses", real)
    train_from_files(recipe, run, None, QUICK, force=True)
    assert [e["step"] for e in events(run, "train")] == [1, 2]


def test_the_users_recipe_inside_out_is_never_written_over(tmp_path, recipe):
    """`dyhead train recipe.toml --out .` with the user's own recipe.toml there: --force replaced it with
    the run's resolved copy (its comments and `extends` gone)."""
    project = tmp_path / "project"
    project.mkdir()
    mine = project / "recipe.toml"
    mine.write_text(f'# my notes\nextends = "{recipe.as_posix()}"\n')
    for force in (False, True):
        with pytest.raises(DyheadError, match=r"holds .*recipe.toml, an input of the run that the run writes over"):
            train_from_files(mine, project, None, QUICK, force=force)
    assert mine.read_text().startswith("# my notes") and sorted(p.name for p in project.iterdir()) == ["recipe.toml"]


@pytest.mark.parametrize("split, what", [("val", "validation"), ("train", "training")])
def test_missing_image_is_found_before_the_first_step(tmp_path, data_root, split, what):
    """A missing validation or training image file is one line before any work, naming the file, the
    annotation file that lists it and `data check` (a training image was found when the loader reached it)."""
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    victims = sorted((data / split).iterdir())[-2:]
    for victim in victims:
        victim.unlink()
    recipe = write_tiny_recipe(tmp_path, data)
    message = rf"{what} image not found: .*{victims[0].name} \(and 1 more\), listed in .*{split}.json; .*dyhead data check"
    with pytest.raises(DyheadError, match=message):
        train_from_files(recipe, tmp_path / "run", None, QUICK)
    assert not (tmp_path / "run").exists()


def test_unreadable_validation_images_are_found_early_or_skipped_on_resume(tmp_path, data_root):
    """A validation file that is no image is refused before the first step (it ended the first evaluation,
    an epoch later). A truncated JPEG passes that header check and fails in the evaluation; the message
    names data.skip_corrupt, which --resume now accepts (it refused to change it, and every resume failed
    in the same evaluation)."""
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    first, second = sorted((data / "val").iterdir())[:2]
    keep = first.read_bytes()
    first.write_bytes(b"not an image")
    recipe = write_tiny_recipe(tmp_path, data)
    with pytest.raises(DyheadError, match=f"cannot read validation image .*{first.name}.*or set data.skip_corrupt"):
        train_from_files(recipe, tmp_path / "run", None, QUICK)
    assert not (tmp_path / "run").exists()
    first.write_bytes(keep)
    second.write_bytes(second.read_bytes()[: second.stat().st_size * 2 // 3])  # a JPEG cut short: its header reads
    run = tmp_path / "run"
    with pytest.raises(DyheadError, match=r"cannot read image .*, listed in .*data.skip_corrupt = true skips unreadable"):
        train_from_files(recipe, run, None, QUICK)
    assert [e["step"] for e in events(run, "checkpoint")] == [2]  # trained, stopped in the evaluation
    train_from_files(None, None, run, ["data.skip_corrupt=true"])
    (resume,) = events(run, "resume")
    assert resume["changed"] == {"data.skip_corrupt": [False, True]}
    assert [e["step"] for e in events(run, "eval")] == [2]


def test_unwritable_output_is_one_line_before_any_work(tmp_path, recipe):
    # /sys refuses new files even to root: a read-only folder every Linux machine has
    result = subprocess.run(
        DYHEAD + ["train", str(recipe), "--out", "/sys/dyhead-run"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot write to /sys" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# consistent state


def test_non_finite_step_checkpoint_reproduces_it_and_a_lower_lr_goes_on(tmp_path, recipe, monkeypatch):
    """A weight moved by more than 1 from its initial value overflows the loss (as float16 overflows past
    65504): AdamW with lr 0.5 moves weights by about 0.5 a step, so that happens within a few steps. The
    last checkpoint must hold the state before the failing step, so that resuming with the same settings
    fails at the same step and resuming with a lower lr trains on."""
    real = engine.forward_losses
    initial: dict[str, torch.Tensor] = {}

    def overflowing(model, batch, accelerator, recipe=None):
        losses = real(model, batch, accelerator, recipe)
        weights = {k: v.detach() for k, v in model.named_parameters()}
        if not initial:  # the fresh run's first forward: its weights are the reference for every later run
            initial.update({k: v.clone() for k, v in weights.items()})
        moved = max(float((weights[k] - initial[k]).abs().max()) for k in weights)
        return {k: v * (float("inf") if moved > 1.0 else 1.0) for k, v in losses.items()}

    monkeypatch.setattr(engine, "forward_losses", overflowing)
    run = tmp_path / "run"
    steps = [
        "train.max_steps=12",
        "train.eval_every=0",
        "train.checkpoint_every=1",
        "train.lr=0.5",
        "train.warmup_steps=0",
        "model.dyhead.num_blocks=0",
    ]
    with pytest.raises(DyheadError, match=r"became non-finite at step (\d+).*holds the state before it") as first:
        train_from_files(recipe, run, None, steps)
    failed = int(first.value.args[0].split("at step ")[1].split()[0])
    assert 2 < failed < 12
    # the checkpoint of step failed-1 gave the non-finite forward: it was rolled back to step failed-2
    assert events(run, "checkpoint")[-1]["step"] == failed - 1 and events(run, "error")[-1]["checkpoint_step"] == failed - 2
    assert load_weights(run / "last.safetensors")[1]["step"] == failed - 2
    weights, _ = load_weights(run / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    with pytest.raises(DyheadError, match=f"non-finite at step {failed} "):
        train_from_files(None, None, run, [])
    train_from_files(None, None, run, ["train.lr=0.0001"])
    assert events(run, "train")[-1]["step"] == 12


def test_checkpoint_is_written_before_evaluation(tmp_path, recipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(engine, "coco_evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train_from_files(recipe, run, None, ["train.max_steps=2", "train.checkpoint_every=0", "model.dyhead.num_blocks=0"])
    (ckpt,) = events(run, "checkpoint")
    assert ckpt["step"] == 2 and load_weights(run / "last.safetensors")[1]["step"] == 2


def test_skipped_images_are_counted_per_epoch_even_a_batch_of_only_skipped_ones(tmp_path, data_root):
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    for image in (data / "train").iterdir():
        image.write_bytes(b"not an image")  # every training image unreadable: every batch is empty
    recipe = write_tiny_recipe(tmp_path, data)
    run = tmp_path / "run"
    messages: list[str] = []

    class Collect(engine.Reporter):
        def message(self, text: str) -> None:
            messages.append(text)

    train_from_files(
        recipe,
        run,
        None,
        ["data.skip_corrupt=true", "train.epochs=1", "train.eval_every=0", "model.dyhead.num_blocks=0"],
        reporter=Collect(),
    )
    (epoch,) = events(run, "epoch")
    assert epoch["skipped"] == 24 and epoch["epoch"] == 1
    assert any("24 unreadable training images skipped" in m for m in messages)
    assert [e["loss"] for e in events(run, "train")] == [0.0] * 12


def test_unreadable_image_in_a_worker_is_one_clean_line(tmp_path, data_root):
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    for image in (data / "train").iterdir():
        image.write_bytes(b"not an image")
    recipe = write_tiny_recipe(tmp_path, data)
    result = subprocess.run(
        DYHEAD
        + ["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.num_workers=1"]
        + sum((["--set", q] for q in QUICK), []),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot read image ") and "dyhead_cli.errors" not in result.stderr


def test_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, recipe, monkeypatch):
    import dyhead_cli.engine.checkpoint as ckpt

    run = tmp_path / "run"
    real = ckpt.save_file
    calls = {"n": 0}

    def filling(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the second checkpoint (state + last per checkpoint) finds the disk full
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", filling)
    with pytest.raises(
        DyheadError, match=r"cannot write .*state.safetensors: No space left on device; the previous file is intact"
    ):
        train_from_files(
            recipe,
            run,
            None,
            ["train.max_steps=2", "train.checkpoint_every=1", "train.eval_every=0", "model.dyhead.num_blocks=0"],
        )
    assert load_weights(run / "last.safetensors")[1]["step"] == 1
    assert not list(run.glob(".*.tmp-*"))


def test_preflight_builds_on_cpu_when_the_meta_device_cannot(monkeypatch):
    """Some timm models cannot be built on meta tensors (torch 2.11: RegNet's init runs aten::_unique2): the
    preflight check then builds once on the CPU instead of failing the run."""
    from dyhead_cli.engine import preflight
    from dyhead_cli.errors import DyheadError
    from dyhead_cli.models import build
    from dyhead_cli.recipe import BackboneConfig, DyHeadConfig, FPNConfig, ModelConfig

    real, devices = build.build_model, []

    def build_model(cfg):
        devices.append(torch.empty(0).device.type)
        if devices[-1] == "meta":
            raise DyheadError("could not create timm model 'x': aten::_unique2: no Meta kernel")
        return real(cfg)

    monkeypatch.setattr(build, "build_model", build_model)
    cfg = ModelConfig(
        num_classes=2, backbone=BackboneConfig(name="test_resnet"), fpn=FPNConfig(channels=32), dyhead=DyHeadConfig(num_blocks=1)
    )
    preflight.check_model(cfg)
    assert devices == ["meta", "cpu"]
    with pytest.raises(DyheadError, match="unknown|timm"):
        preflight.check_model(ModelConfig(backbone=BackboneConfig(name="resnet5O")))


def test_resume_redoes_an_evaluation_the_stop_cut_short(tmp_path, recipe):
    # killed in the evaluation after its last checkpoint: the resume said "done" and never evaluated
    run = tmp_path / "run"
    train_from_files(recipe, run, None, QUICK)
    (final,) = events(run, "eval")
    assert final["step"] == 2
    # the run as the kill left it: the checkpoint at step 2, no eval event, no best.safetensors
    kept = [r for r in events(run) if r["event"] != "eval"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (run / "best.safetensors").unlink()
    train_from_files(None, None, run, [])
    (again,) = events(run, "eval")
    assert again["step"] == 2 and again["AP"] == pytest.approx(final["AP"], abs=1e-6)
    assert (run / "best.safetensors").is_file()
    train_from_files(None, None, run, [])  # evaluated now: a further resume does not evaluate again
    assert len(events(run, "eval")) == 1


def test_a_worker_death_inside_an_optimizer_step_saves_no_torn_state(tmp_path, recipe, monkeypatch):
    """After a stop signal PyTorch may raise a worker's death anywhere in the main process, inside an
    optimizer step too (counters and weights half updated). Saving there once wrote a checkpoint whose
    position was a batch ahead of its step (that batch was never trained after --resume); now only a
    stop between steps writes one."""
    import signal

    from dyhead_cli.errors import Terminated

    class Signalled(engine.StopRequests):
        def __init__(self) -> None:
            super().__init__()
            self.signum = signal.SIGTERM  # as if SIGTERM had come

    def dying(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated. ")

    monkeypatch.setattr(engine, "StopRequests", Signalled)
    monkeypatch.setattr(engine, "grad_norm", dying)  # inside the first step, after its batch was counted
    run = tmp_path / "run"
    with pytest.raises(Terminated):
        train_from_files(recipe, run, None, QUICK)
    assert not (run / "state.safetensors").exists()
