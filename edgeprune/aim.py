"""Where the next round of the search aims: the acceptance band, the goals of a round's candidates, and how a goal
in measured milliseconds becomes a goal in the cost model's units (loop.py asks the allocator for that).

Two ways: between two measured plans on either side of the band (interpolation), or the model's prediction scaled
by the last measurement's ratio to it (a correction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeprune.score.costmodel import LatencyModel

if TYPE_CHECKING:
    from edgeprune.backends import Measurement

# A round is accepted when its p50 is within [0.85·budget, 0.97·budget]. The band is wide because one pruned model
# measured again here, next to the unpruned one, gives speedups 15-60% apart (tools/bench_repeatability.py): a
# narrower band is missed by noise alone, round after round, for a few percent less pruning.
BAND_LOW = 0.85
# The 3% guard below the budget: with run-to-run noise on a shared machine, a round accepted at 0.995·budget
# re-measures over budget about half the time. Rounds in (0.97, 1]·budget are marginal: the search
# prunes a little more, and keeps them as a fallback.
GUARD = 0.97
AIM = (BAND_LOW + GUARD) / 2  # rounds aim at the middle of the band
NUDGE = 0.04  # when the model points at a plan already measured, aim this much further from where that one landed
SPREAD = 0.06  # with several candidates in flight, how far apart (× the middle of the band) their goals are set


def round_goals(budget_ms: float, in_flight: int) -> list[float]:
    """The latency goals of one round's candidates: the middle of the band for one; for several, spread around it
    (two land at the band's edges, four reach past it), so that a cost model off by more than the band still puts
    one candidate in it, or brackets it for the next round."""
    if in_flight <= 1:
        return [AIM * budget_ms]
    offsets = np.linspace(-1.0, 1.0, in_flight) * SPREAD * (in_flight - 1)
    return [AIM * budget_ms * (1 + o) for o in offsets]


@dataclass(frozen=True)
class Bracket:
    """The measured plans closest to the acceptance band from either side, with the latencies the refitted cost
    model predicts for them.

    Why it exists: where the model's shape is wrong (ConvNeXt's LayerNorms and GELUs cost time that MACs do not
    count), a fit corrected by the last round's error swings from one side of the band to the other. Measured on
    convnext_femto for 1.5x: 58% of the MACs measured 1.18x, the next round 8% (6.77x), the next 75% (1.12x), and
    the build shipped the 8% plan. Between two measured plans, the next one is aimed between them."""

    fast_ms: float  # measured: the slowest plan under the band
    slow_ms: float  # measured: the fastest plan over the guard
    fast_model: float  # the model's predictions for the same two plans
    slow_model: float


def bracketing(measured: list[tuple[np.ndarray, float]], budget_ms: float, model: LatencyModel) -> Bracket | None:
    """The Bracket of the ``measured`` (widths, latency) points, or None without points on both sides of the band
    (or when the model orders the two the other way round, so that its units cannot be interpolated)."""
    fast = [m for m in measured if m[1] < BAND_LOW * budget_ms]
    slow = [m for m in measured if m[1] > GUARD * budget_ms]
    if not fast or not slow:
        return None
    (fast_widths, fast_ms), (slow_widths, slow_ms) = max(fast, key=lambda m: m[1]), min(slow, key=lambda m: m[1])
    fast_model, slow_model = model.predict(fast_widths), model.predict(slow_widths)
    if slow_model <= fast_model:
        return None
    return Bracket(fast_ms, slow_ms, fast_model, slow_model)


def interpolated(bracket: Bracket, goal_ms: float | None = None, model_ms: float | None = None) -> float:
    """Linear interpolation between the bracket's two plans: a measured ``goal_ms`` to the model's units (kept
    within the middle 80% of the bracket, so that every round narrows it), or a prediction ``model_ms`` back to
    measured ms."""
    if goal_ms is not None:
        share = (goal_ms - bracket.fast_ms) / (bracket.slow_ms - bracket.fast_ms)
        return bracket.fast_model + min(max(share, 0.1), 0.9) * (bracket.slow_model - bracket.fast_model)
    share = (model_ms - bracket.fast_model) / (bracket.slow_model - bracket.fast_model)
    return bracket.fast_ms + share * (bracket.slow_ms - bracket.fast_ms)


@dataclass(frozen=True)
class Aim:
    """Measured ms ↔ the cost model's units for the next round: by interpolation inside a bracket, else by the
    correction. (A secant through the two measured plans nearest the band, both over it, was tried: in a simulated
    sweep of 24 targets it aimed exactly as the correction did, since the model refitted on those two plans
    already passes through both.)"""

    correction: float  # measured / predicted at the last round's central plan
    bracket: Bracket | None = None

    def to_model(self, goal_ms: float) -> float:
        return interpolated(self.bracket, goal_ms=goal_ms) if self.bracket else goal_ms / self.correction

    def to_ms(self, model_ms: float) -> float:
        return interpolated(self.bracket, model_ms=model_ms) if self.bracket else model_ms * self.correction

    @property
    def how(self) -> str:
        """How it aims, for the build's messages."""
        return "interpolation between two measured plans" if self.bracket else "the last round's correction"


def aim(measured: list[tuple[np.ndarray, float]], budget_ms: float, model: LatencyModel, correction: float) -> Aim:
    """How the next round aims, from the ``measured`` (widths, latency) points so far."""
    return Aim(correction, bracketing(measured, budget_ms, model))


def budget_latency_ms(budget_kind: str, budget_value: float, baseline: Measurement) -> float:
    """The latency the build must reach: the budget itself, or the measured baseline divided by the speedup."""
    if budget_kind == "latency_ms":
        return budget_value
    if budget_kind == "speedup":
        return baseline.p50 / budget_value
    raise ValueError(f"budget kind {budget_kind} is not a latency")
