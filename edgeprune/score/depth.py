"""Stage 2, for depth: which residual blocks to remove, chosen on the task's data (``--drop-blocks N``).

A block's worth is how far the model's outputs move on the task's samples without it (the Judge's distance: the
logits' cosine for a classifier). Blocks are removed one at a time, each time the one whose removal, on top of
those already removed, moves the outputs least: blocks of one stage stand in for each other, and the second of two
similar blocks costs more once the first is gone than it did alone.

``--drop-blocks auto`` takes blocks in that order until the model without them, measured, runs at the geometric
mean of the unpruned model's latency and the budget (depth_goal_ms): about the square root of the speedup from
depth, the rest from channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.rewrite.depth import drop_blocks, residual_blocks
from edgeprune.rewrite.prune import copy_model
from edgeprune.rewrite.recover import Judge

AUTO = "auto"


@dataclass(frozen=True)
class DepthChoice:
    """The blocks removed, in the order chosen, with the Judge's distance after each removal, and the residual
    blocks the model has; for ``auto``, the latency aimed at and the (blocks removed, ms) measured to find it."""

    dropped: tuple[str, ...]
    distance: tuple[float, ...]
    residual: tuple[str, ...]
    goal_ms: float | None = None
    probes: tuple[tuple[int, float], ...] = ()

    def first(self, count: int) -> DepthChoice:
        return replace(self, dropped=self.dropped[:count], distance=self.distance[:count])

    def describe(self) -> str:
        aimed = f" (auto: the model without them measured at or over {self.goal_ms:.3f} ms)" if self.goal_ms else ""
        return f"removed {len(self.dropped)} of {len(self.residual)} residual blocks{aimed}: {', '.join(self.dropped)}"

    def to_dict(self) -> dict:
        auto = {"auto_goal_ms": self.goal_ms, "auto_measured": [{"blocks": n, "p50_ms": ms} for n, ms in self.probes]}
        return {"dropped": list(self.dropped), "distance_after_each": [round(d, 6) for d in self.distance],
                "residual_blocks": list(self.residual)} | (auto if self.goal_ms is not None else {})  # fmt: skip


def check_drop_blocks(count, plan: str | None, counted_budget: bool, synthetic: bool) -> None:
    """A count of 0 or more, or auto (which needs a latency budget: it balances measured latency), not with a plan
    (the plan names its blocks), and the task's data to choose the blocks on; else BadInput."""
    if (count != AUTO and not (isinstance(count, int) and count >= 0)) or (count and plan):
        raise BadInput(f"--drop-blocks takes a count of 0 or more, or auto, and not with --plan (the plan names its"
                       f" blocks); got {count}")  # fmt: skip
    if count and synthetic:
        raise BadInput("--drop-blocks chooses the blocks whose removal moves the outputs least on the task's data:"
                       " pass --train or --calib DATA")  # fmt: skip
    if count == AUTO and counted_budget:
        raise BadInput("--drop-blocks auto balances measured latency: it needs --speedup or --latency-ms; give a"
                       " count of blocks with other budgets")  # fmt: skip


def choose_depth(model: nn.Module, example: torch.Tensor, batches: list, count: int | str,
                 measure: Callable[[nn.Module, str], float] | None = None,
                 goal_ms: float | None = None) -> DepthChoice:  # fmt: skip
    """``count`` blocks (choose_blocks), or with ``auto`` as many as keep the model without them, ``measure``d, at or
    over ``goal_ms`` (depth_goal_ms)."""
    if count != AUTO:
        return choose_blocks(model, example, batches, count)
    order = choose_blocks(model, example, batches, None)
    chosen, probes = deepest_within(
        goal_ms, len(order.dropped), lambda n: measure(without_blocks(model, order.first(n)), f"depth-{n}")
    )
    return replace(order.first(chosen), goal_ms=goal_ms, probes=tuple(probes))


def depth_goal_ms(baseline_ms: float, budget_ms: float) -> float:
    """How fast ``auto`` wants the model without its blocks: the geometric mean of the unpruned model's latency and
    the budget, so that depth gives about the square root of the speedup and channels the rest. Depth and width
    scaled together, as EfficientNet's compound scaling argues, rather than either alone: on EfficientNet-Lite0 at
    64×64 and 2x, 6 of its 9 residual blocks removed (1.46x by depth) kept more accuracy than channels alone, and
    more than 9 blocks (1.87x by depth) (README, "Depth")."""
    return math.sqrt(baseline_ms * budget_ms)


def deepest_within(goal_ms: float, count: int, measure: Callable[[int], float]) -> tuple[int, list[tuple[int, float]]]:
    """The most blocks n (0..``count``, in the chosen order) whose removal leaves the model at or over ``goal_ms``,
    by bisection on measured latencies (``measure(n)``), and the (n, ms) measured. Latency falls as blocks go, so
    a few measurements find it: at most 4 for EfficientNet-Lite0's 9 blocks."""
    low, high, probes = 0, count, []
    while low < high:
        middle = (low + high + 1) // 2
        probes.append((middle, measure(middle)))
        low, high = (middle, high) if probes[-1][1] >= goal_ms else (low, middle - 1)
    return low, probes


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


def without_blocks(model: nn.Module, choice: DepthChoice) -> nn.Module:
    """A copy of ``model`` with the chosen blocks bypassed."""
    return drop_blocks(copy_model(model), list(choice.dropped))
