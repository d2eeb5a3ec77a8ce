"""The search, for depth: which residual blocks to remove, chosen on the task's data (``--drop-blocks N``).

A block's worth is how far the model's outputs move on the task's samples without it (the Judge's distance: the
logits' cosine for a classifier). Blocks are removed one at a time, each time the one whose removal, on top of
those already removed, moves the outputs least: blocks of one stage stand in for each other, and the second of two
similar blocks costs more once the first is gone than it did alone.

``--drop-blocks auto`` chooses how many on the task's data (choose_count): the fewest blocks whose removal alone
meets the budget, measured, bound the counts; for a few counts up to that bound, the model without them is cut by
channels to the budget (what the build's first round would make) and the count whose plan keeps the outputs closest
to the unpruned model's wins, 0 included. Depth matters at deep cuts: on RegNetX-200MF at 0.4-0.5 of its latency,
channels alone fell to chance where removing blocks kept 0.65 top-1 agreement (README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.graph.modules import copy_model
from edgeprune.rewrite.depth import drop_blocks, residual_blocks
from edgeprune.rewrite.judge import Judge

AUTO = "auto"


@dataclass(frozen=True)
class DepthChoice:
    """The blocks removed, in the order chosen, with the Judge's distance after each removal, and the residual
    blocks the model has; for ``auto``, the budget, the (blocks removed, ms) measured, the (blocks removed,
    distance of the plan to the budget, None where channels could not reach it) judged, and the (blocks removed,
    ms, measurements) of each count's channel cut that was judged, as measured."""

    dropped: tuple[str, ...]
    distance: tuple[float, ...]
    residual: tuple[str, ...]
    goal_ms: float | None = None
    probes: tuple[tuple[int, float], ...] = ()
    judged: tuple[tuple[int, float | None], ...] = ()
    cuts: tuple[tuple[int, float, int], ...] = ()

    def first(self, count: int) -> DepthChoice:
        return replace(self, dropped=self.dropped[:count], distance=self.distance[:count])

    def describe(self) -> str:
        cut = {n: f" at {ms:.3f} ms" for n, ms, _ in self.cuts}
        tried = ", ".join(f"{n}: {'-' if d is None else f'{d:.4f}'}{cut.get(n, '')}" for n, d in self.judged)
        aimed = f" (auto: each count's plan to {self.goal_ms:.3f} ms, its distance {tried})" if self.goal_ms else ""
        if not self.residual:
            return "no residual block to remove: channels only"
        names = f": {', '.join(self.dropped)}" if self.dropped else ""
        return f"removed {len(self.dropped)} of {len(self.residual)} residual blocks{aimed}{names}"

    def to_dict(self) -> dict:
        auto = {
            "auto_goal_ms": self.goal_ms,
            "auto_measured": [{"blocks": n, "p50_ms": ms} for n, ms in self.probes],
            "auto_judged": [{"blocks": n, "distance": d} for n, d in self.judged],
            "auto_cuts_measured": [{"blocks": n, "p50_ms": ms, "measurements": k} for n, ms, k in self.cuts],
        }
        return {"dropped": list(self.dropped), "distance_after_each": [round(d, 6) for d in self.distance],
                "residual_blocks": list(self.residual)} | (auto if self.goal_ms is not None else {})  # fmt: skip


def check_drop_blocks(count, plan: str | None, counted_budget: bool, synthetic: bool,
                      allocation: str = "global") -> int | str:  # fmt: skip
    """The count of blocks a build removes: a count of 0 or more, or auto (which needs a latency budget: it compares
    plans to it), not with a plan (the plan names its blocks), with the task's data to choose the blocks on; else
    BadInput. Without one (None), auto where it can judge, under global allocation to a latency or speedup budget on
    the task's data with no plan; else 0."""
    if count is None:
        return AUTO if allocation == "global" and not (plan or counted_budget or synthetic) else 0
    if (count != AUTO and not (isinstance(count, int) and count >= 0)) or (count and plan):
        raise BadInput(f"--drop-blocks takes a count of 0 or more, or auto, and not with --plan (the plan names its"
                       f" blocks); got {count}")  # fmt: skip
    if count and synthetic:
        raise BadInput("--drop-blocks chooses the blocks whose removal moves the outputs least on the task's data:"
                       " pass --train or --calib DATA")  # fmt: skip
    if count == AUTO and counted_budget:
        raise BadInput("--drop-blocks auto compares plans at a measured latency: it needs --speedup or --latency-ms;"
                       " give a count of blocks with other budgets")  # fmt: skip
    return count


