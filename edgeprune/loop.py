"""The measure-and-adjust loop: score once, then prune → export → measure until the measured latency fits.

Latency depends on the structure, not on the weight values, so the search runs cheap rounds on the pruned
structure and recovers accuracy once, at the end, on the structure that was chosen.

The search is over one number, the fraction of every group removed. Its first guess and its corrections come from a
small model of the target: latency ratio = (MACs ratio)^alpha, where MACs are counted exactly for any candidate
without exporting it, and alpha (how much of the MAC saving the runtime turns into time) is re-fitted on every
measurement. Measured rounds bracket the answer, so the search cannot oscillate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from edgeprune.backends import Artifact, Backend, Measurement
from edgeprune.device import LocalDevice
from edgeprune.rewrite.plan import Plan
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.score.allocate import MAX_RATIO, uniform_plan
from edgeprune.score.importance import ScoredGroup
from edgeprune.score.probe import find_unprunable
from edgeprune.target import Target

BAND_LOW = 0.9  # a round is accepted when its p50 is within [0.9·budget, 0.97·budget]
# The 3% guard below the budget: run-to-run noise on a shared machine is a few percent, so a round accepted at
# 0.995·budget re-measures over budget about half the time. Rounds in (0.97, 1]·budget are marginal: the search
# prunes a little more, and keeps them as a fallback.
GUARD = 0.97
AIM = (BAND_LOW + GUARD) / 2  # rounds aim at the middle of the band
INITIAL_ALPHA = 0.8  # CPU runtimes turn a MAC saving into somewhat less time saved (memory, fixed overheads)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """A measured round: its plan, MACs, params, the measurement, the artifact measured, and its latency as it
    compares with the budget (the p50 normalised to the baseline's conditions when a reference was timed alongside).
    """

    step: int
    plan: Plan
    macs: int
    params: int
    measurement: Measurement
    artifact: Artifact
    latency: float
    quality: float | None = None  # accuracy or fidelity on held-out data, before recovery

    def to_dict(self) -> dict:
        return {
            "step": self.step, "ratio": round(self.plan.ratio, 4), "latency_ms": self.measurement.latency(),
            "comparable_p50": self.latency, "macs": self.macs, "params": self.params, "quality": self.quality,
        }  # fmt: skip


@dataclass
class SearchContext:
    """What the search needs: the model, its scores, the target, the backend and where to put round artifacts."""

    model: nn.Module
    example: torch.Tensor
    scored: list[ScoredGroup]
    spec: str
    method: str
    target: Target
    backend: Backend
    device: LocalDevice
    workdir: Path
    say: Say = print
    reference: Artifact | None = None  # timed alongside every candidate (speedup budgets): the unpruned artifact
    unprunable: dict[str, str] = field(default_factory=dict)  # group root → why it is kept whole
    evaluate: Callable[[nn.Module], float] | None = None  # quality of a pruned model, for the report's trade-off plot
    _macs_cache: dict[float, tuple[Plan, int, int]] = field(default_factory=dict)

    def keep_whole(self, groups: dict[str, str]) -> None:
        """Keep these groups unpruned from now on; MACs computed for earlier plans no longer apply."""
        self.unprunable.update(groups)
        self.scored = [replace(g, scores=None) if g.module in self.unprunable else g for g in self.scored]
        self._macs_cache.clear()

    def plan_at(self, ratio: float) -> tuple[Plan, int, int]:
        """The plan for ``ratio`` with its MACs and params, computed once per ratio.

        torch-pruning's index mapping can fail at one width and not another (grouped convs, split/concat), so a
        plan that fails to prune or run is probed at its own ratio; the culprits are kept whole and it is retried.
        """
        ratio = round(ratio, 4)
        if ratio not in self._macs_cache:
            try:
                entry = self._prune_and_count(ratio)
            except Exception:
                found = find_unprunable(self.model, self.example, self.scored, self.target.channel_multiple, ratio)
                if not found:
                    raise
                self.say(f"at ratio {ratio:.3f}, {len(found)} more groups cannot be pruned safely: kept whole")
                self.keep_whole(found)
                entry = self._prune_and_count(ratio)
            self._macs_cache[ratio] = entry
        return self._macs_cache[ratio]

    def _prune_and_count(self, ratio: float) -> tuple[Plan, int, int]:
        plan = uniform_plan(
            self.scored, ratio, self.target.channel_multiple, self.spec, tuple(self.example.shape), self.method
        )
        return (plan, *count_macs_params(apply_plan(self.model, plan, self.example), self.example))

    def measure(self, model: nn.Module, name: str) -> tuple[Measurement, Artifact]:
        """Export ``model`` into its own folder of the work dir and benchmark it on the device."""
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        artifact = self.backend.export(model, self.example, directory, self.target)
        shape = tuple(self.example.shape)
        return self.backend.benchmark(artifact, shape, self.target, self.device, self.reference), artifact


def ratio_for_macs(ctx: SearchContext, macs_goal: float, low: float, high: float) -> float:
    """The ratio within [low, high] whose MACs are closest to ``macs_goal`` (MACs fall as the ratio grows).

    Bisection on exact MAC counts: each step prunes a copy and counts, which costs a fraction of a second and no
    export. Rounding to the channel multiple makes MACs a step function of the ratio, so 12 steps are plenty.
    """
    for _ in range(12):
        middle = (low + high) / 2
        if ctx.plan_at(middle)[1] > macs_goal:
            low = middle
        else:
            high = middle
    return round(high, 4)


def search(ctx: SearchContext, baseline: tuple[Measurement, Artifact], baseline_macs: int, budget_ms: float,
           max_rounds: int):  # fmt: skip
    """Run up to ``max_rounds`` measured rounds; return (accepted candidate or None, all candidates, unreachable)."""
    candidates: list[Candidate] = []
    baseline, baseline_artifact = baseline
    if baseline.p50 <= budget_ms:  # the unpruned model already fits: ship it as is
        plan, macs, params = ctx.plan_at(0.0)
        candidate = Candidate(0, plan, macs, params, baseline, baseline_artifact, baseline.p50)
        return candidate, [candidate], False
    alpha = INITIAL_ALPHA
    too_slow, too_fast = 0.0, MAX_RATIO  # ratio bracket: below too_slow is over budget, above too_fast over-pruned
    for step in range(1, max_rounds + 1):
        goal = min(1.0, AIM * budget_ms / baseline.p50) ** (1.0 / alpha)
        ratio = ratio_for_macs(ctx, goal * baseline_macs, too_slow, too_fast)
        if any(abs(c.plan.ratio - ratio) < 1e-4 for c in candidates):  # the model points at a measured ratio
            ratio = round((too_slow + too_fast) / 2, 4)
        plan, macs, _ = ctx.plan_at(ratio)
        ctx.say(f"round {step}: ratio {ratio:.3f}, {macs / baseline_macs:.0%} of the MACs; exporting and measuring ...")
        candidate = measure_plan(ctx, plan, baseline.p50, step, budget_ms)
        candidates.append(candidate)
        latency = candidate.latency
        if BAND_LOW * budget_ms <= latency <= GUARD * budget_ms:
            return candidate, candidates, False
        if latency > GUARD * budget_ms:
            if ratio >= MAX_RATIO - 1e-4:
                if latency > budget_ms:
                    return None, candidates, True  # the smallest model we make is still too slow
                break  # marginal at the most pruning we do: nothing further to try
            too_slow = max(too_slow, ratio)
        else:
            too_fast = min(too_fast, ratio)
        macs_ratio = macs / baseline_macs
        if 0 < macs_ratio < 1 and 0 < latency < baseline.p50:
            alpha = min(3.0, max(0.2, math.log(latency / baseline.p50) / math.log(macs_ratio)))
    # Out of rounds: the least-pruned candidate under the guard still meets the budget, with more pruning than
    # needed; failing that, the marginal candidate with the most room under the budget.
    guarded = [c for c in candidates if c.latency <= GUARD * budget_ms]
    if guarded:
        return max(guarded, key=lambda c: c.latency), candidates, False
    under = [c for c in candidates if c.latency <= budget_ms]
    return (min(under, key=lambda c: c.latency) if under else None), candidates, False


def measure_plan(ctx: SearchContext, plan: Plan, baseline_p50: float, step: int, budget_ms: float) -> Candidate:
    """Prune by ``plan``, export, measure: one round. Also how a pinned plan (--plan) is built without a search."""
    pruned = apply_plan(ctx.model, plan, ctx.example)
    macs, params = count_macs_params(pruned, ctx.example)
    measurement, artifact = ctx.measure(pruned, f"round-{step}")
    quality = ctx.evaluate(pruned) if ctx.evaluate else None
    latency = measurement.comparable_p50(baseline_p50)
    candidate = Candidate(step, plan, macs, params, measurement, artifact, latency, quality)
    alongside = ""
    if measurement.reference_p50:
        alongside = f", {measurement.reference_p50 / measurement.p50:.2f}x the unpruned model timed alongside"
    ctx.say(f"round {step}: p50 {measurement.p50:.3f} ms{alongside} (budget {budget_ms:.3f} ms)")
    return candidate


def budget_latency_ms(budget_kind: str, budget_value: float, baseline: Measurement) -> float:
    """The latency the build must reach: the budget itself, or the measured baseline divided by the speedup."""
    if budget_kind == "latency_ms":
        return budget_value
    if budget_kind == "speedup":
        return baseline.p50 / budget_value
    raise ValueError(f"budget kind {budget_kind} is not a latency")


def unreachable_message(candidates: list[Candidate], budget_ms: float, device: str, unreachable: bool) -> str:
    """One line saying what was reached, for a budget no round met, and what to change."""
    best = min(candidates, key=lambda c: c.latency)
    advice = "relax the budget or use a smaller model" if unreachable else "allow more --max-rounds or relax the budget"
    return (
        f"budget of {budget_ms:.3g} ms p50 not reached: the fastest candidate (ratio {best.plan.ratio:.2f}) ran at"
        f" {best.latency:.3f} ms on {device} after {len(candidates)} round(s); {advice}"
    )


@contextmanager
def timed(say: Say, what: str) -> Iterator[None]:
    """Say that ``what`` starts, and how long it took when it ends without an error."""
    start = time.perf_counter()
    say(f"{what} ...")
    yield
    say(f"{what}: done in {time.perf_counter() - start:.1f} s")
