"""The search: how steeply global allocation may empty a layer, chosen by the loss measured on the task's own data.

Global allocation trusts first-order scores, which price a deep cut of one layer as the sum of its channels'
losses one by one; how far that underrates the deep cut depends on the model (measured, tools/bench_scorer.py: it
held on ResNet-18 and EfficientNet-Lite0, where global allocation beat uniform L1 by 0.27-0.38 of top-1 agreement,
and not on MobileNetV3, RegNetX or ConvNeXt, where it lost). So the build does not guess: it makes the global plan
for the first goal at a few steepnesses (allocate.global_widths), prunes each, recovers it without gradient steps
as the final model will be (batch-norm recalibration, or the least-squares refit when the build compensates), and
keeps the steepness whose outputs are closest to the unpruned model's on the task's data. Every
later round uses the same steepness, so the rounds stay one family of plans that the loop can aim between; only
where fewer than two different plans reach the goal (nothing was compared) is the choice made again at the next plan.

The uniform ratio (allocate.UNIFORM_STEEPNESS, the limit of ever steeper pricing) is one of the candidates: where the
task's data says that equal cuts keep its outputs closer, the build takes them, and it reaches goals below global
allocation's floor. Only plans whose predicted cost is within the goal are compared: one over it keeps more and
would win by not doing what was asked.

Which channels a cut group keeps is a second choice made the same way. Each plan is also made with the same widths
and each cut group's channels chosen by other scores than the task's importance: weight magnitude, by L2 and by L1,
and energy (below). Fisher and taylor sum per-sample estimates; on ConvNeXt-atto with a couple of hundred digits,
fisher's ranking within a group was the noisier one, and at a uniform ratio of 0.5 its channels kept 0.831 held-out
top-1 agreement against L2's 0.874. On ResNet-18 the two were within a point or two of each other. L1 and L2 differ
too, and neither everywhere: at uniform ratios of 0.3-0.6 (batch norms recalibrated), L2's channels kept 6-8 points
more top-1 on RegNetX-200MF at 0.3-0.4, L1's 4 more on ConvNeXt-atto at 0.6, where a build that could only choose L2
kept 0.782 against Torch-Pruning's uniform L1 at the same widths, 0.834. With L1 among the choices, the uniform
ratio with L1's channels, Torch-Pruning's own plan, is always one of the candidates. Last, by the energy each
channel feeds the layers that read it (score/energy.py), from forward passes on the task's data alone: at a uniform
ratio of 0.3 it kept 0.943 top-1 agreement on ResNet-18 (L1 0.846, fisher 0.782) and 0.975 on ConvNeXt-atto (L1
0.961). The task's data decides between them all (README, "Scorer benchmark").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeprune.graph.plan import Plan
from edgeprune.rewrite.compensate import compensate
from edgeprune.rewrite.judge import Judge
from edgeprune.rewrite.prune import apply_plan
from edgeprune.rewrite.recover import recalibrate_batchnorm
from edgeprune.score.allocate import UNIFORM_STEEPNESS
from edgeprune.score.importance import score_groups

# 0: the scores as they are; 4: a layer at half width prices its cuts 16x; the last, the uniform ratio
STEEPNESSES = (0.0, 1.0, 2.0, 4.0, UNIFORM_STEEPNESS)
# Which channels a cut group keeps: the build's importance scores, the L2 or L1 magnitude of its weights, or the
# energy each channel feeds the layers that read it (score/energy.py): choice → score_groups' method for it (its
# "magnitude" is group L1, Torch-Pruning's default), and the choice's name in messages.
IMPORTANCE = "importance"
CHANNEL_CHOICES = {"l2": "l2", "l1": "magnitude", "energy": "energy"}
CHANNEL_NAMES = {"l2": "L2 magnitude", "l1": "L1 magnitude", "energy": "the energy they feed their readers"}
Candidate = tuple[float, str]  # (steepness, channel choice)


def steepness_name(steepness: float) -> str:
    return "uniform ratio" if steepness == UNIFORM_STEEPNESS else f"steepness {steepness:g}"


def candidate_name(candidate: Candidate) -> str:
    steepness, channels = candidate
    return steepness_name(steepness) + (f", channels by {CHANNEL_NAMES[channels]}" if channels != IMPORTANCE else "")


def _json_key(candidate: Candidate) -> str:
    steepness, channels = candidate
    name = "uniform" if steepness == UNIFORM_STEEPNESS else f"{steepness:g}"  # JSON has no infinity
    return name + ("" if channels == IMPORTANCE else f" {channels}")


@dataclass(frozen=True)
class SteepnessChoice:
    """The chosen steepness and channel choice, and what each tried candidate measured (None: its plan did not
    prune, or was over the goal)."""

    chosen: float
    losses: dict[Candidate, float | None]
    samples: int
    plans: int = 0  # the distinct plans within the goal that were compared (0: pinned, nothing was compared)
    over_goal: tuple[Candidate, ...] = ()  # the candidates whose plans were predicted over the goal: not compared
    channels: str = IMPORTANCE  # which channels a cut group keeps (IMPORTANCE or a key of CHANNEL_CHOICES)
    floor: bool = False  # no plan reached the goal: only the cheapest plans' channel choices were compared

    @property
    def settled(self) -> bool:
        """Pinned, or chosen between different plans within the goal. Where fewer than two reach it (a goal at or
        below the allocator's floor, where no layer can be cut further), the steepness went to the one plan that
        reaches it, or to the deepest, without the data saying anything, and it is chosen again at the next plan."""
        return not self.losses or (self.plans > 1 and not self.floor)

    def describe(self) -> str:
        name = candidate_name((self.chosen, self.channels))
        if not self.losses:
            return f"{name} (pinned)"

        def outcome(candidate: Candidate, distance: float | None) -> str:
            if distance is not None:
                return f"{distance:.4f}"
            return "over the goal" if candidate in self.over_goal else "failed"

        # At the floor every candidate is over the goal: only the cheapest, which were measured, are listed.
        shown = [(c, v) for c, v in self.losses.items() if v is not None or not self.floor]
        tried = ", ".join(f"{candidate_name(c)}: {outcome(c, v)}" for c, v in shown)
        if self.floor and self.plans > 1:
            return (f"{name} for now (no plan reaches the goal; the cheapest, by each channel choice, at an output"
                    f" distance on {self.samples} samples of {tried}; chosen again at the next)")  # fmt: skip
        if not self.settled:
            return f"{name} for now (fewer than two different plans reach the goal: chosen again at the next)"
        return f"{name} (output distance to the unpruned model on {self.samples} samples: {tried})"

    def to_dict(self) -> dict:
        chosen = "uniform" if self.chosen == UNIFORM_STEEPNESS else self.chosen  # a number, as before, or "uniform"
        return {"chosen": chosen, "channels": self.channels, "samples": self.samples, "settled": self.settled,
                "distance": {_json_key(c): v for c, v in self.losses.items()},
                "over_goal": [_json_key(c) for c in self.over_goal]}  # fmt: skip


def output_distance(student: nn.Module, teacher: nn.Module, batches: list) -> float:
    """Mean distance of ``student``'s outputs from ``teacher``'s on ``batches`` (Judge.distance)."""
    return Judge(teacher, batches).distance(student)


def choose_steepness(
    model: nn.Module, example: torch.Tensor, batches: list, make_plan: Callable[[float, str], Plan],
    steepnesses: tuple[float, ...] = STEEPNESSES, compensating: bool = False, unlabelled: list | None = None,
    cost: Callable[[Plan], float] | None = None, goal: float = math.inf, channels: tuple[str, ...] = (IMPORTANCE,),
    reference: nn.Module | None = None,
) -> SteepnessChoice:  # fmt: skip
    """The steepness and channel choice whose plan (``make_plan(steepness, channels)``, all for the same goal, for
    every steepness and each of ``channels``) keeps ``model``'s outputs closest on ``batches``, after the recovery
    without gradient steps that the build will do: batch-norm recalibration, or with ``compensating`` the
    least-squares refit, fitted on every other batch and judged on the rest (a plan cut deep in a few layers is the
    one a refit repairs best, so judging it unrefitted chose worse plans: README).
    ``unlabelled`` batches of the task (its --calib images beside --train) join the refit as they join the build's
    final one, half to fit and half to judge: the distance needs the unpruned model's outputs, not labels.
    Only plans whose predicted ``cost`` is within ``goal`` (default: all) are compared, and the same plan is measured
    once. Where fewer than two different plans are within it, none is measured (the choice is not settled): the one
    within it is chosen, or, where none is, the one predicted cheapest, the nearest to the goal. Where none is and
    the cheapest are several (one set of widths, with each channel choice), those are compared among themselves:
    RegNetX-200MF's uniform floor kept 0.20 cosine with fisher's channels, 0.39 with L1's (bench_curves); the
    steepness is still chosen again at the next plan. A plan that fails to prune is skipped (the loop's own checks
    deal with it if it is chosen anyway).
    ``reference`` (default: ``model``): the model the refit aims at and the distance is measured to, where that is not
    the model pruned: the model with every block, where the build removed some (loop.remove_blocks), as its final
    refit and its held-out judge do."""
    reference = model if reference is None else reference
    fit, judge = batches, batches
    if compensating:  # labelled first, then unlabelled: every other batch of each to fit, the rest to judge
        both = batches + (unlabelled or [])
        fit, judge = (both[::2], both[1::2]) if len(both) > 1 else (both, both)
    candidates = [(steepness, choice) for choice in channels for steepness in steepnesses]
    plans = {c: make_plan(*c) for c in candidates}
    keys = {c: tuple(g.kept for g in plan.groups) for c, plan in plans.items()}
    costs = {c: cost(plan) if cost else 0.0 for c, plan in plans.items()}
    over = tuple(c for c in candidates if costs[c] > goal * (1 + 1e-9))
    floor = len(over) == len(candidates)
    within = [c for c in candidates if c not in over]
    if floor:  # the cheapest plans, the nearest to the goal
        within = [c for c in candidates if costs[c] <= min(costs.values()) * (1 + 1e-9)]
    distinct = len({keys[c] for c in within})
    if (floor or len(candidates) > 1) and distinct < 2:  # nothing to compare
        chosen = min(within, key=lambda c: (costs[c], c[0])) if floor else within[0]
        return SteepnessChoice(chosen[0], dict.fromkeys(candidates), 0, 0 if floor else distinct, over, chosen[1])
    unpruned = Judge(reference, judge)  # its outputs on the judge's batches, computed once for every plan
    losses: dict[Candidate, float | None] = dict.fromkeys(candidates)  # None where over the goal or failed
    seen: dict[tuple, float | None] = {}
    for candidate in within:
        key = keys[candidate]
        if key not in seen:
            try:
                pruned = apply_plan(model, plans[candidate], example)
            except Exception:  # whatever the model's own code raises at these widths
                seen[key] = None
            else:
                if compensating:
                    compensate(reference, pruned, [x for x, _ in fit])
                else:
                    recalibrate_batchnorm(pruned, fit)
                seen[key] = unpruned.distance(pruned)
        losses[candidate] = seen[key]
    measured = {c: v for c, v in losses.items() if v is not None and np.isfinite(v)}
    # Ties (the same plan) go to the build's own scores, then to the lower steepness: the scores as they are, unless
    # the data says otherwise.
    order = {c: i for i, c in enumerate(candidates)}
    chosen = min(measured, key=lambda c: (measured[c], order[c])) if measured else within[0]
    return SteepnessChoice(chosen[0], losses, sum(len(x) for x, _ in judge), len(seen), over, chosen[1], floor)


def other_channel_scores(model: nn.Module, example: torch.Tensor, batches: list, say: Callable[[str], None]) -> dict:
    """The groups scored for each other choice of channels (CHANNEL_CHOICES). Energy runs the model on the
    task's data under hooks; where the model's own code fails there, that choice is left out and the build goes on."""
    choices = {}
    for choice, method in CHANNEL_CHOICES.items():
        try:
            choices[choice] = score_groups(model, example, method, batches)
        except Exception as exc:  # the graph traced already (the build's own scores): the model's code raised
            failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            say(f"channels by {CHANNEL_NAMES[choice]} not offered: {failure}")
    return choices
