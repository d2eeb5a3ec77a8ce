"""Fidelity against *measured* latency, global allocation against Torch-Pruning's uniform L1.

    python tools/bench_curves.py --weights-dir DIR [--models timm:resnet18@128 ...] [--fractions 0.4 0.5 0.6 0.7]
                                 [--repeats 3] [--drop-blocks auto|N] [--markdown]

tools/bench_scorer.py's (b) builds each arm to one budget, and the two builds land anywhere in the acceptance band
([0.85, 0.97] of it), up to 14% apart: a difference in fidelity can be a difference in latency. Here each arm is
a curve instead. Per model (trained on the digits as bench_scorer.py trains it; weights from --weights-dir, trained
there when missing), after `edgeprune profile` has fitted the latency model:

- global: the build's default, fisher scores on 192 training digits (as many as a build scores on) and global
  allocation with the steepness and the channel choice (fisher's, L2 or L1 magnitude's, energy's) a build to that
  latency would choose on 128 of them (chosen for each plan at its own goal); first, as a build does by default
  (--drop-blocks auto), the residual blocks whose removal keeps the outputs closest once channels meet the goal
  (search/depth.py; `--drop-blocks 0`: channels only); uniform:
  magnitude (L1) scores and the same fraction of every group, rounded to the same multiple (Torch-Pruning's uniform
  L1). Each at --fractions of the unpruned model's predicted latency.
- every plan is pruned and its batch norm recalibrated on 192 training digits (what a build does without
  --compensate or distillation), then exported and timed on OpenVINO beside the unpruned model, --repeats times in
  round-robin over all the plans of the model, so a busy spell hits every plan alike; the median counts.
- fidelity: top-1 agreement and mean cosine of outputs with the unpruned model on the 597 held-out digits.

The comparison: each arm's fidelity is interpolated linearly along its own curve at the other arm's measured
latencies (only inside its measured range; outside, no comparison is made). "global − uniform" is the mean of
those differences, and the verdict says at how many matched latencies global was ahead, by top-1 agreement and by
cosine similarity.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_task import agreement, digits, task_model_spec, trained_weights  # noqa: E402

TRAIN = 1200
ARMS = {"global": "fisher", "uniform": "magnitude"}  # allocation → importance: edgeprune's default, and TP's L1


def interpolate(points: list[tuple[float, float]], at: float) -> float | None:
    """The value of the piecewise-linear curve through ``points`` (latency, fidelity) at latency ``at``; None outside
    the measured range. Points are sorted by latency; a curve that is not monotone is used as measured."""
    points = sorted(points)
    for (l0, f0), (l1, f1) in zip(points, points[1:], strict=False):
        if l0 <= at <= l1:
            return f0 if l1 == l0 else f0 + (f1 - f0) * (at - l0) / (l1 - l0)
    return None


def compare(curves: dict[str, list[tuple[float, float]]]) -> tuple[list[float], str]:
    """Differences global − uniform at every measured latency of either arm that the other arm's curve spans."""
    diffs = []
    for latency, fid in curves["uniform"]:
        other = interpolate(curves["global"], latency)
        if other is not None:
            diffs.append(other - fid)
    for latency, fid in curves["global"]:
        other = interpolate(curves["uniform"], latency)
        if other is not None:
            diffs.append(fid - other)
    if not diffs:
        return diffs, "not decided: the two curves do not overlap in measured latency"
    ahead, behind = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    who = "global ahead" if ahead == len(diffs) else ("uniform ahead" if behind == len(diffs) else "mixed")
    return diffs, f"{who}: global higher at {ahead} of {len(diffs)} matched latencies, mean {np.mean(diffs):+.3f}"


