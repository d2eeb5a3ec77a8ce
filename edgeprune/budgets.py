"""Budgets that are counted or computed on the model, not timed: MACs, params, and memory (weights + activations).

They need no latency search: the allocator aims at the structure's own count, and each plan is checked exactly on
the pruned model or its exported graph. The plan is still measured once, for the report.
"""

from __future__ import annotations

import math
from dataclasses import replace

from edgeprune.context import SearchContext
from edgeprune.rounds import Candidate, measure_plan
from edgeprune.score.memory import artifact_memory_mb
from edgeprune.score.structure import WEIGHT_BYTES

COUNTED = ("macs_ratio", "params_ratio")  # budgets that are counted on the model, not measured on the target


def fit_counted_budget(ctx: SearchContext, kind: str, value: float, base: tuple[int, int], baseline_p50: float,
                       max_tries: int = 6) -> tuple[Candidate | None, float]:  # fmt: skip
    """The plan within a MACs or params fraction ``value`` of the unpruned model (``base``: its MACs, params), and
    the fraction it reached. MACs and params need no measurement: the allocator aims at the structure's count, the
    pruned model is counted exactly, and the goal tightens if the count is over (norm parameters the structure
    leaves out). The plan is measured once, for the report. None when even the deepest cut is over."""
    index = COUNTED.index(kind)
    full = ctx.structure.full_widths()
    counts = (ctx.structure.macs, ctx.structure.params)[index]
    total = counts(full)
    goal, reached = value, 1.0
    for _ in range(max_tries):
        plan, macs, params = ctx.plan_for(goal, lambda widths: counts(widths) / total)
        reached = (macs, params)[index] / base[index]
        if reached <= value:
            ctx.say(f"{kind.replace('_', ' ')} {reached:.3f} (budget {value:g}); exporting and measuring ...")
            return measure_plan(ctx, plan, baseline_p50, 1, math.inf), reached
        if counts(ctx.structure.widths_of(plan)) / total > goal * 1.001:
            break  # the allocator cannot cut further: floors and groups kept whole
        goal *= value / reached
    return None, reached


def fit_memory_budget(ctx: SearchContext, value_mb: float, baseline_p50: float, max_rounds: int):
    """The plan whose artifact needs at most ``value_mb`` (weights at the target precision + peak live activations
    of its graph), and every measured round. The allocator aims at the structure's estimate; each round's exported
    graph is then computed exactly, and the goal tightens by how far over it was."""
    size = WEIGHT_BYTES.get(ctx.target.precision, 4)

    def estimate_mb(widths) -> float:
        weights = ctx.structure.params(widths) * size
        return (weights + ctx.structure.peak_activation_bytes(widths, ctx.target.precision)) / (1 << 20)

    goal, candidates = value_mb, []
    for step in range(1, max_rounds + 1):
        plan, _, _ = ctx.plan_for(goal, estimate_mb)
        candidate = measure_plan(ctx, plan, baseline_p50, step, math.inf)
        memory = artifact_memory_mb(candidate.artifact.files["onnx"], ctx.target.precision)["total_mb"]
        ctx.say(f"round {step}: the artifact needs {memory:.2f} MB (budget {value_mb:g} MB)")
        candidates.append(replace(candidate, memory_mb=memory))
        if memory <= value_mb:
            return candidates[-1], candidates
        if estimate_mb(ctx.structure.widths_of(plan)) > goal * 1.001:
            break  # the allocator cannot cut further: floors and groups kept whole
        goal *= value_mb / memory
    return None, candidates
