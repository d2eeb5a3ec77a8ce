"""Stage 2: choose how many channels each group keeps, and which, for a given pruning amount.

This first version removes the same fraction from every group (the ratio the measure-and-adjust loop searches),
rounds each kept width to the target's channel multiple (runtimes run multiples of their SIMD or tensor-core width
fastest), and keeps a floor so that no layer collapses. Within a group the highest-scoring channels are kept.
"""

from __future__ import annotations

import math

import torch

from edgeprune.rewrite.plan import GroupPlan, Plan
from edgeprune.score.importance import ScoredGroup

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
        width = kept_width(group.channels, ratio, multiple)
        # topk then sort: the kept channels in their original order, ties broken by index for reproducibility
        order = torch.argsort(group.scores, descending=True, stable=True)[:width]
        groups.append(GroupPlan(module=group.module, channels=group.channels, kept=tuple(sorted(order.tolist()))))
    return Plan(model=model, input_shape=tuple(input_shape), method=method, ratio=ratio, groups=tuple(groups))
