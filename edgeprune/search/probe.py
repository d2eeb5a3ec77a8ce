"""The search's first step: find the groups that cannot be pruned safely in this model, so that a build keeps them
whole and names them instead of crashing.

torch-pruning follows most graphs, but not a reshape with a hard-coded channel count, a split by a fixed size, or
attention whose head count is an attribute (a pruned qkv projection then no longer reshapes into heads). Some it
follows wrongly, and the pruned model runs but feeds channels to the wrong layers (SKNet's path attention, viewed
path-major, which torch-pruning maps channel-major); rewrite/verify.py tells those apart. The probe prunes every
group at once, runs the model and checks it; only when that fails does it bisect the groups to find the culprits,
so a model that prunes cleanly costs one forward pass and one check.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.graph.groups import build_graph, prunable_groups
from edgeprune.rewrite.prune import apply_plan
from edgeprune.rewrite.verify import check_routing
from edgeprune.score.allocate import plan_from_widths, uniform_plan
from edgeprune.score.importance import ScoredGroup

PROBE_RATIO = 0.5


def grouped_conv_groups(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Groups whose channels pass through a grouped convolution that is not depthwise (ResNeXt, RegNet) and cannot
    be cut in whole tied sets: cutting other channels out of it leaves widths its ``groups`` does not divide, or
    mixes channels across its groups. A group is cut safely when every group of the conv loses the same positions,
    which its tied sets (graph/tp_compat.py) say, all of one size; the rest are kept whole."""
    names = {module: name for name, module in model.named_modules()}
    found = {}
    for root, group in prunable_groups(model, build_graph(model, example)):
        if len({len(tied) for tied in getattr(group, "edgeprune_tied", ())}) == 1:
            continue  # cut in whole sets: the same positions of every group of the conv
        for dep, _ in group or ():
            layer = dep.target.module
            if (
                isinstance(layer, nn.Conv2d)
                and layer.groups > 1
                and not layer.groups == layer.in_channels == layer.out_channels
            ):
                found[root] = (
                    f"its channels pass through grouped convolution {names.get(layer, '?')} (groups={layer.groups},"
                    " not depthwise), whose group structure torch-pruning does not keep"
                )
                break
    return found


def find_unprunable(
    model: nn.Module, example: torch.Tensor, scored: list[ScoredGroup], multiple: int, ratio: float = PROBE_RATIO,
    widths: dict[str, int] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Map each group root that breaks the model when pruned to the one-line reason; empty when all prune cleanly.

    A group breaks the model when pruning ``ratio`` of it (rounded to ``multiple``), or cutting it to its width in
    ``widths`` when given (a plan that failed), raises, changes the output's shape, or routes channels to the wrong
    layers (rewrite/verify.py, where it can tell). Groups that fail only together, not one by one, are all
    reported.
    """
    with torch.no_grad():
        expected = tuple(model(example).shape)

    def failure(names: list[str]) -> str | None:
        chosen = set(names)
        subset = [g if g.module in chosen else replace(g, scores=None) for g in scored]
        if widths is None:
            plan = uniform_plan(subset, ratio, multiple, "probe", tuple(example.shape), "probe")
        else:
            cut = np.array([widths.get(g.module, g.channels) for g in subset])
            plan = plan_from_widths(subset, cut, "probe", tuple(example.shape), "probe")
        try:
            pruned = apply_plan(model, plan, example, check_fit=False)  # the plan is made from this model
            with torch.no_grad():
                shape = tuple(pruned(example).shape)
        except Exception as exc:  # whatever the model's own code raises once its widths change
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        if shape != expected:
            return f"the output shape changes from {expected} to {shape}"
        routing = check_routing(model, plan, pruned, example)
        if not routing.ok:  # it runs, but computes something else: channels went to the wrong layers
            return (
                f"torch-pruning feeds its kept channels to the wrong layers (the pruned model is {routing.error:.1e}"
                " off the unpruned one with the cut channels silenced)"
            )
        return None

    def culprits(names: list[str]) -> dict[str, str]:
        reason = failure(names) if names else None
        if reason is None:
            return {}
        if len(names) == 1:
            return {names[0]: reason}
        half = len(names) // 2
        found = culprits(names[:half]) | culprits(names[half:])
        return found or dict.fromkeys(names, reason)  # they fail only together: keep them all whole

    grouped = grouped_conv_groups(model, example)
    return grouped | culprits([g.module for g in scored if g.scores is not None and g.module not in grouped])


def keep_unprunable_whole(ctx, strict: bool) -> None:
    """Find the groups that cannot be pruned safely (unscorable, or breaking the model) and keep them whole, saying
    which; with ``strict``, refuse them instead. ``ctx`` is the build's loop.SearchContext."""
    unprunable = {g.module: g.reason for g in ctx.scored if g.reason}
    unprunable |= find_unprunable(ctx.model, ctx.example, ctx.scored, ctx.target.channel_multiple)
    if not unprunable:
        return
    names = ", ".join(sorted(unprunable)[:6]) + (" ..." if len(unprunable) > 6 else "")
    if strict:
        first = next(iter(unprunable.values()))
        raise BadInput(f"--strict: {len(unprunable)} groups cannot be pruned safely ({names}): {first}")
    ctx.say(f"{len(unprunable)} of {len(ctx.scored)} groups cannot be pruned safely and are kept whole: {names}")
    ctx.keep_whole(unprunable)
