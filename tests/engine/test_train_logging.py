"""What a run shows and leaves behind: plain log lines off a terminal, metrics.csv, results.png, env.json,
the evaluation plots, trackers, Accelerate's precision taking precedence, aspect-ratio batches and
sharded evaluation (2 gloo processes give the AP of one)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_train import write_tiny_recipe

from dyhead_cli.data.loaders import EpochSampler, ShardBatches, alone_groups, padded_size
from dyhead_cli.engine.train import train_from_files
from dyhead_cli.errors import DyheadError

DYHEAD = [sys.executable, "-m", "dyhead_cli.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("logging_data") / "synthetic"


def test_redirected_output_has_a_line_per_log_every_and_the_run_has_its_files(tmp_path, data_root):
    recipe = write_tiny_recipe(tmp_path, data_root)
    run = tmp_path / "run"
    result = subprocess.run(
        DYHEAD
        + ["train", str(recipe), "--out", str(run)]
        + sets("train.max_steps=6", "train.log_every=2", "model.dyhead.num_blocks=0"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/6", "4/6", "6/6"]
    pattern = r"step \d+/6  epoch 1/1  loss \d+\.\d{4} \(cls [\d.]+ box [\d.]+ centerness [\d.]+\)  lr \S+  [\d.]+ img/s  eta \d+s  mem \d+ MB"
    assert all(re.fullmatch(pattern, s) for s in steps), steps
    assert any(line.startswith("eval: 6 images in ") for line in lines) and any(
        line.startswith("eval  epoch 1 step 6: AP ") for line in lines
    )
    assert "\x1b[" not in result.stdout  # no terminal control codes in a log file

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(r["event"], r["step"]) for r in rows] == [("train", "2"), ("train", "4"), ("train", "6"), ("eval", "6")]
    assert float(rows[0]["loss"]) > 0 and rows[3]["AP"] != ""
    for name in ("results.png", "confusion_matrix.png", "pr_curves.png"):
        assert (run / name).read_bytes()[:8] == PNG, name
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["timm"] and env["packages"]["accelerate"]
    assert env["mixed_precision"] == "no" and env["device"] == "cpu" and "train" in env["command"]
    assert isinstance(json.loads((run / "val_predictions.json").read_text()), list)


def test_accelerate_launch_bf16_trains_in_bf16_and_records_it(tmp_path, data_root):
    recipe = write_tiny_recipe(tmp_path, data_root)  # the recipe says mixed_precision = "no"
    run = tmp_path / "run"
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    cmd = [
        launcher,
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "-m",
        "dyhead_cli.cli",
        "train",
        str(recipe),
        "--out",
        str(run),
    ] + sets("train.max_steps=2", "train.eval_every=0", "model.dyhead.num_blocks=0")
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (start,) = events(run, "start")
    assert start["mixed_precision"] == "bf16" and start["autocast"] == "bfloat16"
    assert 'mixed_precision = "bf16"' in (run / "recipe.toml").read_text()
    assert json.loads((run / "env.json").read_text())["mixed_precision"] == "bf16"


def test_tensorboard_tracker_writes_events_and_a_missing_tracker_is_one_line(tmp_path, data_root):
    pytest.importorskip("tensorboard")
    recipe = write_tiny_recipe(tmp_path, data_root)
    run = tmp_path / "run"
    train_from_files(
        recipe,
        run,
        None,
        ['train.log_with=["tensorboard"]', "train.max_steps=2", "train.eval_every=0", "model.dyhead.num_blocks=0"],
    )
    assert list(run.rglob("events.out.tfevents.*"))
    missing = next((name for name in ("mlflow", "wandb") if __import__("importlib.util").util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("mlflow and wandb are both installed")
    with pytest.raises(DyheadError, match=f"needs the {missing} package: pip install {missing}"):
        train_from_files(recipe, tmp_path / "run2", None, [f'train.log_with=["{missing}"]'])
    assert not (tmp_path / "run2").exists()


def test_batches_are_grouped_by_aspect_ratio_and_stay_reproducible():
    groups = [i % 3 == 0 for i in range(60)]  # a third portrait
    groups = [int(g) for g in groups]
    a = EpochSampler(60, 4, seed=3, epoch=1, rank=0, world=2, groups=groups)
    b = EpochSampler(60, 4, seed=3, epoch=1, rank=1, world=2, groups=groups)
    assert len(a) == len(b) == 30 // 4  # every process the same number of batches, as without grouping
    for sampler in (a, b):
        mixed = [batch for batch in sampler if len({groups[i] for i in batch}) > 1]
        assert len(mixed) <= 1 and all(len(batch) == 4 for batch in sampler)
    assert not {i for batch in a for i in batch} & {i for batch in b for i in batch}
    assert list(EpochSampler(60, 4, seed=3, epoch=1, rank=0, world=2, skip=2, groups=groups)) == list(a)[2:]
    ungrouped = EpochSampler(60, 4, seed=3, epoch=1, rank=0, world=2)
    assert sum(len({groups[i] for i in batch}) > 1 for batch in ungrouped) > 1


def test_shard_batches_are_the_single_process_batches_split():
    one = list(ShardBatches(10, 3))
    two = list(ShardBatches(10, 3, 0, 2)) + list(ShardBatches(10, 3, 1, 2))
    assert sorted(map(tuple, two)) == sorted(map(tuple, one)) and one[-1] == [9]


def test_shard_batches_by_padded_size_hold_one_size_each_and_every_image_once():
    sizes = ["a", "b", "a", "a", "b", "c", "a", "b", None, "a"]  # a key per image (its padded size)
    one = list(ShardBatches(10, 3, groups=sizes))
    assert one == [[0, 2, 3], [1, 4, 7], [6, 9], [5], [8]]  # full batches as they fill, then each rest
    two = list(ShardBatches(10, 3, 0, 2, sizes)) + list(ShardBatches(10, 3, 1, 2, sizes))
    assert sorted(map(tuple, two)) == sorted(map(tuple, one))


def test_alone_groups_and_padded_sizes():
    assert padded_size((800, 1067), 128) == (896, 1152) and padded_size((800, 1067), 1) == (800, 1067)
    groups = alone_groups([(800, 1067), (800, 1199), (790, 1100), (1333, 800)], 128)
    assert groups == [([0, 2], (896, 1152)), ([1], (896, 1280)), ([3], (1408, 896))]


SHARDED_EVAL = """
import json, sys, torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from dyhead_cli.data.coco import build_dataset
from dyhead_cli.engine.distributed import destroy_process_group_at_exit
from dyhead_cli.engine.evaluate import coco_evaluate, predict_shard
from dyhead_cli.engine.inference import load_detector
torch.set_num_threads(1)
acc = Accelerator(cpu=True)
destroy_process_group_at_exit()  # as engine.train does: no abort at exit
det = load_detector(sys.argv[1])
data = build_dataset(det.recipe.data, "val")
results = predict_shard(det.model, data, det.recipe, acc.device, acc.process_index, acc.num_processes)
everything = gather_object(results) if acc.num_processes > 1 else results
if acc.is_main_process:
    m = coco_evaluate(data.coco, everything)
    json.dump({"AP": m["AP"], "AP50": m["AP50"], "stats": m["stats"], "n": len(everything), "mine": len(results)}, open(sys.argv[2], "w"))