def model_curves(name: str, side: int, args, tmp: Path) -> tuple[list[list[str]], str]:
    from edgeprune.backends import get_backend
    from edgeprune.device import open_device
    from edgeprune.loop import SearchContext
    from edgeprune.model import load_model
    from edgeprune.pipeline import SCORE_BATCHES
    from edgeprune.profile import run_profile
    from edgeprune.rewrite.prune import apply_plan, count_macs_params
    from edgeprune.rewrite.recover import recalibrate_batchnorm
    from edgeprune.score.costmodel import new_model
    from edgeprune.score.importance import score_groups
    from edgeprune.score.structure import read_structure
    from edgeprune.search.depth import choose_blocks
    from edgeprune.search.steepness import candidate_name, other_channel_scores
    from edgeprune.target import load_target

    say = lambda message: None  # noqa: E731
    shape = (1, 3, side, side)
    x, y = digits(side)
    spec = task_model_spec(name, tmp)
    weights = trained_weights(name, side, Path(args.weights_dir), args.epochs, spec, x, y)
    profiled = run_profile("x86-openvino", spec, str(weights), input_shape=shape, samples=8, say=say)
    target = load_target("x86-openvino")
    backend, device = get_backend(target.backend), open_device(None)
    model = load_model(spec, str(weights), input_shape=shape).module.eval()
    example = torch.zeros(shape)
    # A build's 3/4 of 256 labelled --calib digits (bench_scorer.py's (b) gives its builds the labels too)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 192, 16)]
    with torch.no_grad():
        reference = model(x[TRAIN:])
    plans = []  # (allocation, fraction, pruned model, MACs, steepness, predicted ms, blocks removed)
    ctx = None
    unpruned, order = None, None
    for allocation, importance in ARMS.items():
        scoring = batches[: SCORE_BATCHES.get(importance, 4)]  # as many as a build scores this importance on
        scored = [replace(g, scores=None) if g.module in profiled["kept_whole"] else g
                  for g in score_groups(model, example, importance, scoring)]  # fmt: skip
        ctx = SearchContext(model, example, scored, spec, importance, target, backend, device,
                            tmp / f"rounds-{name.replace(':', '_')}", say, allocation=allocation)  # fmt: skip
        ctx.structure = read_structure(model, example, [g.module for g in scored])
        ctx.latency_model = new_model(ctx.structure, target, profiled["runtime"])
        ctx.steepness_batches = batches[:8] if allocation == "global" else None
        # A build's other channel choice, judged beside its scores' (search/steepness.py)
        if allocation == "global":
            ctx.channel_scores = other_channel_scores(model, example, batches[:8], say)
        full = ctx.latency_model.predict(ctx.structure.full_widths())
        if unpruned is None:  # timed first: choosing blocks measures models beside it, as a build does
            unpruned, ctx.reference = ctx.measure(model, "unpruned")
            ctx.quiet_reference_ms = unpruned.p50
        for fraction in args.fractions:
            work, blocks = ctx, 0  # the model the channels are cut on: without the blocks a build would remove
            if allocation == "global" and args.drop_blocks != "0":  # what the build does first: blocks, then channels
                if order is None:  # every block in the greedy order: the same for every goal
                    order = choose_blocks(model, example, batches[:8], None)
                depth, shallow = _without_blocks(ctx, args.drop_blocks, batches, scoring, profiled, fraction * full,
                                                 order)  # fmt: skip
                if depth.dropped:
                    work, blocks = shallow, len(depth.dropped)
            # Each plan is what a build to that budget would make: its steepness chosen at its own goal, as a build
            # chooses it at its first round. One steepness for the whole curve, chosen at the middle goal, carried
            # a choice made where it meant nothing to the other goals: at a goal deeper than the allocator's floor
            # every steepness gives the same plan, the tie goes to 0, and ConvNeXt-atto's 0.5 plan at steepness 0
            # kept 0.776 top-1 agreement against uniform L1's 0.871 (fractions 0.25-0.5).
            work.steepness = None
            plan, macs, _ = work.plan_for(fraction * full)
            pruned = apply_plan(work.model, plan, example)
            recalibrate_batchnorm(pruned, batches)
            predicted = work.latency_model.predict(work.structure.widths_of(plan))  # the plan's own, not its goal
            plans.append((allocation, fraction, pruned.eval(), macs, work.steepness, predicted, blocks))
    # Every plan timed beside the unpruned model, in round-robin: a busy spell lands on all plans alike; and taken
    # again where the unpruned model alongside ran in the machine's slow state, as a build's rounds are.
    baseline_p50 = profiled["baseline_p50"]
    times: list[list[float]] = [[] for _ in plans]
    for repeat in range(args.repeats):
        for i, (_, _, pruned, *_) in enumerate(plans):
            times[i].append(ctx.measure(pruned, f"plan-{i}-{repeat}")[0].comparable_p50(baseline_p50))
    full_macs = count_macs_params(model, example)[0]
    rows = []
    curves = {metric: {"global": [], "uniform": []} for metric in ("top-1", "cosine")}
    for (allocation, fraction, pruned, macs, steepness, predicted, blocks), measured in zip(plans, times, strict=True):
        with torch.no_grad():
            out = pruned(x[TRAIN:])
        top1, cosine = agreement(out, reference)
        latency = statistics.median(measured)
        curves["top-1"][allocation].append((latency, top1))
        curves["cosine"][allocation].append((latency, cosine))
        note = ""
        if allocation == "global" and steepness:  # not settled: fewer than two plans reached the goal
            unsettled = (
                " (at the floor: channels compared)" if steepness.floor and steepness.plans > 1 else " (not compared)"
            )
            note = candidate_name((steepness.chosen, steepness.channels)) + ("" if steepness.settled else unsettled)
        note += f"; {blocks} blocks removed" if blocks else ""
        # Predicted beside measured: whether the cost model prices both arms' plans alike (a plan's goal is not its
        # prediction: rounding to the channel multiple lands it under the goal).
        rows.append([name, f"{allocation} ({ARMS[allocation]})", f"{fraction:g}", f"{predicted:.3f}", f"{latency:.3f}",
                     f"{(max(measured) - min(measured)) / latency:.0%}", f"{macs / full_macs:.0%}", f"{top1:.3f}",
                     f"{cosine:.4f}", note])  # fmt: skip
    rows.sort(key=lambda r: (r[1], float(r[4])))
    verdicts = "; ".join(f"{metric}: {compare(by_arm)[1]}" for metric, by_arm in curves.items())
    return rows, f"{verdicts} (unpruned {baseline_p50:.3f} ms)"


