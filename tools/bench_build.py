"""Benchmark: `edgeprune build --speedup S` on several models, one table.
docs/benchmarks/build.md holds its latest table.

    python tools/bench_build.py [--speedup 2] [--models edgeprune.zoo:efficientnet_lite0 timm:resnet18 ...] [--markdown]

Each build measures its own unpruned baseline in the same run, so the speedup column is a ratio of two p50s taken
minutes apart on the same machine; on a shared machine expect a few percent of noise (see docs/measurement.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEFAULT_MODELS = ["edgeprune.zoo:efficientnet_lite0", "timm:resnet18", "timm:mobilenetv3_small_100"]


def run_build(model: str, speedup: float, target: str, out: Path) -> tuple[int, dict | None, float, str]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--model", model, "--target", target,
               "--speedup", str(speedup), "--out", str(out), "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode, report, seconds, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--target", default="x86-openvino")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for docs/benchmarks/)")
    args = parser.parse_args()

    table = Table(title=f"edgeprune build --target {args.target} --speedup {args.speedup:g}")
    for column in ("model", "exit", "met", "rounds", "base p50 ms", "pruned p50 ms", "speedup", "MACs kept",
                   "params kept", "max abs err", "build s"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for i, model in enumerate(args.models):
            code, report, seconds, last = run_build(model, args.speedup, args.target, Path(tmp) / f"out{i}")
            if report is None:
                table.add_row(model, str(code), "-", "-", "-", "-", "-", "-", "-", "-", f"{seconds:.0f}")
                Console(stderr=True).print(f"{model}: {last}")
                continue
            base, result = report["baseline"], report["result"]
            table.add_row(
                model, str(code), "yes" if report["met_budget"] else "no", str(len(report["iterations"])),
                f"{base['latency_ms']['p50']:.3f}", f"{result['latency_ms']['p50']:.3f}", f"{result['speedup']:.2f}x",
                f"{result['macs'] / base['macs']:.0%}", f"{result['params'] / base['params']:.0%}",
                f"{report['validation']['max_abs_err']:.1e}", f"{seconds:.0f}",
            )  # fmt: skip
    if args.markdown:
        print("| " + " | ".join(c.header for c in table.columns) + " |")
        print("|" + "---|" * len(table.columns))
        for row in zip(*(c._cells for c in table.columns), strict=True):
            print("| " + " | ".join(row) + " |")
    else:
        Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
