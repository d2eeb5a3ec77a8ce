"""How repeatable a latency measurement is on this machine: one pruned model and the unpruned one, benchmarked
again and again as a build does, alone and with the unpruned model timed alongside.

    python tools/bench_repeatability.py [--model timm:mobilenetv3_large_100] [--side 128] [--ratio 0.5]
                                        [--repeats 8] [--markdown]

Prints, per repeat, the pruned model's p50 alone, its ratio to the unpruned model timed alongside (what a
speedup budget compares), and the unpruned model's p50 timed alongside over its p50 alone (what tells the
machine's slow state, backends/base.py SLOW_STATE), then the spread of each: (max − min) / median. A build can
only be as sure of a budget as this spread allows; docs/benchmarks/repeatability.md holds its latest table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:mobilenetv3_large_100")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.5, help="uniform fraction of every group removed")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--target", default="x86-openvino")
    parser.add_argument("--threads", type=int, help="inference threads (default: the target's)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from edgeprune.backends import get_backend
    from edgeprune.backends.base import SLOW_STATE
    from edgeprune.device import open_device
    from edgeprune.model import load_model
    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.score.allocate import uniform_plan
    from edgeprune.score.importance import score_groups
    from edgeprune.target import load_target

    target = load_target(args.target)
    if args.threads:
        target = dataclasses.replace(target, threads=args.threads)
    shape = (1, 3, args.side, args.side)
    model = load_model(args.model, None, shape).module
    example = torch.zeros(shape)
    scored = score_groups(model, example, "magnitude")
    plan = uniform_plan(scored, args.ratio, target.channel_multiple, args.model, shape, "repeatability")
    backend, device = get_backend(target.backend), open_device(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-repeat-") as tmp:
        artifacts = []
        for name, module in (("unpruned", model), ("pruned", apply_plan(model, plan, example))):
            (Path(tmp) / name).mkdir()
            artifacts.append(backend.export(module, example, Path(tmp) / name, target, None))
        unpruned, pruned = artifacts
        for i in range(args.repeats):
            alone = backend.benchmark(pruned, shape, target, device)
            unpruned_alone = backend.benchmark(unpruned, shape, target, device)
            paired = backend.benchmark(pruned, shape, target, device, reference=unpruned)
            inflation = paired.reference_p50 / unpruned_alone.p50
            rows.append((alone.p50, paired.p50 / paired.reference_p50, inflation))
            print(f"repeat {i + 1}: alone p50 {alone.p50:.3f} ms, ratio to the unpruned alongside {rows[-1][1]:.3f};"
                  f" the unpruned {unpruned_alone.p50:.3f} ms alone, {paired.reference_p50:.3f} alongside"
                  f" ({inflation:.2f}x; {SLOW_STATE}x is taken for the slow state)", file=sys.stderr)  # fmt: skip

    def spread(values) -> str:
        return f"{(max(values) - min(values)) / statistics.median(values):.0%}"

    alone, ratios, inflations = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    head = ["measurement", "median", "min", "max", "spread (max − min) / median"]
    table = [
        ["p50 alone (ms)", f"{statistics.median(alone):.3f}", f"{min(alone):.3f}", f"{max(alone):.3f}", spread(alone)],
        ["p50 / unpruned p50 alongside", f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}",
         f"{max(ratios):.3f}", spread(ratios)],
        ["unpruned p50 alongside / alone", f"{statistics.median(inflations):.3f}", f"{min(inflations):.3f}",
         f"{max(inflations):.3f}", spread(inflations)],
    ]  # fmt: skip
    print(
        f"{args.model} at {args.side}, {args.ratio:.0%} uniform cut, {args.repeats} repeats on {args.target},"
        f" {target.threads} thread(s)"
    )
    print_rows(head, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