def _without_blocks(ctx, count, batches: list, scoring: list, profiled: dict, goal_ms: float, order):
    """The blocks a build to ``goal_ms`` removes (``--drop-blocks``: a count, or auto), and a SearchContext for the
    model without them as the build makes it: its groups scored, its cost model calibrated on its measured latency,
    the steepness and channels chosen at the first plan."""
    from dataclasses import replace as copy_of

    from edgeprune.context import SearchMemo
    from edgeprune.loop import remove_blocks
    from edgeprune.score.costmodel import new_model
    from edgeprune.score.importance import score_groups
    from edgeprune.score.structure import read_structure
    from edgeprune.search.depth import AUTO
    from edgeprune.search.steepness import other_channel_scores

    score = lambda m: score_groups(m, ctx.example, ctx.method, scoring[:4])  # noqa: E731  (as the build's counts)
    shallow = copy_of(ctx, steepness=None, memo=SearchMemo(), unprunable={})
    count = AUTO if count == AUTO else int(count)
    depth, found = remove_blocks(shallow, count, batches[:8], profiled["baseline_p50"], goal_ms, score,
                                 profiled["runtime"], order)  # fmt: skip
    whole = found.whole_cost  # the whole model's profile: the model without the blocks is priced as a build prices
    if depth.dropped:
        shallow.scored = score_groups(shallow.model, ctx.example, ctx.method, scoring)
        shallow.structure = read_structure(shallow.model, ctx.example, [g.module for g in shallow.scored])
        shallow.latency_model = new_model(shallow.structure, ctx.target, profiled["runtime"])
        shallow.latency_model.borrow_nodes(whole)
        measured = dict(depth.probes).get(len(depth.dropped))
        if measured is None:
            measured = shallow.measure(shallow.model, "depth")[0].comparable_p50(profiled["baseline_p50"])
        shallow.latency_model.add(shallow.structure.full_widths(), measured)
        shallow.channel_scores = other_channel_scores(shallow.model, ctx.example, batches[:8], lambda message: None)
    return depth, shallow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["timm:resnet18@128", "timm:mobilenetv3_large_100@128",
                        "edgeprune.zoo:efficientnet_lite0@128", "timm:regnetx_002@128", "timm:convnext_atto@128"],
                        help="SPEC@SIDE")  # fmt: skip
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7],
                        help="of the unpruned model's predicted latency")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timings of every plan; the median counts")
    parser.add_argument("--weights-dir", required=True, help="trained weights (as bench_scorer.py keeps them)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--drop-blocks", default="auto", help="global's residual blocks, as a build's (0: none)")
    parser.add_argument("--markdown", action="store_true", help="(the tables are always markdown)")
    args = parser.parse_args()
    head = ["model", "allocation (importance)", "goal (of predicted)", "predicted ms", "measured ms (median)", "spread",
            "MACs", "top-1 agreement", "cosine", "note"]  # fmt: skip
    rows, verdicts = [], []
    with tempfile.TemporaryDirectory(prefix="bench-curves-") as tmp:
        os.environ["EDGEPRUNE_CACHE"] = str(Path(tmp) / "cache")  # every model starts from no measurement
        for item in args.models:
            name, _, side = item.rpartition("@")
            print(f"{name} at {side} ...", file=sys.stderr, flush=True)
            try:
                model_rows, verdict = model_curves(name, int(side), args, Path(tmp))
            except Exception as exc:  # one model's failure is a row, not the end of the benchmark
                model_rows, verdict = [], f"failed: {' '.join(str(exc).split())[:200]}"
            rows += model_rows
            verdicts.append([name, verdict])
            print(f"  {verdict}", file=sys.stderr, flush=True)
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    print("\n| model | global against uniform L1 at equal measured latency (top-1 agreement; cosine) |\n|---|---|")
    print("\n".join("| " + " | ".join(row) + " |" for row in verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
