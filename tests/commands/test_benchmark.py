"""dyhead benchmark: report fields and their consistency, FLOPs by hand, --compare rows, one-line errors.

Timings are only checked for consistency with each other, never against a speed: performance goals
live in the benchmark itself, not in tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dyhead_cli.cli import app
from dyhead_cli.commands.benchmark.measure import (
    SAMPLING_FLOPS_PER_VALUE,
    Settings,
    Timing,
    build_detector,
    count_flops,
    first_call,
    measure,
    measure_interleaved,
    parse_batch_sizes,
    parse_size,
    run_benchmark,
    to_markdown,
)
from dyhead_cli.errors import DyheadError
from dyhead_cli.models.dyhead import DyHead
from dyhead_cli.recipe import ModelConfig

runner = CliRunner()
TINY_ARGS = ["--model", "test_resnet", "--size", "128x160", "--iters", "2", "--warmup", "1"]


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def dcn_flops(c_in: int, c_out: int, h: int, w: int) -> int:
    """One modulated 3x3 deformable conv by hand: the conv's multiply-adds, plus 8 FLOPs per sampled value."""
    return 2 * c_in * 9 * c_out * h * w + SAMPLING_FLOPS_PER_VALUE * 9 * c_in * h * w


def tower_dcn_flops(levels: list[tuple[int, int]], channels: int, blocks: int) -> int:
    """Per block and level l: mid at l's size, low (stride 2 on l-1) for l > 0, high at l+1's size for l < L-1."""
    total = 0
    for l, (h, w) in enumerate(levels):
        total += dcn_flops(channels, channels, h, w)
        if l > 0:
            ph, pw = levels[l - 1]
            total += dcn_flops(channels, channels, (ph - 1) // 2 + 1, (pw - 1) // 2 + 1)
        if l < len(levels) - 1:
            total += dcn_flops(channels, channels, *levels[l + 1])
    return total * blocks


@pytest.fixture(scope="module")
def compare_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "bench.json", out / "bench.md"
    result = runner.invoke(app, ["benchmark", *TINY_ARGS, "--compare", "--json", str(json_path), "--markdown", str(md_path)])
    assert result.exit_code == 0, result.output
    return json.loads(json_path.read_text()), md_path, result.output


def test_json_report_has_consistent_figures(compare_report):
    report, _, _ = compare_report
    assert {"command", "machine", "settings", "models", "results", "ratios", "notes"} <= set(report)
    assert isinstance(report["command"], str) and report["command"]
    machine = report["machine"]
    for key in ("cpu", "cpu_cores", "torch", "torchvision", "cuda", "gpu", "load_average_start"):
        assert key in machine
    assert machine["torch"] == torch.__version__
    s = report["settings"]
    assert s["size"] == [128, 160] and s["batch_sizes"] == [1] and s["iters"] == 2 and s["warmup"] == 1
    assert s["precision"] == "fp32" and s["device"] == "cpu" and s["impl"] == "fast"

    row = next(r for r in report["results"] if r["key"] == "dyhead")
    lat = row["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert len(row["times_ms"]) == 2
    assert row["images_per_s"] == pytest.approx(row["batch_size"] * 1e3 / lat["p50"])
    assert row["peak_memory_bytes"] > 0
    assert set(row["stages_ms"]) == {"backbone", "fpn", "dyhead", "head", "postprocess"}
    assert all(v >= 0 for v in row["stages_ms"].values())
    assert row["dyhead_share"] == pytest.approx(row["stages_ms"]["dyhead"] / sum(row["stages_ms"].values()))
    assert 0 < row["dyhead_share"] < 1 and s["timer"] == "time.perf_counter"

    model = report["models"]["dyhead"]
    cfg = ModelConfig()
    cfg.backbone.name = "test_resnet"
    assert model["params"] == sum(p.numel() for p in build_detector(cfg).parameters())
    flops = model["flops_per_image"]
    assert flops["total"] > 0 and flops["backbone"] > 0 and flops["fpn"] > 0 and flops["head"] > 0
    assert flops["total"] == sum(flops[k] for k in ("backbone", "fpn", "dyhead", "head", "postprocess"))
    levels = [tuple(x) for x in model["levels"]]
    assert levels == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert flops["dyhead_deformable"] == tower_dcn_flops(levels, 256, 6)
    assert flops["dyhead"] > flops["dyhead_deformable"]  # + offset convs, scale attention, DyReLU


def test_compare_adds_no_dyhead_and_torchvision_fcos(compare_report):
    report, _, output = compare_report
    assert [r["key"] for r in report["results"]] == ["dyhead", "no_dyhead", "torchvision_fcos"]
    models = report["models"]
    assert models["no_dyhead"]["config"]["dyhead"]["num_blocks"] == 0
    assert models["no_dyhead"]["config"]["head_options"]["num_convs"] == 4
    assert models["no_dyhead"]["flops_per_image"]["dyhead"] == 0
    assert models["no_dyhead"]["flops_per_image"]["head"] > models["dyhead"]["flops_per_image"]["head"]
    fcos = models["torchvision_fcos"]
    assert fcos["config"]["transform"] == {"min_size": 128, "max_size": 160}
    assert fcos["flops_per_image"]["total"] > 0 and fcos["params"] > 20e6
    fcos_row = next(r for r in report["results"] if r["key"] == "torchvision_fcos")
    assert fcos_row["latency_ms"]["p50"] > 0 and "stages_ms" not in fcos_row
    assert {x["vs"] for x in report["ratios"]} == {models["no_dyhead"]["name"], fcos["name"]}
    for x in report["ratios"]:
        other = next(r for r in report["results"] if r["model"] == x["vs"])
        main = next(r for r in report["results"] if r["key"] == "dyhead")
        assert x["ratio_p50"] == pytest.approx(main["latency_ms"]["p50"] / other["latency_ms"]["p50"])
    assert "FCOS-R50 (torchvision)" in output and "no DyHead" in output
    # the DyHead tower against the head towers it replaces, from the (interleaved) stage medians
    [tower] = report["tower_ratios"]
    main = next(r for r in report["results"] if r["key"] == "dyhead")
    no_dyhead = next(r for r in report["results"] if r["key"] == "no_dyhead")
    assert tower["vs"] == models["no_dyhead"]["name"] and tower["model"] == main["model"]
    assert tower["ratio_p50"] == pytest.approx(main["stages_ms"]["dyhead"] / no_dyhead["stages_ms"]["head"])
    line = f"DyHead tower of {main['model']} / head of {no_dyhead['model']} = {tower['ratio_p50']:.2f}x"
    assert line in " ".join(output.split())  # rich wraps long lines


def test_markdown_is_written(compare_report):
    report, md_path, _ = compare_report
    text = md_path.read_text()
    assert text == to_markdown(report)
    for needle in (
        "# dyhead benchmark",
        "## Machine",
        "## Results",
        "## Stages",
        "## Ratios",
        "FCOS-R50 (torchvision)",
        "ATSS-test_resnet-DyHead",
        report["command"],
        "min_size=128, max_size=160",
    ):
        assert needle in text


@pytest.mark.parametrize("options", [["--precision", "bf16", "--channels-last"], ["--impl", "reference", "--threads", "2"]])
def test_recipe_model_options_and_no_download(tmp_path, options):
    """A recipe asking for pretrained weights still runs offline; several batch sizes; precision, layout, impl."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        'name = "tiny"\n[model]\nnum_classes = 3\n[model.backbone]\nname = "test_resnet"\npretrained = true\n'
        "[model.fpn]\nchannels = 32\n[model.dyhead]\nnum_blocks = 1\n"
    )
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "benchmark",
            "--recipe",
            str(recipe),
            "--size",
            "64x96",
            "--batch-sizes",
            "1,2",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
            *options,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    s = report["settings"]
    assert (s["precision"], s["channels_last"], s["impl"]) == (
        ("bf16", True, "fast") if "bf16" in options else ("fp32", False, "reference")
    )
    cfg = report["models"]["dyhead"]["config"]
    assert cfg["num_classes"] == 3 and cfg["backbone"]["pretrained"] is False
    for r in report["results"]:
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["latency_ms"]["p50"])
    levels = [tuple(x) for x in report["models"]["dyhead"]["levels"]]
    assert report["models"]["dyhead"]["flops_per_image"]["dyhead_deformable"] == tower_dcn_flops(levels, 32, 1)


def test_tiny_tower_flops_match_a_hand_count():
    """Every FLOP of a 1-block, 16-channel tower on three levels, counted by hand."""
    c, levels = 16, [(8, 8), (4, 4), (2, 2)]
    tower = DyHead(c, 1).set_impl("reference").eval()
    feats = [torch.randn(1, c, h, w) for h, w in levels]
    with torch.inference_mode():
        flops = count_flops(lambda: tower(feats))
    squeeze = tower.blocks[0].task_attn.fc1.out_features
    offsets = sum(2 * c * 9 * 27 * h * w for h, w in levels)  # Conv2d(C, 27, 3) per level
    dcn = (
        sum(dcn_flops(c, c, h, w) for h, w in levels)  # mid
        + sum(dcn_flops(c, c, h, w) for h, w in levels[1:])  # low, stride 2 from the level above: same sizes here
        + sum(dcn_flops(c, c, h, w) for h, w in levels[1:])  # high, at the smaller level's size
    )
    num_maps = len(levels) + 2 * (len(levels) - 1)
    scale_attn = num_maps * 2 * c  # Conv2d(C, 1, 1) on each pooled (1x1) map
    dyrelu = len(levels) * (2 * c * squeeze + 2 * squeeze * 4 * c)  # fc1, fc2 per level
    assert flops.deformable == dcn
    assert flops.total == offsets + dcn + scale_attn + dyrelu


def test_timing_percentiles_and_measure_calls():
    t = Timing([0.4, 0.1, 0.2, 0.3])
    assert t.percentile(0) == pytest.approx(0.1) and t.percentile(100) == pytest.approx(0.4)
    assert t.p50 == pytest.approx(0.25) and t.percentile(90) == pytest.approx(0.37)
    ms = t.to_ms()
    assert ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["max"]
    calls = []
    timing = measure(lambda: calls.append(1), warmup=2, iters=3, device="cpu")
    assert len(calls) == 5 and len(timing.times_s) == 3 and all(x >= 0 for x in timing.times_s)
    order: list[str] = []
    timings = measure_interleaved({k: (lambda k=k: order.append(k)) for k in "abc"}, iters=3, device="cpu")
    assert order == list("abcbcacab")  # every model once per round, the start rotating
    assert {k: len(v.times_s) for k, v in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_option_parsing():
    assert parse_size("800x1333") == (800, 1333) and parse_size("640") == (640, 640)
    assert parse_batch_sizes("1, 8") == [1, 8]
    assert parse_size("4096x32") == (4096, 32)
    for bad in ("800by1333", "16x16", "", "99999999", "800x4097"):  # a huge size was an internal error (alloc)
        with pytest.raises(DyheadError, match="--size"):
            parse_size(bad)
    for bad in ("0", "a,b", ""):
        with pytest.raises(DyheadError):
            parse_batch_sizes(bad)


def test_failure_under_an_optional_mode_is_one_line():
    def broken():
        raise RuntimeError("backend 'inductor' failed\nlong compiler log")

    s = Settings(precision="bf16", compile=True)
    with pytest.raises(DyheadError) as e:
        first_call(broken, "ATSS-R50-DyHead", s)
    assert str(e.value) == (
        "ATSS-R50-DyHead cannot run with --precision bf16 --compile on cpu: RuntimeError: backend 'inductor' failed"
    )
    with pytest.raises(RuntimeError):  # plain fp32 eager: a bug, keep the traceback
        first_call(broken, "x", Settings())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_without_cuda_is_one_line():
    line = one_line_error(runner.invoke(app, ["benchmark", *TINY_ARGS, "--gpu"]))
    assert "--gpu" in line and "no CUDA device" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "resnet5O", "--compare"], "unknown timm model 'resnet5O'"),
        (["--model", "test_resnet", "--recipe", "x.toml"], "not both"),
        (["--size", "800by1333"], "--size"),
        (["--precision", "fp8"], "--precision"),
        (["--impl", "fastest"], "--impl"),
        (["--recipe", "missing.toml"], "recipe file not found"),
        (["--threads", "9999"], "more than 4 per core"),  # it ran, and loaded 2 cores to 136
    ],
)
def test_user_errors_are_one_line(args, expected):
    assert expected in one_line_error(runner.invoke(app, ["benchmark", *args]))


@pytest.mark.gpu
def test_fp16_on_cuda():
    cfg = ModelConfig()
    cfg.backbone.name = "test_resnet"
    s = Settings(device="cuda", size=(128, 160), batch_sizes=[2], precision="fp16", iters=3, warmup=1)
    report = run_benchmark(cfg, "test", s)
    row = report["results"][0]
    assert report["machine"]["gpu"] and report["settings"]["precision"] == "fp16"
    assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
    assert row["peak_memory_bytes"] > 0 and row["peak_memory_kind"].startswith("CUDA")


def test_gpu_info_names_triton_and_the_fused_kernel(monkeypatch):
    """What ``dyhead benchmark --gpu`` records about the CUDA software, without a GPU (device properties faked)."""
    from types import SimpleNamespace

    from dyhead_cli.commands.benchmark import machine
    from dyhead_cli.models import deform_triton, dyhead_cuda

    props = SimpleNamespace(name="Fake GPU", total_memory=80 << 30, major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(machine, "nvidia_driver", lambda: "580.159.04")
    info = machine.gpu_info()
    assert info["gpu"] == "Fake GPU" and info["gpu_capability"] == "9.0" and info["driver"] == "580.159.04"
    assert info["triton"] == getattr(deform_triton.triton, "__version__", None)
    tiles, method = deform_triton.SINGLE[torch.bfloat16] or (None, None)
    assert info["fused_deform_conv"]["bfloat16"] == {
        "method": deform_triton.METHOD[torch.bfloat16],
        "tiles": list(deform_triton.CONFIG[torch.bfloat16]),
        "single": None if tiles is None else {"method": method, "tiles": list(tiles)},
    }
    assert info["dyhead_epilogue"] in dyhead_cuda.EPILOGUES
    assert set(info["fused_deform_conv"]) == {"float32", "float16", "bfloat16"}
