"""The search, one strategy per budget kind: a measured latency (latency_ms, speedup) is searched round by round
(loop.py); MACs and params are counted, memory computed on each round's graph (budgets.py).

Adding a budget kind is one function here and one entry in STRATEGIES; each returns a SearchResult.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeprune.budgets import fit_counted_budget, fit_memory_budget
from edgeprune.context import SearchContext
from edgeprune.errors import BudgetNotMet
from edgeprune.loop import search
from edgeprune.rounds import Candidate
from edgeprune.stages import Baseline, Prepared, SearchResult

Strategy = Callable[[SearchContext, Prepared, Baseline, Candidate | None], SearchResult]


def fit_memory(ctx: SearchContext, prep: Prepared, baseline: Baseline, start: Candidate | None) -> SearchResult:
    """The least pruning whose artifact fits the memory budget; the unpruned model where it already fits."""
    value = prep.budget.value
    if baseline.memory["total_mb"] <= value:
        plan, macs, params = ctx.plan_at(0.0)
        unpruned = Candidate(0, plan, macs, params, baseline.measurement, baseline.artifact, baseline.measurement.p50,
                             memory_mb=baseline.memory["total_mb"])  # fmt: skip
        return SearchResult(unpruned, [unpruned])
    chosen, candidates = fit_memory_budget(ctx, value, baseline.measurement.p50, prep.options.max_rounds)
    if chosen is None:
        least = min(c.memory_mb for c in candidates)
        raise BudgetNotMet(
            f"memory budget of {value:g} MB not reached: the smallest artifact needs"
            f" {least:.2f} MB (weights + peak activations); relax the budget or use a smaller model"
        )
    return SearchResult(chosen, candidates)


def fit_counted(ctx: SearchContext, prep: Prepared, baseline: Baseline, start: Candidate | None) -> SearchResult:
    """The plan within a MACs or params fraction of the unpruned model, counted exactly, measured once."""
    kind, value = prep.budget.kind, prep.budget.value
    chosen, reached = fit_counted_budget(ctx, kind, value, (baseline.macs, baseline.params),
                                         baseline.measurement.p50)  # fmt: skip
    if chosen is None:
        raise BudgetNotMet(
            f"{kind.replace('_', ' ')} {value:g} not reachable: the deepest cut keeps"
            f" {reached:.3f} of the unpruned model; relax the budget or use a smaller model"
        )
    return SearchResult(chosen, [chosen])


def search_latency(ctx: SearchContext, prep: Prepared, baseline: Baseline, start: Candidate | None) -> SearchResult:
    """Measured rounds until one lands in the acceptance band below the latency the budget asks for."""
    chosen, candidates, unreachable = search(ctx, (baseline.measurement, baseline.artifact), baseline.budget_ms,
                                             prep.options.max_rounds, start)  # fmt: skip
    return SearchResult(chosen, candidates, unreachable)


STRATEGIES: dict[str, Strategy] = {
    "latency_ms": search_latency,
    "speedup": search_latency,
    "macs_ratio": fit_counted,
    "params_ratio": fit_counted,
    "memory_mb": fit_memory,
}
