"""Time the DyHead tower's implementations side by side, in one process, interleaved.

    python benchmarks/dyhead_tower.py                       # 6 blocks x 256 channels, 640x640 -> P3..P7
    python benchmarks/dyhead_tower.py --size 800 --iters 5 --threads 1 --variants reference,fast,fast-compile
    python benchmarks/dyhead_tower.py --train --blocks 2 --channels 64 --batch 16 --size 128   # fwd + bwd

Each iteration runs every variant once (in turn), so load from other processes hits them alike; the
script prints per-variant median, p90 and min, each median's ratio to the reference, and the max abs
difference of each variant's outputs from the reference's. Offsets are perturbed so sampling really moves.
With ``--train`` each iteration is a forward and a backward pass (gradients w.r.t. the inputs and every
weight; the max abs difference then covers the input gradients too).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dyhead_cli.models.dyhead import DyHead

VARIANTS = ("reference", "fast", "fast-compile")


def level_sizes(size: int) -> list[tuple[int, int]]:
    """P3..P7 sizes of a size x size input (strides 8..128, rounding up like a conv backbone)."""
    sizes, s = [], -(-size // 8)
    for _ in range(5):
        sizes.append((s, s))
        s = (s - 1) // 2 + 1
    return sizes


def build_tower(channels: int, blocks: int, mode: str, seed: int = 0) -> DyHead:
    torch.manual_seed(seed)
    tower = DyHead(channels, blocks, offset_mode=mode).eval()
    for block in tower.blocks:  # move sampling off the grid, as trained weights do
        torch.nn.init.normal_(block.offset.weight, 0.0, 0.02)
    return tower


def make_variant(name: str, tower: DyHead):
    """A callable features -> outputs running ``tower`` the way the variant says."""
    if name in ("reference", "fast"):
        return lambda feats: tower.set_impl(name)(feats)
    if name == "fast-compile":  # compiles on the first call (minutes on 2 cores)
        compiled = torch.compile(tower)

        def run(feats):
            tower.set_impl("fast")
            return compiled(feats)

        return run
    raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=640, help="input image side; levels are P3..P7 of it")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=7, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="official", choices=("official", "mmdet", "aligned"))
    p.add_argument("--variants", default="reference,fast", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
    p.add_argument(
        "--check-all-modes", action="store_true", help="also print fast vs reference max abs diff in every offset mode"
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    sizes = level_sizes(args.size)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(args.batch, args.channels, h, w, generator=g) for h, w in sizes]
    tower = build_tower(args.channels, args.blocks, args.mode)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "reference" not in names:
        names.insert(0, "reference")
    runs = {n: make_variant(n, tower) for n in names}

    print(
        f"DyHead tower: {args.blocks} blocks x {args.channels} ch, batch {args.batch}, levels "
        f"{' '.join(f'{h}x{w}' for h, w in sizes)} (input {args.size}), mode {args.mode}, "
        f"{torch.get_num_threads()} threads, {'forward + backward' if args.train else 'inference'}, "
        f"torch {torch.__version__}"
    )
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, list[torch.Tensor]] = {}
    grad_out = [torch.randn(f.shape, generator=g) for f in feats]

    def once(n: str) -> list[torch.Tensor]:
        if not args.train:
            with torch.inference_mode():
                return runs[n](feats)
        leaves = [f.clone().requires_grad_() for f in feats]
        tower.zero_grad(set_to_none=True)
        out = runs[n](leaves)
        torch.autograd.backward(out, grad_out)
        return [o.detach() for o in out] + [x.grad for x in leaves]

    tower.train(args.train)
    for n in names:  # warm-up (and compile) each variant, keep its outputs
        for _ in range(args.warmup):
            outputs[n] = once(n)
    for _ in range(args.iters):
        for n in names:
            t0 = time.perf_counter()
            once(n)
            times[n].append(time.perf_counter() - t0)

    ref_median = statistics.median(times["reference"])
    print(f"{'variant':<20} {'median s':>9} {'p90 s':>8} {'min s':>8} {'vs ref':>7} {'max abs diff':>13}")
    for n in names:
        t = sorted(times[n])
        median, p90 = statistics.median(t), t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
        diff = max((a - b).abs().max().item() for a, b in zip(outputs[n], outputs["reference"]))
        print(f"{n:<20} {median:9.3f} {p90:8.3f} {t[0]:8.3f} {ref_median / median:6.2f}x {diff:13.2e}")
    if args.check_all_modes:
        with torch.inference_mode():
            for mode in ("official", "mmdet", "aligned"):
                tower = build_tower(args.channels, args.blocks, mode)
                ref, fast = tower.set_impl("reference")(feats), tower.set_impl("fast")(feats)
                diff = max((a - b).abs().max().item() for a, b in zip(fast, ref))
                print(f"offset mode {mode:<9} fast vs reference max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
