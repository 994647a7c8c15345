import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_train import write_tiny_recipe
from safetensors import safe_open

from dyhead_cli.engine.checkpoint import load_weights
from dyhead_cli.engine.train import EpochSampler, lr_factor, train
from dyhead_cli.errors import DyheadError
from dyhead_cli.recipe import TrainConfig, load_recipe

DYHEAD = [sys.executable, "-m", "dyhead_cli.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def events(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == kind]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def test_train_writes_run_directory(tmp_path, data_root):
    recipe = load_recipe(write_tiny_recipe(tmp_path, data_root), ["train.max_steps=4", "train.epochs=1"])
    torch.set_num_threads(1)
    metrics = train(recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert {"metrics.jsonl", "recipe.toml", "last.safetensors", "best.safetensors", "state.safetensors"} <= {
        p.name for p in run.iterdir()
    }
    assert not any(p.suffix in (".bin", ".pkl", ".pt", ".pth") for p in run.rglob("*"))
    train_rows = events(run, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train_rows)
    (ev,) = events(run, "eval")
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "step", "epoch"} <= set(ev) and ev["step"] == 4
    assert 0.0 <= metrics["AP"] <= 100.0
    again = load_recipe(run / "recipe.toml")
    assert again.model.class_names == ["circle", "square", "triangle", "cross"] and again.model.num_classes == 4
    state, meta = load_weights(run / "last.safetensors")
    assert meta["recipe"]["model"]["dyhead"]["offset_mode"] == "official" and meta["step"] == 4


def run_cli(args, **kw):
    return subprocess.run(DYHEAD + args, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, data_root):
    recipe = write_tiny_recipe(tmp_path, data_root)
    steps = ["--set", "train.max_steps=8", "--set", "train.eval_every=0"]
    full = run_cli(["train", str(recipe), "--out", str(tmp_path / "full")] + steps)
    assert full.returncode == 0, full.stderr
    reference = {r["step"]: r["loss"] for r in events(tmp_path / "full", "train")}
    assert sorted(reference) == list(range(1, 9))

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        DYHEAD + ["train", str(recipe), "--out", str(killed_dir)] + steps,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any(e["step"] >= 3 for e in events(killed_dir, "checkpoint")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = events(killed_dir, "checkpoint")
    assert checkpoints, "the run never wrote a checkpoint"
    saved_step = checkpoints[-1]["step"]
    assert saved_step < 8, "the run finished before it was killed"

    # no RECIPE, no --set: the run's own recipe.toml carries max_steps=8 and eval_every=0
    resumed = run_cli(["train", "--resume", str(killed_dir)])
    assert resumed.returncode == 0, resumed.stderr
    (resume_event,) = events(killed_dir, "resume")
    assert resume_event["step"] == saved_step
    rows = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in rows[rows.index(next(r for r in rows if r["event"] == "resume")) :] if r["event"] == "train"]
    assert [r["step"] for r in after] == list(range(saved_step + 1, 9))
    for r in after:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-4, abs=1e-5)
    # each step once: what the killed run logged past its checkpoint was dropped, in both files
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 9))
    saved = [r["step"] for r in rows if r["event"] == "checkpoint"]
    assert saved == sorted(set(saved)) and saved[0] == checkpoints[0]["step"] and saved[-1] == 8
    csv_steps = [line.split(",")[1] for line in (killed_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(s) for s in range(1, 9)] + ["8"]  # eight train rows, then the final eval


def test_resume_without_checkpoint_is_clear(tmp_path, data_root):
    recipe = write_tiny_recipe(tmp_path, data_root)
    (tmp_path / "empty").mkdir()
    result = run_cli(["train", str(recipe), "--resume", str(tmp_path / "empty")])
    assert result.returncode == 1 and "no state.safetensors" in result.stderr and "Traceback" not in result.stderr
    from dyhead_cli.engine.run_dir import saved_recipe

    with pytest.raises(DyheadError, match="nothing: no such folder"):
        saved_recipe(tmp_path / "nothing")
    with pytest.raises(DyheadError, match="is a file: give the run's folder"):
        saved_recipe(recipe)


def test_nan_loss_stops_with_the_step_and_keeps_checkpoint(tmp_path, data_root, monkeypatch):
    recipe = load_recipe(
        write_tiny_recipe(tmp_path, data_root), ["train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=0"]
    )
    import dyhead_cli.engine.train as engine

    real = engine.forward_losses
    calls = {"n": 0}

    def poisoned(model, batch, accelerator, recipe=None):
        calls["n"] += 1
        losses = real(model, batch, accelerator, recipe)
        if calls["n"] == 5:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(engine, "forward_losses", poisoned)
    # step 5's forward ran on the weights of step 4's checkpoint: that one is rolled back to step 2's
    with pytest.raises(DyheadError, match=r"non-finite at step 5 .*state.safetensors \(step 2\) holds the state before it"):
        train(recipe, tmp_path / "run")
    ckpt = [e for e in events(tmp_path / "run", "checkpoint")]
    assert [e["step"] for e in ckpt] == [2, 4]
    assert load_weights(tmp_path / "run" / "last.safetensors")[1]["step"] == 2


def test_two_processes_with_gloo_end_with_identical_weights(tmp_path, data_root):
    recipe = write_tiny_recipe(tmp_path, data_root)
    run_dir = tmp_path / "ddp"
    # torchrun starts the processes; Accelerate sees WORLD_SIZE=2 on CPU and sets up DDP over gloo
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dyhead_cli.cli",
        "train",
        str(recipe),
        "--out",
        str(run_dir),
        "--set",
        "train.max_steps=3",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "model.dyhead.num_blocks=1",
        "--set",
        "model.head_options.score_thresh=0.0",  # detections to compare from 3 steps of training
    ]
    env = {**ENV, "DYHEAD_SAVE_EVERY_RANK": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(run_dir.glob("rank*.safetensors"))
    assert [f.name for f in files] == ["rank0.safetensors", "rank1.safetensors"]
    with safe_open(str(files[0]), "pt") as a, safe_open(str(files[1]), "pt") as b:
        assert a.keys() == b.keys() and len(a.keys()) > 50
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    rows = events(run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the final evaluation scored every rank's share with rank 0's model (the one saved): each rank used
    # its own BatchNorm statistics before, so rank 1's images got another model's detections
    from dyhead_cli.data.coco import build_dataset
    from dyhead_cli.engine.evaluate import predict_shard
    from dyhead_cli.engine.inference import load_detector

    det = load_detector(run_dir / "last.safetensors")
    alone = predict_shard(det.model, build_dataset(det.recipe.data, "val"), det.recipe, torch.device("cpu"))
    logged = json.loads((run_dir / "val_predictions.json").read_text())
    fields = ("image_id", "category_id", "bbox", "score")  # loadRes added area, id... to the logged rows
    alone, logged = (sorted([r[f] for f in fields] for r in rows) for rows in (alone, logged))
    assert len(alone) == len(logged) > 0 and {r[0] for r in logged} == {r[0] for r in alone}
    assert alone == logged  # the same model on the same batches: the same rows (3e-5 apart before)


def test_sampler_shards_and_skips():
    a = EpochSampler(20, 2, seed=1, epoch=0, rank=0, world=2)
    b = EpochSampler(20, 2, seed=1, epoch=0, rank=1, world=2)
    seen = [i for batch in list(a) + list(b) for i in batch]
    assert sorted(seen) == list(range(20))
    assert list(EpochSampler(20, 2, seed=1, epoch=0, rank=0, world=2, skip=2)) == list(a)[2:]
    assert list(EpochSampler(20, 2, seed=1, epoch=1)) != list(EpochSampler(20, 2, seed=1, epoch=0))
    with pytest.raises(DyheadError, match="too few"):
        EpochSampler(3, 2, seed=0, epoch=0, world=2)


def test_lr_schedule_warmup_steps_and_cosine():
    cfg = TrainConfig(warmup_steps=10, warmup_factor=0.1, lr_steps=[0.5, 0.75], lr_gamma=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(20, 100, cfg) == 1.0 and lr_factor(50, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(80, 100, cfg) == pytest.approx(0.01)
    cos = TrainConfig(warmup_steps=0, schedule="cosine")
    assert lr_factor(50, 100, cos) == pytest.approx(0.5) and lr_factor(100, 100, cos) == pytest.approx(0.0)


def signal_group_when(cmd: list[str], sig: int, ready) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` in its own process group, send ``sig`` to the whole group (as a terminal's Ctrl-C or
    Slurm does, so DataLoader workers get it too) once ``ready()`` or the process ended; (process, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=240)
    return proc, err


def test_sigterm_and_ctrl_c_stop_after_the_step_with_a_checkpoint(tmp_path, data_root):
    """The first SIGTERM / Ctrl-C ends training after its step with a checkpoint there (it lost everything
    since the last periodic one); --resume then continues as if nothing had happened. Sent to the whole
    process group, as a terminal's Ctrl-C or Slurm does, so the DataLoader workers get it too."""
    recipe = write_tiny_recipe(tmp_path, data_root)
    # 20 steps (about 60 ms each here): the signal, sent once step 2 is logged, must land before the last
    # one; with 8 a busy machine that held this process back for 0.3 s let the run finish first
    last = 20
    steps = ["--set", f"train.max_steps={last}", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
    full = run_cli(["train", str(recipe), "--out", str(tmp_path / "full")] + steps)
    assert full.returncode == 0, full.stderr
    reference = {r["step"]: r["loss"] for r in events(tmp_path / "full", "train")}

    for name, sig, workers, code, line in (
        ("sigterm", signal.SIGTERM, 2, 143, "error: terminated (SIGTERM)"),
        ("ctrl_c", signal.SIGINT, 2, 130, "error: interrupted"),
    ):
        run = tmp_path / name
        cmd = DYHEAD + ["train", str(recipe), "--out", str(run), *steps, "--set", f"data.num_workers={workers}"]
        proc, err = signal_group_when(cmd, sig, lambda run=run: any(e["step"] >= 2 for e in events(run, "train")))
        assert proc.returncode == code and err.strip().splitlines()[-1] == line, (name, proc.returncode, err[-2000:])
        assert err.count("stopping after this step") == 1, err  # the main process decides; workers stay quiet
        (stopped,) = events(run, "interrupted")
        assert 2 <= stopped["step"] < last and stopped["signal"] == signal.Signals(sig).name, stopped
        assert events(run, "checkpoint")[-1]["step"] == stopped["step"]  # saved where it stopped

        resumed = run_cli(["train", "--resume", str(run)])
        assert resumed.returncode == 0, resumed.stderr
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        after = [r for r in rows[rows.index(next(r for r in rows if r["event"] == "resume")) :] if r["event"] == "train"]
        assert [r["step"] for r in after] == list(range(stopped["step"] + 1, last + 1)), name
        for r in after:
            assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-4, abs=1e-5), (name, r["step"])


SLOW_STEP = """
import runpy, sys, time
from pathlib import Path
import dyhead_cli.engine.train as train

marker, real, calls = Path(sys.argv.pop(1)), train.grad_norm, []


def slow_grad_norm(*args, **kwargs):  # between backward and the optimizer step: the step is half done
    calls.append(1)
    if len(calls) >= 3:
        marker.touch()
        time.sleep(1.5)
    return real(*args, **kwargs)


train.grad_norm = slow_grad_norm
sys.argv[0] = "dyhead"
runpy.run_module("dyhead_cli.cli", run_name="__main__")
"""


def test_sigterm_mid_step_with_workers_still_checkpoints_at_the_step(tmp_path, data_root):
    """The group's SIGTERM also ends the DataLoader workers, and PyTorch's SIGCHLD handler raised their death
    wherever the main process was: inside a step (after backward, before the optimizer step) the run then
    stopped without a checkpoint at that step. Once asked to stop, worker deaths no longer interrupt: the
    step ends, and the checkpoint is written there."""
    recipe = write_tiny_recipe(tmp_path, data_root)
    run, marker = tmp_path / "run", tmp_path / "in_step_3"
    args = ["train", str(recipe), "--out", str(run), "--set", "train.max_steps=20", "--set", "train.eval_every=0"]
    args += ["--set", "train.checkpoint_every=0", "--set", "data.num_workers=2"]
    proc, err = signal_group_when([sys.executable, "-c", SLOW_STEP, str(marker), *args], signal.SIGTERM, marker.exists)
    assert proc.returncode == 143 and "without a checkpoint" not in err, err[-2000:]
    stopped = events(run, "interrupted")
    assert stopped, err[-3000:]
    (stopped,) = stopped
    assert stopped["step"] == 3 and events(run, "checkpoint")[-1]["step"] == 3, (stopped, err[-2000:])
