"""One GPU check of dyhead, in under 5 minutes on one CUDA GPU; a summary table at the end, non-zero exit on failure.

(The last run of this default command, on an H100 on 2026-11-27, took 4 min 22 s: the two pytest runs 89
and 137 s side by side with the trainings (66 and 131 s), the tower 40 s, each benchmark 18-21 s;
benchmarks/results/h100-default/summary.json. With ``--sweep --profile --apply-tower-choice --tower-seconds
130 --budget-s 450`` the tower takes 96 s and the whole check 5 min 10 s: h100-inline/summary.json.)

On the device machine (Python 3.12 with torch; albumentations and pycocotools carried as wheels in .whl/):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

The wheels (the device image has torch, torchvision, timm, accelerate, typer, rich, safetensors, opencv but
not these; 8 MB): albumentations, albucore, stringzilla, simsimd, pydantic, pydantic_core, annotated-types,
typing-inspection and pycocotools, at the versions installed here, fetched with ``python3 -m pip download
--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION`` (``.whl/`` in
``.git/info/exclude``, carried to the device with the tree).

What it runs, in order, each step a subprocess with its own timeout (a hung step cannot eat the budget) and
all under one overall budget (``--budget-s``; a step that no longer fits is skipped, which counts as failed).
Steps 1-3 check behaviour and share the GPU (pytest runs alongside 2-3); steps 4 and 6 time things and run alone:

  1. ``pytest -m gpu`` (tests/test_gpu.py and the other gpu-marked tests), as two runs side by side: the
     tests of a CLI-trained run (train, then predict on CUDA / CPU / --half and eval at once) and the rest;
  2. the synthetic quickstart data (``data synth``, 200 train / 50 val, 128 px, --colour-by-class), then a
     short bf16 (in the background) and a short fp16 training of ``recipes/quickstart.toml`` on it through
     ``accelerate launch --num_processes 1 --mixed_precision ...`` (finite logged losses, an AP at the end);
  3. ``dyhead predict --half`` with the fp16 run's checkpoint on the synthetic validation set (AP by COCOeval);
  4. ``benchmarks/gpu_tower.py``: the DyHead tower's implementations on CUDA (torchvision's op per conv,
     grid_sample + GEMM, the fused Triton conv eager and as CUDA graphs, with either block end; with
     ``--sweep`` also the fused kernel's tiles and methods, which needs ``--tower-seconds 130 --budget-s
     450``; with ``--profile`` the fused tower's kernels by GPU time);
  5. with ``--apply-tower-choice``: ``benchmarks/tower_choice.py --write`` sets the fastest tiles, method
     (also those of a batch of one image) and block end found in step 4 in this tree's sources (the
     device's copy), so that step 6 times them;
  6. ``dyhead benchmark --gpu --compare`` at 800x1333, batch 1 and 8, in bf16, fp32 and fp16, and bf16 with
     ``--impl reference``.

Writes into ``--out`` (at most 8 files, so that all of them come back from the device machine): summary.json
(every step: command, status, seconds, figures; the benchmark, tower and training metrics inlined),
gpu_check.log (every step's full output), tower.json and bench_{fp32,bf16,fp16}.json. Scratch (data, runs)
goes to ``--work``. Without a CUDA device it says so in one line and exits 0; ``--dry-run`` prints the
commands it would run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-m", "dyhead_cli.cli"]
PRECISIONS = ("bf16", "fp32", "fp16")  # bf16 first: the goal is measured there
CLI_TESTS = "checkpoint_written_on_cuda or predict_and_eval_on_cuda"  # tests/test_gpu.py's trained-run tests
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".whl/*.whl && export PYTHONPATH=/tmp/site:$PWD"
)


@dataclass
class Step:
    """One command: its name, argv, timeout, and what to read from its output and files once it ran."""

    name: str
    cmd: list[str]
    timeout_s: float
    check: Callable[[Step, str], dict[str, Any]] = lambda step, out: {}
    needs: str | None = None  # a step that must have passed first
    background: bool = False  # runs alongside the next steps (not timings); waited for before a timing step
    timing: bool = False  # measures speed: runs alone on the GPU
    status: str = "not run"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class Failed(Exception):
    """A step ran but its output does not show what it must (the message says what)."""


# ----------------------------------------------------------------------------------------------------
# reading results


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Failed(f"cannot read {path.name}: {e}") from None


def check_pytest(step: Step, out: str) -> dict[str, Any]:
    tail = [line for line in out.splitlines() if line.strip()][-1:] or [""]
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped", "deselected")}
    for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", tail[0]):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    if not counts["passed"]:
        raise Failed(f"no test passed: {tail[0].strip()}")
    return {k: v for k, v in counts.items() if v} | {"line": tail[0].strip("= ")}


def check_training(run_dir: Path) -> Callable[[Step, str], dict[str, Any]]:
    def check(step: Step, out: str) -> dict[str, Any]:
        path = run_dir / "metrics.jsonl"
        try:
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise Failed(f"no metrics.jsonl: {e}") from None
        losses = [e["loss"] for e in events if e.get("event") == "train"]
        evals = [e for e in events if e.get("event") == "eval"]
        if not losses or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
            raise Failed(f"losses missing or not finite: {losses[:5]}...")
        if not evals or evals[-1].get("AP") is None or not math.isfinite(evals[-1]["AP"]):
            raise Failed("no AP at the end of training")
        speeds = [e["images_per_s"] for e in events if e.get("event") == "train" and "images_per_s" in e]
        last = evals[-1]
        return {
            "steps": last.get("step"),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "AP": last["AP"],
            "AP50": last.get("AP50"),
            "images_per_s": max(speeds[1:] or speeds or [0.0]),
            "checkpoint": (run_dir / "last.safetensors").is_file(),
        }

    return check


def check_predict(preds: Path, ann: Path) -> Callable[[Step, str], dict[str, Any]]:
    def check(step: Step, out: str) -> dict[str, Any]:
        rows = read_json(preds)
        if not rows:
            raise Failed("no detections")
        bad = [r for r in rows if not all(math.isfinite(v) for v in [r["score"], *r["bbox"]])]
        if bad:
            raise Failed(f"{len(bad)} detections with non-finite numbers")
        figures: dict[str, Any] = {"detections": len(rows)}
        try:
            import contextlib
            import io

            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            with contextlib.redirect_stdout(io.StringIO()):
                gt = COCO(str(ann))
                ev = COCOeval(gt, gt.loadRes(rows), "bbox")
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            figures.update(AP=round(float(ev.stats[0]) * 100, 2), AP50=round(float(ev.stats[1]) * 100, 2))
        except ImportError:
            figures["AP"] = None
        return figures

    return check


def check_tower(path: Path) -> Callable[[Step, str], dict[str, Any]]:
    def check(step: Step, out: str) -> dict[str, Any]:
        report = read_json(path)
        strict = {k: v["max_abs_diff_vs_reference"] for k, v in report.get("fp32_strict", {}).items()}
        bad = {k: v for k, v in strict.items() if not v < 1e-3 * max(1.0, report["fp32_strict"][k]["max_abs_reference"])}
        if bad:
            raise Failed(f"a tower path differs from the reference in float32 (TF32 off): {bad}")
        fastest = {
            f"{f['precision']} b{f['batch']}": f"{f['variant']} {f['median_ms']:.1f} ms "
            f"(x{f['speedup_vs_reference'] or float('nan'):.2f})"
            for f in report.get("fastest", [])
        }
        return {
            "fp32_max_abs_diff": strict,
            "fastest": fastest,
            "errors": report.get("errors", []),
            "skipped": report.get("skipped", []),
        }

    return check


def check_choice(step: Step, out: str) -> dict[str, Any]:
    return {"choice": [line.removeprefix("tower_choice: ") for line in out.splitlines() if line.startswith("tower_choice:")]}


def check_benchmark(path: Path) -> Callable[[Step, str], dict[str, Any]]:
    def check(step: Step, out: str) -> dict[str, Any]:
        report = read_json(path)
        figures: dict[str, Any] = {"gpu": report["machine"].get("gpu"), "driver": report["machine"].get("driver")}
        for r in report["results"]:
            b = r["batch_size"]
            figures[f"{r['key']} b{b}"] = {
                "p50_ms": round(r["latency_ms"]["p50"], 2),
                "p90_ms": round(r["latency_ms"]["p90"], 2),
                "images_per_s": round(r["images_per_s"], 1),
                "peak_mb": round(r["peak_memory_bytes"] / 2**20),
                **({"dyhead_share": round(r["dyhead_share"], 3)} if "dyhead_share" in r else {}),
            }
        return figures

    return check


# ----------------------------------------------------------------------------------------------------
# the plan


def plan(out: Path, work: Path, args: argparse.Namespace) -> list[Step]:
    data = work / "data"
    ann_val = data / "annotations" / "val.json"
    data_sets = [
        f"data.train_images={data / 'train'}",
        f"data.train_ann={data / 'annotations' / 'train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_ann={ann_val}",
        "data.synthetic=false",
        f"data.num_workers={args.workers}",
    ]
    pytest = [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--durations", "8", "tests", "-k"]
    steps = [
        # 138 s alone on an H100 machine, 96 s of it in the CLI tests (train, then predict x 3 and eval, which
        # now run at once): those and the others as two steps alongside each other and the trainings
        Step("pytest -m gpu (CLI)", [*pytest, CLI_TESTS], 300, check_pytest, background=True),
        Step("pytest -m gpu (others)", [*pytest, f"not ({CLI_TESTS})"], 300, check_pytest, background=True),
        Step(
            "data synth",
            [
                *CLI,
                "data",
                "synth",
                str(data),
                "--num-train",
                "200",
                "--num-val",
                "50",
                "--image-size",
                "128",
                "--colour-by-class",
            ],
            60,
        ),
    ]
    # The quickstart's data and step budget (750 steps of 16 images) on the GPU, fp32 as the recipes say (e.g.
    # Faster R-CNN + DyHead for the README's quickstart table): the data, then the training, alongside pytest.
    qs_data = work / "quickstart_data"
    qs_sets = [
        f"data.train_images={qs_data / 'train'}",
        f"data.train_ann={qs_data / 'annotations' / 'train.json'}",
        f"data.val_images={qs_data / 'val'}",
        f"data.val_ann={qs_data / 'annotations' / 'val.json'}",
        "data.synthetic=false",
        f"data.num_workers={max(args.workers, 6)}",
        "train.device=auto",
    ]
    synth = [
        *CLI,
        "data",
        "synth",
        str(qs_data),
        "--num-train",
        "2000",
        "--num-val",
        "100",
        "--image-size",
        "128",
        "--colour-by-class",
        "--force",
    ]
    for name in args.quickstarts:
        run = work / f"run_{name}"
        train = [*CLI, "train", str(ROOT / "recipes" / f"{name}.toml"), "--out", str(run), "--force"]
        for s_ in qs_sets:
            train += ["--set", s_]
        script = f"test -f {shlex.quote(str(qs_data / 'annotations' / 'val.json'))} || {shlex.join(synth)}; {shlex.join(train)}"
        steps.append(Step(f"train {name}", ["bash", "-c", script], args.quickstart_timeout, check_training(run), background=True))
    # bf16 trains alongside (with pytest) while fp16 trains in front, then predict uses fp16's checkpoint
    for precision in ("bf16", "fp16"):
        run = work / f"run_{precision}"
        sets = [
            *data_sets,
            "train.device=auto",
            f"train.mixed_precision={precision}",
            f"train.max_steps={args.train_steps}",
            "train.epochs=1000",
            "train.eval_every=0",
            "train.log_every=10",
        ]
        cmd = [
            PY,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            precision,
            "--dynamo_backend",
            "no",
            "-m",
            "dyhead_cli.cli",
            "train",
            str(ROOT / "recipes" / "quickstart.toml"),
            "--out",
            str(run),
            "--force",
        ]
        for s in sets:
            cmd += ["--set", s]
        steps.append(
            Step(f"train {precision}", cmd, 150, check_training(run), needs="data synth", background=precision == "bf16")
        )
    preds = work / "preds_half.json"
    steps.append(
        Step(
            "predict --half",
            [
                *CLI,
                "predict",
                str(ann_val),
                "--images",
                str(data / "val"),
                "--weights",
                str(work / "run_fp16" / "last.safetensors"),
                "--device",
                "cuda",
                "--half",
                "--set",
                "model.head_options.score_thresh=0.01",
                "--out",
                str(preds),
            ],
            60,
            check_predict(preds, ann_val),
            needs="train fp16",
        )
    )
    steps.append(
        Step(
            "gpu_tower",
            [
                PY,
                str(ROOT / "benchmarks" / "gpu_tower.py"),
                "--json",
                str(out / "tower.json"),
                "--max-seconds",
                str(args.tower_seconds),
                "--budget-s",
                "0.6",
                *(["--sweep"] if args.sweep else []),
                *(["--profile"] if args.profile else []),
                *(["--variants", args.tower_variants] if args.tower_variants != "all" else []),
            ],
            args.tower_seconds + 45,
            check_tower(out / "tower.json"),
            timing=True,
        )
    )
    if args.apply_tower_choice:
        # the sweep's winners into this tree's sources, so that the benchmarks below time them (tower_choice.py)
        steps.append(
            Step(
                "tower choice",
                [PY, str(ROOT / "benchmarks" / "tower_choice.py"), str(out / "tower.json"), "--write"],
                30,
                check_choice,
            )
        )
    for precision in PRECISIONS:
        path = out / f"bench_{precision}.json"
        steps.append(
            Step(
                f"benchmark {precision}",
                [
                    *CLI,
                    "benchmark",
                    "--gpu",
                    "--compare",
                    "--size",
                    "800x1333",
                    "--batch-sizes",
                    "1,8",
                    "--precision",
                    precision,
                    "--iters",
                    str(args.iters),
                    "--warmup",
                    "3",
                    "--json",
                    str(path),
                ],
                120,
                check_benchmark(path),
                timing=True,
            )
        )
    # the per-conv torchvision path, for the detector-level comparison with our CUDA path
    path = out / "bench_bf16_reference.json"
    steps.append(
        Step(
            "benchmark bf16 reference",
            [
                *CLI,
                "benchmark",
                "--gpu",
                "--compare",
                "--size",
                "800x1333",
                "--batch-sizes",
                "1,8",
                "--precision",
                "bf16",
                "--impl",
                "reference",
                "--iters",
                str(args.iters),
                "--warmup",
                "3",
                "--json",
                str(path),
            ],
            120,
            check_benchmark(path),
            timing=True,
        )
    )
    return steps


# ----------------------------------------------------------------------------------------------------
# running


@dataclass
class Running:
    """A started step: its process (a group of its own), output file and deadline."""

    step: Step
    proc: subprocess.Popen
    output: Path
    started: float
    deadline: float


def start_step(step: Step, env: dict[str, str], timeout: float, scratch: Path) -> Running:
    output = scratch / f"{re.sub(r'[^A-Za-z0-9]+', '_', step.name)}.out"
    with open(output, "w") as f:
        proc = subprocess.Popen(
            step.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    now = time.perf_counter()
    return Running(step, proc, output, now, now + timeout)


def finish_step(r: Running, log) -> str:
    """Wait until the step ends or its deadline (then kill its whole process group); log and return its output."""
    step = r.step
    try:
        r.proc.wait(timeout=max(0.0, r.deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        os.killpg(r.proc.pid, signal.SIGKILL)
        r.proc.wait()
        step.status, step.note = "TIMEOUT", f"killed after {r.deadline - r.started:.0f} s"
    else:
        step.status = "ok" if r.proc.returncode == 0 else "FAIL"
    step.seconds = time.perf_counter() - r.started
    out = r.output.read_text(errors="replace")
    if step.status == "FAIL":
        last = [line for line in out.splitlines() if line.strip()][-1:] or [""]
        step.note = f"exit {r.proc.returncode}: {last[0][:160]}"
    log.write(f"\n===== {step.name}: {shlex.join(step.cmd)}\n{out}\n===== {step.name}: {step.status} {step.note}\n")
    log.flush()
    return out


def run_step(step: Step, log, env: dict[str, str], timeout: float, scratch: Path) -> str:
    """Run one step to its end (or its timeout); returns its output (also written to the log)."""
    return finish_step(start_step(step, env, timeout, scratch), log)


def conclude(step: Step, output: str) -> None:
    """Read the figures of a step that exited 0; a missing result makes it FAIL."""
    if step.status != "ok":
        return
    try:
        step.figures = step.check(step, output)
    except Failed as e:
        step.status, step.note = "FAIL", str(e)
    except Exception as e:  # noqa: BLE001 - a reader bug must not hide the other steps
        step.status, step.note = "FAIL", f"reading the results: {type(e).__name__}: {e}"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    for name in ("torchvision", "timm", "accelerate", "albumentations", "pycocotools"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def summary_table(steps: list[Step]) -> str:
    rows = [("step", "status", "s", "figures")]
    for s in steps:
        rows.append((s.name, s.status, f"{s.seconds:.0f}", short_figures(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
    return "\n".join(lines)


def short_figures(s: Step) -> str:
    f = s.figures
    if s.note and s.status != "ok":
        return s.note
    if s.name.startswith("pytest"):
        return f.get("line", "")
    if s.name.startswith("train"):
        return (
            (
                f"loss {f['first_loss']:.3f} -> {f['last_loss']:.3f}, AP {f['AP']:.1f} (AP50 {f['AP50']:.1f}) after "
                f"{f['steps']} steps, {f['images_per_s']:.0f} img/s"
            )
            if f
            else ""
        )
    if s.name.startswith("predict"):
        return f"{f.get('detections')} detections, AP {f.get('AP')}" if f else ""
    if s.name == "gpu_tower" and f:
        return "; ".join(f"{k}: {v}" for k, v in f["fastest"].items()) + (f"; {len(f['errors'])} errors" if f["errors"] else "")
    if s.name.startswith("benchmark") and f:
        parts = []
        for key in ("dyhead b1", "dyhead b8", "no_dyhead b8", "torchvision_fcos b8"):
            if key in f:
                x = f[key]
                share = f", DyHead {x['dyhead_share']:.0%}" if "dyhead_share" in x else ""
                parts.append(f"{key} {x['p50_ms']} ms {x['images_per_s']} img/s {x['peak_mb']} MB{share}")
        return "; ".join(parts)
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="summary.json, gpu_check.log, JSON reports")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_check_work"), help="scratch: data and training runs")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the steps that no longer fit in this")
    p.add_argument("--train-steps", type=int, default=150, help="optimizer steps of each quickstart training")
    p.add_argument(
        "--quickstarts",
        nargs="*",
        default=[],
        metavar="RECIPE",
        help="also train these recipes (e.g. quickstart faster_rcnn_quickstart) on the quickstart's full data "
        "and step budget, alongside pytest",
    )
    p.add_argument("--quickstart-timeout", type=float, default=300.0, help="seconds for each --quickstarts data + training")
    p.add_argument("--iters", type=int, default=10, help="timed calls per model and batch size in dyhead benchmark")
    p.add_argument("--tower-seconds", type=float, default=60.0, help="gpu_tower.py's --max-seconds")
    p.add_argument("--sweep", action="store_true", help="gpu_tower.py --sweep: also time the fused kernel's tile configurations")
    p.add_argument("--profile", action="store_true", help="gpu_tower.py --profile: the fused tower's kernels by GPU time")
    p.add_argument(
        "--tower-variants",
        default="reference,sampled-graph,fused-graph,fused-folded-graph,fused-inline-graph",
        help="gpu_tower.py --variants (default: torchvision's op and the CUDA-graph variants, what dyhead runs; "
        "'all': every variant that applies)",
    )
    p.add_argument(
        "--apply-tower-choice",
        action="store_true",
        help="after the tower step, write the sweep's fastest tiles/method/epilogue into this tree's sources "
        "(benchmarks/tower_choice.py --write), so the detector benchmarks run them",
    )
    p.add_argument("--workers", type=int, default=6, help="data loader workers for training")
    p.add_argument("--only", default="", help="comma-separated step name prefixes to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    out, work = args.out.resolve(), args.work.resolve()
    steps = plan(out, work, args)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        steps = [s for s in steps if any(s.name.startswith(w) for w in wanted)]
    if args.dry_run:
        for s in steps:
            print(f"# {s.name} (timeout {s.timeout_s:.0f} s{', after ' + s.needs if s.needs else ''})\n{shlex.join(s.cmd)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check")
        return 0
    missing = [m for m in ("albumentations", "pycocotools") if not _importable(m)]
    if missing:
        print(f"gpu_check: {', '.join(missing)} not importable; install the carried wheels first: {INSTALL}")
        return 1

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p),
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    info = machine()
    print(f"gpu_check on {info['gpu']} ({info['nvidia_smi']}), torch {info['torch']}, CUDA {info['cuda']}", flush=True)
    passed: set[str] = set()
    background: list[Running] = []

    def report(step: Step) -> None:
        if step.status == "ok":
            passed.add(step.name)
        print(f"{step.name}: {step.status} ({step.seconds:.0f} s) {step.note}", flush=True)

    def wait_background() -> None:
        while background:
            r = background.pop(0)
            conclude(r.step, finish_step(r, log))
            report(r.step)

    with open(out / "gpu_check.log", "w") as log:
        for step in steps:
            if step.timing:
                wait_background()  # timings run alone on the GPU
            left = args.budget_s - (time.perf_counter() - start)
            if step.needs and step.needs not in passed and any(s.name == step.needs for s in steps):
                step.status, step.note = "skipped", f"needs '{step.needs}'"
            elif left < 15:
                step.status, step.note = "skipped", f"budget of {args.budget_s:.0f} s spent"
            elif step.background:
                print(f"{step.name}: started (alongside the next steps)", flush=True)
                background.append(start_step(step, env, min(step.timeout_s, left), work))
                continue
            else:
                conclude(step, run_step(step, log, env, min(step.timeout_s, left), work))
            report(step)
        wait_background()

    total = time.perf_counter() - start
    ok = all(s.status == "ok" for s in steps)
    names = ["tower.json", *(f"bench_{q}.json" for q in PRECISIONS), "bench_bf16_reference.json"]
    reports = {name: _maybe_json(out / name) for name in names}
    trainings = {p_: _maybe_lines(work / f"run_{p_}" / "metrics.jsonl") for p_ in ("fp16", "bf16")}
    summary = {
        "ok": ok,
        "seconds": round(total, 1),
        "machine": info,
        "install": INSTALL,
        "steps": [
            {
                "name": s.name,
                "command": shlex.join(s.cmd),
                "status": s.status,
                "seconds": round(s.seconds, 1),
                "note": s.note,
                "figures": s.figures,
            }
            for s in steps
        ],
        "reports": reports,
        "training_metrics": trainings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print()
    print(summary_table(steps))
    print(
        f"\ngpu_check: {'all passed' if ok else 'FAILED'} in {total:.0f} s; details in {out / 'summary.json'} and "
        f"{out / 'gpu_check.log'}"
    )
    return 0 if ok else 1


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def _maybe_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _maybe_lines(path: Path) -> list[Any] | None:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