"""


def test_two_process_evaluation_equals_one_process(tmp_path, run):
    script = tmp_path / "sharded_eval.py"
    script.write_text(SHARDED_EVAL)
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            str(script),
            str(run["weights"]),
            str(out),
        ]
        result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=run["root"])
        assert result.returncode == 0, result.stderr[-3000:]
        outs[n] = json.loads(out.read_text())
    assert outs[2]["n"] == outs[1]["n"] > 0 and outs[2]["mine"] < outs[2]["n"]  # rank 0 ran only its share
    assert outs[2]["stats"] == pytest.approx(outs[1]["stats"], nan_ok=True) and outs[1]["AP"] > 0


def test_a_torn_last_line_is_cut_before_a_resumed_run_appends(tmp_path):
    # a run killed mid-write leaves half a record; appending after it made metrics.jsonl invalid JSONL
    from dyhead_cli.engine.run_log import MetricsLog, read_events

    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n{"event": "train", "step": ')
    (tmp_path / "metrics.csv").write_text("event,step,epoch,loss\ntrain,1,0,2.5\ntrain,2,0")
    log = MetricsLog(tmp_path, enabled=True)
    log.write("resume", step=1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["train", "resume"]  # every line whole
    assert [e["step"] for e in read_events(tmp_path / "metrics.jsonl")] == [1, 1]
    assert (tmp_path / "metrics.csv").read_text() == "event,step,epoch,loss\ntrain,1,0,2.5\n"
    MetricsLog(tmp_path, enabled=True)  # whole files are left as they are
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_rewind_drops_the_progress_logged_past_the_checkpoint(tmp_path):
    """A resume from step 3 of a run that logged up to step 5 (then was killed, or stopped on a NaN):
    steps 4-5 are trained again and must appear once, in metrics.jsonl and metrics.csv; the error
    record of the lost part stays."""
    from dyhead_cli.engine.run_log import MetricsLog

    log = MetricsLog(tmp_path, True)
    for step in range(1, 6):
        log.write("train", step=step, epoch=0, loss=float(step), lr=0.1)
        if step == 3:
            log.write("checkpoint", step=3, epoch=0, path="last.safetensors")
            log.write("eval", step=3, epoch=0, AP=1.0)
    log.write("error", step=5, epoch=0, message="non-finite loss", checkpoint_step=3)
    MetricsLog(tmp_path, True).rewind(3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in rows] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("checkpoint", 3),
        ("eval", 3),
        ("error", 5),
    ]
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:2] == ["event", "step"] and [r[1] for r in table[1:]] == ["1", "2", "3", "3"]