def choose_depth(model: nn.Module, example: torch.Tensor, batches: list, count: int | str | list[str],
                 measure: Callable[[nn.Module, str], float] | None = None, budget_ms: float | None = None,
                 cut_to_budget: Callable[[nn.Module, float, int], nn.Module | None] | None = None,
                 baseline_ms: float | None = None, order: DepthChoice | None = None,
                 judged_on: list | None = None) -> DepthChoice:  # fmt: skip
    """``count`` blocks (choose_blocks), the blocks named (a list: given_blocks), or with ``auto`` the count
    choose_count finds: ``measure`` times a model (the unpruned one ran in ``baseline_ms``), ``cut_to_budget(model,
    its ms, blocks removed)`` cuts its channels to ``budget_ms`` (None where they cannot reach it); ``order``:
    choose_blocks's for all blocks, where known already; ``judged_on``: the batches each count's plan is judged on
    (default ``batches``; the ones its cut was not refitted on, where it was)."""
    if isinstance(count, list):
        return given_blocks(model, example, batches, count)
    if count != AUTO:
        return choose_blocks(model, example, batches, count)
    order = order or choose_blocks(model, example, batches, None)
    if not order.dropped:  # no residual block: nothing to judge
        return replace(order, goal_ms=budget_ms)
    judge = Judge(model, judged_on or batches)
    measured: dict[int, float] = {} if baseline_ms is None else {0: baseline_ms}

    def ms(n: int) -> float:
        if n not in measured:
            measured[n] = measure(without_blocks(model, order.first(n)), f"depth-{n}")
        return measured[n]

    def distance(n: int) -> float | None:
        shallower = without_blocks(model, order.first(n))
        candidate = shallower if ms(n) <= budget_ms else cut_to_budget(shallower, ms(n), n)
        return None if candidate is None else judge.distance(candidate)

    chosen, judged = choose_count(fewest_within(budget_ms, len(order.dropped), ms), distance)
    probes = tuple(sorted((n, t) for n, t in measured.items() if n))
    return replace(order.first(chosen), goal_ms=budget_ms, probes=probes, judged=judged)


def fewest_within(budget_ms: float, count: int, measure: Callable[[int], float]) -> int:
    """The fewest blocks n (1..``count``, in the chosen order) whose removal alone brings the model, ``measure``d,
    within ``budget_ms``; ``count`` where none does. Latency falls as blocks go, so bisection finds it in a few
    measurements (4 for EfficientNet-Lite0's 9 blocks)."""
    low, high = min(1, count), count
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if measure(middle) > budget_ms else (low, middle)
    return low


def choose_count(limit: int, distance: Callable[[int], float | None],
                 tries: int = 7) -> tuple[int, tuple[tuple[int, float | None], ...]]:  # fmt: skip
    """The count in 0..``limit`` whose ``distance`` is least (None: not a candidate), and the counts tried. Five
    counts spread over the range first, then the midpoints beside the best, while they are not adjacent, up to
    ``tries`` counts in all: one count's plan is a scoring, an allocation and a forward pass, and a greedy order
    makes the distance change smoothly with the count. Where no count's plan reaches the budget: 0, as without
    --drop-blocks."""
    tried: dict[int, float | None] = {}
    for n in sorted({round(limit * i / 4) for i in range(5)}):
        tried[n] = distance(n)
    while len(tried) < tries:
        scored = {n: d for n, d in tried.items() if d is not None}
        if not scored:
            break
        best = min(scored, key=lambda n: (scored[n], n))
        counts = sorted(tried)
        at = counts.index(best)
        beside = [
            (counts[at - 1] + best) // 2 if at > 0 else best,
            (best + counts[at + 1] + 1) // 2 if at + 1 < len(counts) else best,
        ]
        fresh = [n for n in beside if n not in tried]
        if not fresh:
            break
        for n in fresh[: tries - len(tried)]:
            tried[n] = distance(n)
    scored = {n: d for n, d in tried.items() if d is not None}
    chosen = min(scored, key=lambda n: (scored[n], n)) if scored else 0
    return chosen, tuple(sorted(tried.items()))


def choose_blocks(model: nn.Module, example: torch.Tensor, batches: list, count: int | None) -> DepthChoice:
    """Greedily choose ``count`` residual blocks of ``model`` (None: all, in order) to remove, judged on ``batches``
    (task samples)."""
    residual = residual_blocks(model, example)
    count = len(residual) if count is None else count
    if count > len(residual):
        raise BadInput(
            f"--drop-blocks {count}: this model has {len(residual)} residual blocks that can be removed;"
            f" pass --drop-blocks {len(residual)} or fewer"
        )
    judge = Judge(model, batches)
    dropped: list[str] = []
    distances: list[float] = []
    with torch.no_grad():
        for _ in range(count):
            tried = {name: judge.distance(drop_blocks(copy_model(model), [*dropped, name]))
                     for name in residual if name not in dropped}  # fmt: skip
            best = min(tried, key=tried.get)
            dropped.append(best)
            distances.append(tried[best])
    return DepthChoice(tuple(dropped), tuple(distances), tuple(residual))


def given_blocks(model: nn.Module, example: torch.Tensor, batches: list, names: list[str]) -> DepthChoice:
    """The residual blocks ``names`` (vote's: those the nearest earlier tasks removed), in that order, with the
    distance on ``batches`` after each removal; BadInput where the model has no such residual block."""
    residual = residual_blocks(model, example)
    unknown = [name for name in names if name not in residual]
    if unknown:
        raise BadInput(f"the bank's earlier tasks removed blocks that are not residual blocks of this model"
                       f" ({', '.join(unknown)}): build the bank again, or pass --drop-blocks auto")  # fmt: skip
    judge = Judge(model, batches)
    with torch.no_grad():
        distances = [judge.distance(drop_blocks(copy_model(model), names[: i + 1])) for i in range(len(names))]
    return DepthChoice(tuple(names), tuple(distances), tuple(residual))


def without_blocks(model: nn.Module, choice: DepthChoice) -> nn.Module:
    """A copy of ``model`` with the chosen blocks bypassed."""
    return drop_blocks(copy_model(model), list(choice.dropped))
