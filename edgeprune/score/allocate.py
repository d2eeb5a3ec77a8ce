"""Stage 2: choose how many channels each group keeps, and which, to bring a predicted cost within a goal.

Two allocations. ``global`` (the default) spends the budget where it buys the most: it cuts, one channel multiple at
a time, whatever loses the least importance per unit of cost saved on this target (the cost model's prediction), so
cheap layers are spared and expensive ones cut. ``uniform`` removes the same fraction from every group, as
Torch-Pruning's default does; it stays for comparison. Both round kept widths to the target's channel multiple
(runtimes run multiples of their SIMD or tensor-core width fastest), keep a floor so that no layer collapses, and keep
the highest-scoring channels of each group.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from edgeprune.graph.plan import GroupPlan, Plan
from edgeprune.score.importance import ScoredGroup
from edgeprune.score.structure import Structure

MAX_RATIO = 0.9  # never remove more than 90% of a group: below that, accuracy collapses and nothing is recoverable


def kept_width(channels: int, ratio: float, multiple: int, min_keep_fraction: float = 1 - MAX_RATIO) -> int:
    """The width a group of ``channels`` keeps when a ``ratio`` of it is removed, rounded to ``multiple``.

    Rounds to the nearest multiple, never below one multiple or ``min_keep_fraction`` of the group, never above the
    original width. A group narrower than one multiple is kept whole: cutting it cannot give an aligned width.
    """
    if ratio <= 0 or channels <= multiple:
        return channels  # nothing to remove, or nothing aligned to remove: rounding alone must not cut channels
    wanted = channels * (1.0 - ratio)
    floor = max(multiple, math.ceil(channels * min_keep_fraction / multiple) * multiple)
    rounded = int(round(wanted / multiple)) * multiple
    return min(channels, max(floor, rounded))


def uniform_plan(
    scored: list[ScoredGroup], ratio: float, multiple: int, model: str, input_shape: tuple[int, ...], method: str
) -> Plan:
    """A plan that removes ``ratio`` of every group, keeping the best-scoring channels of each."""
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"ratio must be within [0, {MAX_RATIO}], got {ratio}")
    groups = []
    for group in scored:
        if group.scores is None:
            groups.append(GroupPlan(module=group.module, channels=group.channels, kept=tuple(range(group.channels))))
            continue
        width = kept_width(group.channels, ratio, group.step(multiple))
        groups.append(GroupPlan(module=group.module, channels=group.channels, kept=group.best(width)))
    return Plan(model=model, input_shape=tuple(input_shape), method=method, ratio=ratio, groups=tuple(groups))


GLOBAL_MIN_KEEP = 0.25  # global allocation may cut a cheap-to-keep layer hard, but never below a quarter of it
ALLOCATIONS = ("global", "uniform")
# The limit of ever steeper pricing: every group cut to the same fraction, the uniform ratio. Global allocation tries
# it beside its finite steepnesses (search/steepness.py): on RegNetX-200MF at 0.7 of its latency the uniform ratio
# with taylor's channel choice kept 0.280 top-1 agreement on held-out digits against 0.186-0.238 for steepness 0-4,
# and it reaches goals below GLOBAL_MIN_KEEP's floor (README, "Scorer benchmark").
UNIFORM_STEEPNESS = math.inf


def allocate(
    scored: list[ScoredGroup], structure: Structure, cost: Callable[[np.ndarray], float], goal: float,
    multiple: int, allocation: str, model: str, input_shape: tuple[int, ...], method: str, steepness: float = 0.0,
) -> Plan:  # fmt: skip
    """The plan whose predicted ``cost`` (latency, memory, params or MACs under a plan's widths) is within ``goal``
    at the least loss of importance: ``global`` allocation (with ``steepness``, see global_widths), or the
    ``uniform`` ratio that reaches it (also global allocation's choice at UNIFORM_STEEPNESS)."""
    if allocation == "uniform" or steepness == UNIFORM_STEEPNESS:
        return _uniform_for_goal(scored, structure, cost, goal, multiple, model, input_shape, method)
    widths = global_widths(scored, structure, cost, goal, multiple, steepness)
    return plan_from_widths(scored, widths, model, input_shape, method)


def global_widths(
    scored: list[ScoredGroup], structure: Structure, cost: Callable[[np.ndarray], float], goal: float, multiple: int,
    steepness: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """Per-group widths that keep the most importance per unit of cost saved, until the cost is within ``goal``.

    Greedy, one channel multiple at a time: the next cut is the one that loses the least importance per unit of
    predicted cost it saves. Scores in the same units in every group (taylor's loss estimates) are compared as they
    are; others (magnitudes: raw values differ by layer far more than usefulness does) after dividing each group's
    scores by their mean. Priorities change as other groups shrink, so they are refreshed lazily: a popped cut is
    re-priced and applied only if it is still the cheapest.

    ``steepness`` makes a layer dearer to cut the emptier it already is: a cut's price is multiplied by (the group's
    channels / its width after the cut) ** steepness. First-order scores add the losses of the channels removed as if
    each went alone; a layer cut to a quarter loses far more than that sum (measured: MobileNetV3's early expansion
    cut 64 → 16 at steepness 0 lost to uniform L1). 0 trusts the scores as they are; larger values spread the cuts
    towards uniform. Which one suits a model is measured on its data (search/steepness.py).

    Why it matters (measured, tools/bench_scorer.py): with magnitude scores normalised per group, every group's
    channels look alike and the greedy cuts where a channel saves the most time, the high-resolution early layers
    a trained network needs most; it lost to uniform L1 on three of four architectures. With taylor's loss
    estimates compared as they are, it beat uniform L1 on ResNet-18, MobileNetV3 and EfficientNet-Lite0 by
    0.21-0.35 of top-1 agreement, and lost on ConvNeXt-atto (0.70 vs 0.96; README, "Scorer benchmark").
    """
    widths = structure.full_widths()
    order: dict[int, np.ndarray] = {}  # group index → its scores in comparable units, ascending (removal order)
    steps: dict[int, int] = {}  # group index → channels cut at a time (ScoredGroup.step): a multiple, a head, tied sets
    prunable = [g for g in scored if g.scores is not None and g.channels > g.step(multiple)]
    comparable = bool(prunable) and all(g.comparable for g in prunable)
    shared = float(torch.cat([g.scores for g in prunable]).double().abs().mean()) if comparable else 0.0
    for group in prunable:
        scores = group.channel_scores().double().numpy()
        g = structure.groups.index(group.module)
        norm = shared if comparable else abs(scores.mean())
        order[g], steps[g] = np.sort(scores / max(norm, 1e-12)), group.step(multiple)
    current = cost(widths)

    def next_cut(g: int) -> tuple[float, int] | None:
        """(priority, width) of the group's next cut: to the next aligned width below that saves anything. A width
        the runtime lays out worse can cost more than a wider one (layerwise.py): it is stepped over, not stopped
        at, so the group can still be cut past it."""
        channels, unit = int(structure.channels[g]), steps[g]
        floor = max(unit, math.ceil(channels * GLOBAL_MIN_KEEP / unit) * unit)
        for width in range((int(widths[g]) - 1) // unit * unit, floor - 1, -unit):
            trial = widths.copy()
            trial[g] = width
            saved = current - cost(trial)
            if saved > 0:
                removed = channels - width
                lost = order[g][:removed].sum() - order[g][: int(channels - widths[g])].sum()
                return lost / saved * (channels / width) ** steepness, width
        return None  # no cut down to the floor saves anything: never worth the importance

    heap = [(cut[0], g) for g in order if (cut := next_cut(g)) is not None]
    heapq.heapify(heap)
    while heap and current > goal:
        stored, g = heapq.heappop(heap)
        if (cut := next_cut(g)) is None:
            continue
        fresh, width = cut
        if heap and fresh > heap[0][0] * (1 + 1e-9) and fresh > stored * (1 + 1e-9):
            heapq.heappush(heap, (fresh, g))  # another cut is cheaper now
            continue
        widths[g] = width
        current = cost(widths)
        if (following := next_cut(g)) is not None:
            heapq.heappush(heap, (following[0], g))
    return widths


def plan_from_widths(
    scored: list[ScoredGroup], widths: np.ndarray, model: str, input_shape: tuple[int, ...], method: str
) -> Plan:
    """The plan that keeps, in each group, its ``widths`` best-scoring channels (groups in ``scored``'s order)."""
    groups = []
    for group, width in zip(scored, widths, strict=True):
        width = int(width)
        if group.scores is None or width >= group.channels:
            groups.append(GroupPlan(module=group.module, channels=group.channels, kept=tuple(range(group.channels))))
            continue
        groups.append(GroupPlan(module=group.module, channels=group.channels, kept=group.best(width)))
    removed = 1 - float(np.sum(widths)) / float(sum(g.channels for g in scored))
    return Plan(model=model, input_shape=tuple(input_shape), method=method, ratio=round(removed, 4),
                groups=tuple(groups))  # fmt: skip


def rechoose_channels(plan: Plan, scored: list[ScoredGroup]) -> Plan:
    """``plan``'s widths, each cut group's channels chosen by ``scored``'s scores instead (groups matched by name;
    a group ``scored`` cannot score keeps the plan's choice). Global allocation's other channel choices: widths
    from the task's importance, channels by weight magnitude or energy (search/steepness.py says when and why)."""
    by_name = {g.module: g for g in scored}
    groups = []
    for group in plan.groups:
        other = by_name.get(group.module)
        if len(group.kept) < group.channels and other is not None and other.scores is not None:
            group = replace(group, kept=other.best(len(group.kept)))
        groups.append(group)
    return replace(plan, groups=tuple(groups))


def _uniform_for_goal(scored, structure, cost, goal, multiple, model, input_shape, method) -> Plan:
    """The least uniform ratio whose predicted cost is within ``goal`` (MAX_RATIO when none is)."""

    def at(ratio: float) -> Plan:
        return uniform_plan(scored, ratio, multiple, model, input_shape, method)

    low, high = 0.0, MAX_RATIO
    if cost(structure.widths_of(at(0.0))) <= goal:
        return at(0.0)
    for _ in range(14):  # rounding to the multiple makes cost a step function of the ratio: 14 halvings suffice
        middle = (low + high) / 2
        if cost(structure.widths_of(at(middle))) > goal:
            low = middle
        else:
            high = middle
    return at(high)
