"""Wall time of a build with 1, 2 and 4 candidates in flight, and what that predicts for a device farm.

    python tools/bench_farm.py [--model timm:mobilenetv3_large_100] [--side 128] [--in-flight 1 2 4]
                               [--executor ray] [--device URL ...] [--repeats 1] [--markdown]

Per setting: one build (per repeat) to a 2x speedup on x86-openvino, each in a fresh profile cache so that no
build starts from another's measurements; its wall time (Ray's start excluded: the executor is started once,
before), rounds and candidates. Then one candidate's two parts are timed on their own: preparing it (prune and
export, on a worker) and benchmarking it (on the device). From those, a farm of W workers and D devices runs a
round of k candidates in about ceil(k / W) · prepare + ceil(k / D) · benchmark, and a build in its fixed part
(loading, scoring, the baseline, recovery, the final artifact) plus its rounds. That prediction is printed beside
what was measured here, where 2 cores are both the workers and the one device: candidates in flight then compete
with the benchmark for the same cores, which is why this machine cannot show the farm's speedup itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_rows  # noqa: E402


def one_candidate(spec: str, shape: tuple[int, ...], device_url: str | None) -> tuple[float, float]:
    """Seconds to prepare (prune + export) and to benchmark one candidate at half the width, alone; benchmarked
    beside the unpruned model, as a speedup build's candidates are."""
    from edgeprune.backends import get_backend
    from edgeprune.device import open_device
    from edgeprune.model import load_model
    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.score.allocate import uniform_plan
    from edgeprune.score.importance import score_groups
    from edgeprune.target import load_target

    target = load_target("x86-openvino")
    model = load_model(spec, None, shape).module
    example = torch.zeros(shape)
    plan = uniform_plan(score_groups(model, example, "magnitude"), 0.5, 8, spec, shape, "bench")
    backend, device = get_backend("openvino"), open_device(device_url)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "unpruned").mkdir()
        reference = backend.export(model, example, Path(tmp) / "unpruned", target)
        start = time.perf_counter()
        artifact = backend.export(apply_plan(model, plan, example), example, Path(tmp), target)
        prepared = time.perf_counter()
        backend.benchmark(artifact, shape, target, device, reference)
        return prepared - start, time.perf_counter() - prepared


def timed_build(spec: str, shape: tuple[int, ...], in_flight: int, executor: str, device: str | None) -> dict:
    from edgeprune.errors import BudgetNotMet
    from edgeprune.pipeline import BuildOptions, build
    from edgeprune.target import Budget

    with tempfile.TemporaryDirectory(prefix="bench-farm-") as tmp:
        os.environ["EDGEPRUNE_CACHE"] = str(Path(tmp) / "cache")
        options = BuildOptions(model=spec, input_shape=shape, budget=Budget(speedup=2.0), out=Path(tmp) / "out",
                               executor=executor, in_flight=in_flight, device=device, recover_steps=0)  # fmt: skip
        start = time.perf_counter()
        try:
            report = build(options, say=lambda message: None)
        except BudgetNotMet as exc:  # the final artifact measured over budget: a build all the same, timed
            if getattr(exc, "report", None) is None:
                raise
            report = exc.report
        wall = time.perf_counter() - start
    rounds = max(i["step"] for i in report["iterations"])
    return {"wall": wall, "rounds": rounds, "candidates": len(report["iterations"]), "met": report["met_budget"],
            "speedup": report["result"]["speedup"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:mobilenetv3_large_100")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--executor", default="ray", help="local, ray, ray:auto or ray://HOST:PORT")
    parser.add_argument("--device", nargs="*", help="device URLs (a pool when several); default: this machine")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    shape = (1, 3, args.side, args.side)
    device = ",".join(args.device) if args.device else None

    from edgeprune.farm.executor import make_executor

    executor = make_executor(args.executor)  # started once, here: builds join it, and its start is not timed
    try:
        prepare, bench = one_candidate(args.model, shape, args.device[0] if args.device else None)
        print(f"one candidate: prepare {prepare:.1f} s, benchmark {bench:.1f} s", file=sys.stderr)
        rows = []
        for k in args.in_flight:
            runs = [timed_build(args.model, shape, k, args.executor, device) for _ in range(args.repeats)]
            wall = statistics.median(r["wall"] for r in runs)
            rounds = statistics.median(r["rounds"] for r in runs)
            candidates = statistics.median(r["candidates"] for r in runs)
            # The build's fixed part: what is left of its wall time after its candidates, one after another.
            fixed = max(0.0, wall - candidates * (prepare + bench)) if k == 1 else None
            rows.append({"k": k, "wall": wall, "rounds": rounds, "candidates": candidates, "fixed": fixed,
                         "met": all(r["met"] for r in runs),
                         "speedup": statistics.median(r["speedup"] for r in runs)})  # fmt: skip
            print(f"in flight {k}: {wall:.1f} s, {rounds:g} rounds, {candidates:g} candidates", file=sys.stderr)
    finally:
        executor.close()
    fixed = next((r["fixed"] for r in rows if r["fixed"] is not None), None)
    head = ["in flight", "build s (here)", "rounds", "candidates", "met 2x", "speedup",
            "farm of k workers + k devices, predicted s"]  # fmt: skip
    table = []
    for r in rows:
        per_round = prepare + bench  # k workers and k devices: a round takes one candidate's time
        farm = f"{fixed + r['rounds'] * per_round:.0f}" if fixed is not None else "-"
        table.append([str(r["k"]), f"{r['wall']:.0f}", f"{r['rounds']:g}", f"{r['candidates']:g}",
                      "yes" if r["met"] else "no", f"{r['speedup']:.2f}x", farm])  # fmt: skip
    print(f"{args.model} at {args.side}, 2x speedup on x86-openvino, executor {args.executor}, device"
          f" {device or 'this machine'}; one candidate: prepare {prepare:.1f} s + benchmark {bench:.1f} s;"
          f" fixed part of a build {fixed:.0f} s" if fixed is not None else "")  # fmt: skip
    print_rows(head, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
