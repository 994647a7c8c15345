"""CUDA checks (``pytest -m gpu``; conftest skips them without a CUDA device).

- an fp16 and a bf16 training step through Accelerate (fp16 with its loss scaler): finite losses and
  gradients, and the optimizer really steps;
- the DyHead tower on CUDA equals the CPU reference to float32 rounding in all three offset modes, through
  torchvision's CUDA op, the fused Triton convs (impl "fast" without autograd) and the gather + GEMM path
  (``forward_fast`` called on CUDA tensors), with gradients, channels-last outputs and the low-precision
  gather; the fused conv against torchvision's op in fp32 / bf16 / fp16; CUDA-graph replays equal eager;
- the CLI on CUDA: train, predict (fp32 and --half) and eval agree with each other and with the CPU, and a
  checkpoint written on CUDA loads on CPU;
- ``dyhead benchmark --gpu`` names the GPU and driver and reports images/s, peak memory and the tower's share.

The CLI runs as ``python -m dyhead_cli.cli`` with this checkout on PYTHONPATH (no install needed).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers_detection import tiny_config
from torchvision.ops import box_iou

from dyhead_cli.models.build import build_model
from dyhead_cli.models.dyhead import DyHead
from dyhead_cli.models.dyhead_cuda import EPILOGUES
from dyhead_cli.recipe import load_recipe

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
MODES = ("official", "mmdet", "aligned")
# P3..P7 of a 128x160 image, plus odd sizes where the "high" conv's offsets must be fitted
LEVELS = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
ODD_LEVELS = [(15, 21), (8, 11), (4, 6), (2, 3)]


@pytest.fixture
def strict_fp32():
    """TF32 off (cuDNN convs and matmuls), so CUDA float32 matches the CPU to float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one process-wide state that refuses a second mixed-precision setting: reset it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m dyhead_cli.cli ARGS`` with this checkout first on PYTHONPATH; fails the test on a non-zero exit."""
    return run_clis([args], timeout)[0]


def run_clis(calls: list[tuple], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Several CLI calls at once (each process starts CUDA and builds its model: run together, they overlap),
    each checked as ``run_cli`` checks one; outputs go through files, so no full pipe can block a process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    started = []
    for args in calls:
        cmd = [sys.executable, "-m", "dyhead_cli.cli", *map(str, args)]
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        started.append((cmd, subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT), out, err))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for cmd, proc, out, err in started:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
    finally:
        for _, proc, out, err in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close(), err.close()
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return results


# ----------------------------------------------------------------------------------------------------
# mixed-precision training steps


def random_batch(device: torch.device, n: int = 2, size: tuple[int, int] = (128, 160), seed: int = 0):
    """Images (n, 3, H, W) in 0..255 and 2 boxes per image (x1, y1, x2, y2 pixels), labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *size, generator=g) * 255
    targets = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * torch.tensor([size[1] - 48, size[0] - 48])
        wh = 16 + torch.rand(2, 2, generator=g) * 32
        targets.append(
            {"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(0, 3, (2,), generator=g).to(device)}
        )
    return images.to(device), [size] * n, targets


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_steps(precision, fresh_accelerate):
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = build_model(tiny_config("atss", num_blocks=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator(mixed_precision=precision)
    assert accelerator.device.type == "cuda"
    model, optimizer = accelerator.prepare(model, optimizer)
    assert (accelerator.scaler is not None) == (precision == "fp16"), "fp16 scales the loss, bf16 does not"
    before = [p.detach().clone() for p in model.parameters()]
    stepped = 0
    for step in range(6):
        images, sizes, targets = random_batch(accelerator.device, seed=step)
        with accelerator.autocast():
            losses = model(images, sizes, targets)
        assert losses and all(torch.isfinite(v.float()) for v in losses.values()), losses
        accelerator.backward(sum(v.float() for v in losses.values()))
        accelerator.unscale_gradients()  # fp16: back to true scale; an overflow here makes the step a no-op
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) > 10
        finite = all(torch.isfinite(g).all() for g in grads)
        assert finite or precision == "fp16", "bf16 has fp32's range: its gradients never overflow"
        optimizer.step()
        assert accelerator.optimizer_step_was_skipped == (not finite)
        stepped += finite
        optimizer.zero_grad(set_to_none=True)
    assert stepped >= 3, "the loss scale should settle within a few steps"
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(not torch.equal(a, b) for a, b in zip(after, before)) > len(before) // 2


# ----------------------------------------------------------------------------------------------------
# the DyHead tower on CUDA vs the CPU reference


def make_tower(mode: str, channels: int = 32, blocks: int = 2) -> DyHead:
    torch.manual_seed(0)
    tower = DyHead(channels, blocks, offset_mode=mode).eval()
    for block in tower.blocks:  # move sampling off the grid, as trained weights do
        torch.nn.init.normal_(block.offset.weight, 0.0, 0.05)
    return tower


def features(levels, batch: int = 2, channels: int = 32, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, h, w, generator=g).to(device) for h, w in levels]


def run_fast(tower: DyHead, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gather + GEMM path on whatever device the features are (``forward`` dispatches it on CPU only)."""
    for block in tower.blocks:
        feats = block.forward_fast(feats)
    return feats


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x.detach().float().cpu() - y.detach().float().cpu()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("levels", [LEVELS, ODD_LEVELS], ids=["p3-p7", "odd"])
def test_tower_on_cuda_equals_cpu_reference(mode, levels, strict_fp32):
    tower = make_tower(mode)
    with torch.no_grad():
        want = tower.set_impl("reference")(features(levels))
        scale = max(1.0, max(w.abs().max().item() for w in want))
        tower.cuda()
        feats = features(levels, device="cuda")
        for impl in ("reference", "fast"):  # whatever "fast" dispatches to on CUDA
            got = tower.set_impl(impl)(feats)
            assert got[0].is_cuda and max_diff(got, want) < 1e-4 * scale, impl
        got = run_fast(tower, feats)
        assert got[0].is_cuda and max_diff(got, want) < 1e-4 * scale, "gather + GEMM on CUDA"
        for block in tower.blocks:
            block.fast_channels_last = True
        got = run_fast(tower, feats)
        assert max_diff(got, want) < 1e-4 * scale, "gather + GEMM with channels-last conv outputs"


@pytest.mark.parametrize("mode", MODES)
def test_fast_tower_gradients_on_cuda_match_torchvision(mode, strict_fp32):
    tower = make_tower(mode).cuda()
    grads = {}
    for name in ("reference", "fast"):
        leaves = [f.requires_grad_() for f in features(LEVELS, device="cuda")]
        tower.zero_grad(set_to_none=True)
        outs = tower.set_impl("reference")(leaves) if name == "reference" else run_fast(tower, leaves)
        g = torch.Generator().manual_seed(2)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).cuda() for o in outs])
        grads[name] = [x.grad for x in leaves] + [p.grad for p in tower.parameters()]
    for got, want in zip(grads["fast"], grads["reference"]):
        assert got is not None and want is not None
        assert (got - want).abs().max().item() < 1e-3 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_tower_low_precision_gather_under_autocast(dtype, strict_fp32):
    tower = make_tower("official").cuda()
    feats = features(LEVELS, device="cuda")
    with torch.no_grad():
        want = tower.set_impl("reference")(feats)
        got = {}
        for low in (False, True):
            for block in tower.blocks:
                block.fast_low_precision = low
            with torch.autocast("cuda", dtype=dtype):
                got[low] = run_fast(tower, feats)
    scale = max(w.abs().max().item() for w in want)
    for low, outs in got.items():
        assert all(torch.isfinite(o).all() for o in outs)
        assert max_diff(outs, want) < 0.05 * scale, f"fast_low_precision={low}"
    assert max_diff(got[True], got[False]) > 0, "the switch changes the gather's dtype"


@pytest.mark.parametrize("method", ["taps", "flat", "columns"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_triton_conv_on_cuda_matches_torchvision(dtype, method, strict_fp32, monkeypatch):
    from torchvision.ops import deform_conv2d

    from dyhead_cli.models import deform_triton
    from dyhead_cli.models.deform_triton import deform_conv3x3_triton, weight_rows

    monkeypatch.setitem(deform_triton.METHOD, dtype, method)
    monkeypatch.setitem(deform_triton.SINGLE, dtype, None)  # the method under test at batch 1 too
    if dtype == torch.float32 and method == "taps":  # the 9 unrolled taps with the large float32 tiles take
        monkeypatch.setitem(deform_triton.CONFIG, dtype, (32, 128, 32, 4, 2))  # ~40 s per compile on an H100
    monkeypatch.setattr(deform_triton, "COLUMN_BYTES", 8 << 20)  # "columns": several chunks at batch 2-3
    monkeypatch.setattr(deform_triton, "unavailable_reason", None)  # a method that fails cannot leak into others

    g = torch.Generator().manual_seed(0)
    for b, c, c_out, h, w, stride in [(2, 64, 256, 25, 42, 1), (1, 256, 256, 50, 84, 2), (3, 40, 24, 7, 11, 1)]:
        oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
        x = torch.randn(b, c, h, w, generator=g).to(dtype)
        offset = torch.randn(b, 18, oh, ow, generator=g) * 3
        mask = torch.rand(b, 9, oh, ow, generator=g)
        weight = (torch.randn(c_out, c, 3, 3, generator=g) / (3 * c**0.5)).to(dtype)
        bias = torch.randn(c_out, generator=g)
        want = deform_conv2d(x.float(), offset, weight.float(), bias, stride=stride, padding=1, mask=mask)
        x_cl = x.cuda().contiguous(memory_format=torch.channels_last)
        got = deform_conv3x3_triton(x_cl, offset.cuda(), mask.cuda(), weight_rows(weight.cuda(), dtype), bias.cuda(), stride)
        scale = want.abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # columns and output rounded to 8 / 11 mantissa bits
        assert got.dtype == dtype and (got.float().cpu() - want).abs().max().item() < tol * scale, (b, c, h, w, stride)
    assert deform_triton.unavailable_reason is None


def test_tower_cuda_graphs_replay_what_eager_computes():
    tower = make_tower("official").cuda()
    feats = features(LEVELS, device="cuda")
    other = [torch.randn_like(f) for f in feats]
    with torch.inference_mode():
        tower.cuda_graphs = False
        eager, eager_other = tower(feats), tower(other)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager_bf16 = tower(feats)
        tower.cuda_graphs = True
        outs = [tower(feats) for _ in range(3)]  # eager, capture + replay, replay
        assert tower.graphs.replays == 2 and len(tower.graphs.graphs) == 1
        assert max_diff(outs[1], eager) < 1e-6 and max_diff(outs[2], eager) < 1e-6
        assert max_diff(tower(other), eager_other) < 1e-6  # new inputs, not the captured ones
        assert outs[2][0].data_ptr() != tower(feats)[0].data_ptr()  # callers get their own tensors
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(2):
                got = tower(feats)
        assert len(tower.graphs.graphs) == 2 and max_diff(got, eager_bf16) < 1e-2
    tower.train()
    assert not tower.graphs.graphs


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("mode", MODES)
def test_each_epilogue_on_cuda_equals_reference(mode, epilogue, strict_fp32, monkeypatch):
    """The fused tower with each block end of dyhead_cuda.EPILOGUES against the reference tower on CUDA."""
    from dyhead_cli.models import dyhead_cuda

    monkeypatch.setattr(dyhead_cuda, "EPILOGUE", epilogue)
    tower = make_tower(mode).cuda()
    feats = features(ODD_LEVELS, device="cuda")
    with torch.no_grad():
        want = tower.set_impl("reference")(feats)
        got = tower.set_impl("fast")(feats)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = tower(feats)
    scale = max(1.0, max(w.abs().max().item() for w in want))
    assert max_diff(got, want) < 1e-4 * scale
    assert all(torch.isfinite(o).all() for o in got_bf16) and max_diff(got_bf16, want) < 0.05 * scale


def test_fused_tower_under_bf16_autocast_near_float32_reference(strict_fp32):
    tower = make_tower("official").cuda()
    feats = features(LEVELS, device="cuda")
    with torch.inference_mode():
        want = tower.set_impl("reference")(feats)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = tower.set_impl("fast")(feats)
    scale = max(w.abs().max().item() for w in want)
    assert all(torch.isfinite(o).all() for o in got)
    assert max_diff(got, want) < 0.05 * scale


# ----------------------------------------------------------------------------------------------------
# the CLI on CUDA: train, predict, eval; a CUDA checkpoint on CPU

RECIPE = """
name = "gpu-tiny"

[model]
head = "atss"

[model.backbone]
name = "test_resnet"

[model.fpn]
channels = 32

[model.dyhead]
num_blocks = 1

[model.head_options]
score_thresh = 0.01  # a briefly trained model scores low: keep enough detections for a non-zero AP

[data]
synthetic = true
train_images = "{root}/train"
train_ann = "{root}/annotations/train.json"
val_images = "{root}/val"
val_ann = "{root}/annotations/val.json"
synthetic_num_train = 32
synthetic_num_val = 8
synthetic_image_size = 128
synthetic_colour_by_class = true
min_sizes = [128]
max_size = 256
test_min_size = 128
num_workers = 0

[train]
epochs = 100
max_steps = 30
batch_size = 4
optimizer = "adamw"
lr = 0.003
warmup_steps = 5
log_every = 10
eval_every = 0
device = "auto"

[eval]
batch_size = 4
"""


def coco_ap(ann: Path, rows: list[dict]) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in rows]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]) * 100


def top_detections(rows: list[dict]) -> dict[int, dict]:
    best: dict[int, dict] = {}
    for r in rows:
        if r["image_id"] not in best or r["score"] > best[r["image_id"]]["score"]:
            best[r["image_id"]] = r
    return best


def xyxy(r: dict) -> torch.Tensor:
    x, y, w, h = r["bbox"]
    return torch.tensor([[x, y, x + w, y + h]])


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> dict[str, Path]:
    """The tiny recipe trained on CUDA through the CLI (it writes its synthetic data first)."""
    root = tmp_path_factory.mktemp("gpu_run")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(root=(root / "synthetic").as_posix()))
    run_cli("train", recipe, "--out", root / "run")
    return {
        "root": root,
        "run": root / "run",
        "weights": root / "run" / "last.safetensors",
        "val_ann": root / "synthetic" / "annotations" / "val.json",
        "val_images": root / "synthetic" / "val",
    }


def test_checkpoint_written_on_cuda_loads_on_cpu(cuda_run):
    from safetensors.torch import load_file

    state = load_file(str(cuda_run["weights"]), device="cpu")
    recipe = load_recipe(cuda_run["run"] / "recipe.toml")
    model = build_model(recipe.model)
    model.load_state_dict(state, strict=True)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    lines = [json.loads(x) for x in (cuda_run["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["event"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)  # logged and finite
    model.eval()
    images = torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        out = model(images, [(128, 128)])
    assert torch.isfinite(out[0]["boxes"]).all()


def test_predict_and_eval_on_cuda_agree_with_cpu(cuda_run, tmp_path):
    r = cuda_run
    devices = {"cuda": ["--device", "cuda"], "cpu": ["--device", "cpu"], "half": ["--device", "cuda", "--half"]}
    metrics = tmp_path / "metrics.json"
    run_clis(
        [
            *(
                (
                    "predict",
                    r["val_ann"],
                    "--weights",
                    r["weights"],
                    "--images",
                    r["val_images"],
                    "--out",
                    tmp_path / f"{name}.json",
                    *extra,
                )
                for name, extra in devices.items()
            ),
            ("eval", r["run"] / "recipe.toml", "--weights", r["weights"], "--json", metrics, "--set", "train.device=auto"),
        ]
    )
    preds = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in devices}
    for name, rows in preds.items():
        assert rows, f"{name}: no detections"
        assert all(0 <= p["score"] <= 1 and all(math.isfinite(v) for v in p["bbox"]) for p in rows)
    eval_ap = json.loads(metrics.read_text())["AP"]
    ap = {name: coco_ap(r["val_ann"], rows) for name, rows in preds.items()}
    assert ap["cuda"] == pytest.approx(eval_ap, abs=1e-3), "eval and predict on CUDA disagree"
    assert ap["cuda"] == pytest.approx(ap["cpu"], abs=3.0)
    assert ap["half"] == pytest.approx(ap["cuda"], abs=5.0)

    # each image's best CPU detection is among the CUDA ones (same class, box and score to rounding;
    # not necessarily the CUDA best, where two scores nearly tie)
    for image_id, b in top_detections(preds["cpu"]).items():
        same = [
            a
            for a in preds["cuda"]
            if a["image_id"] == image_id
            and a["category_id"] == b["category_id"]
            and abs(a["score"] - b["score"]) < 0.02
            and box_iou(xyxy(a), xyxy(b)).item() > 0.9
        ]
        assert same, f"image {image_id}: the CPU's best detection {b} is not found on CUDA"


def test_benchmark_gpu_report(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "benchmark",
        "--gpu",
        "--model",
        "test_resnet",
        "--size",
        "128x160",
        "--batch-sizes",
        "1,2",
        "--precision",
        "bf16",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
        out,
    )
    report = json.loads(out.read_text())
    m = report["machine"]
    assert m["gpu"] == torch.cuda.get_device_name() and m["cuda"] == torch.version.cuda and m["torch"] == torch.__version__
    assert m["driver"] and "DyHead share" in result.stdout
    assert report["settings"]["timer"] == "CUDA events" and report["settings"]["device"] == "cuda"
    rows = report["results"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert row["images_per_s"] == pytest.approx(row["batch_size"] * 1e3 / lat["p50"])
        assert 0 < row["peak_memory_bytes"] <= row["peak_memory_reserved_bytes"]
        assert 0 < row["dyhead_share"] < 1
