"""The measure-and-adjust loop: score once, then prune → export → measure until the measured latency fits.

Latency depends on the structure, not on the weight values, so the search runs cheap rounds on the pruned
structure and recovers accuracy once, at the end, on the structure that was chosen.

Each round asks the allocator for the plan whose latency, as the cost model predicts it, sits in the middle of the
acceptance band; the plan is measured, and the measurement goes back into the cost model before the next round. The
model starts from the cached profile of this model on this target when there is one, and is always calibrated on
the measured unpruned model first, so the first round is already a prediction, not a guess.
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

from edgeprune.aim import AIM, BAND_LOW, GUARD, NUDGE, aim, round_goals
from edgeprune.backends import Artifact, Backend, Measurement
from edgeprune.device import Device, LocalDevice
from edgeprune.errors import BadInput, EdgepruneError
from edgeprune.farm.executor import LocalExecutor
from edgeprune.farm.work import BuildShare, CandidateJob, evaluate, export_and_measure
from edgeprune.rewrite.plan import Plan
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.score.allocate import allocate, rechoose_channels, uniform_plan
from edgeprune.score.costmodel import LatencyModel
from edgeprune.score.importance import ScoredGroup
from edgeprune.score.probe import find_unprunable
from edgeprune.score.steepness import IMPORTANCE, MAGNITUDE, SteepnessChoice, choose_steepness
from edgeprune.score.structure import Structure
from edgeprune.target import Target

Say = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """A measured round: its plan, MACs, params, the measurement, the artifact measured, and its latency as it
    compares with the budget (the p50 normalised to the baseline's conditions when a reference was timed alongside;
    for a round accepted in the band, the larger of its two timings).
    """

    step: int
    plan: Plan
    macs: int
    params: int
    measurement: Measurement
    artifact: Artifact
    latency: float
    quality: float | None = None  # accuracy or fidelity on held-out data, before recovery
    timed_again: float | None = None  # the second timing of a round accepted in the band (latency: the larger)
    again_slow_tries: tuple[float, ...] = ()  # the second timing's tries set aside in the slow state (reference p50s)
    predicted: float | None = None  # the cost model's latency for this plan, before it was measured
    memory_mb: float | None = None  # weights + peak live activations of its graph (memory budgets only)

    def to_dict(self) -> dict:
        return {
            "step": self.step, "ratio": round(self.plan.ratio, 4), "latency_ms": self.measurement.latency(),
            "comparable_p50": self.latency, "timed_again": self.timed_again, "predicted_ms": self.predicted,
            "timed_again_slow_tries_reference_p50": list(self.again_slow_tries),
            "memory_mb": self.memory_mb,
            "macs": self.macs, "params": self.params,
            "quality": self.quality,
        }  # fmt: skip


FINAL_TRIES = 3  # measurements of the final artifact, when it measures over budget while its round did not
MAX_REPROBES = 4  # plans re-made after keeping newly found culprits whole, before the build gives up
# A round measured this far off its prediction has its per-node times taken, so that the cost model learns where:
# ConvNeXt plans whose stage-0 stream OpenVINO reorders at one width measured 14% over (score/layerwise.py).
MISPRICED = 0.10


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
    device: Device
    workdir: Path
    say: Say = print
    reference: Artifact | None = None  # timed alongside every candidate (speedup budgets): the unpruned artifact
    # The baseline's p50, timed alone, on this machine: a timing whose reference ran far over it is taken again.
    quiet_reference_ms: float | None = None
    unprunable: dict[str, str] = field(default_factory=dict)  # group root → why it is kept whole
    evaluate: Callable[[nn.Module], float] | None = None  # quality of a pruned model, for the report's trade-off plot
    structure: Structure | None = None  # the layers and groups as numbers: costs of a plan without pruning a copy
    latency_model: LatencyModel | None = None
    allocation: str = "global"
    # Task batches global allocation's steepness is chosen on (score/steepness.py), at the first plan it makes; without
    # them (synthetic data), steepness 0. The choice, once settled (made between different plans), holds for every
    # later plan of the build.
    steepness_batches: list | None = None
    steepness_unlabelled: list | None = None  # the task's unlabelled batches: a compensating build's refit uses them
    steepness: SteepnessChoice | None = None
    # The same groups scored by weight magnitude (L2): global allocation's other choice of which channels a cut group
    # keeps, judged beside the build's own scores on the steepness batches (score/steepness.py). None: not offered.
    magnitude_scored: list[ScoredGroup] | None = None
    compensating: bool = False  # the build refits by least squares after pruning (steepness is judged after it too)
    calibration: torch.Tensor | None = None  # images a full-int8 export calibrates its ranges on
    executor: object = field(default_factory=LocalExecutor)  # where candidates are pruned, exported, measured
    nodes_device: Device | None = None  # where per-node times are taken (the build's device, not a pool); None: never
    in_flight: int = 1  # candidates per round, measured at once on an executor with workers
    _shared: tuple | None = None  # (what it was made from, the executor's handle of share())
    _macs_cache: dict[float, tuple[Plan, int, int]] = field(default_factory=dict)

    def keep_whole(self, groups: dict[str, str]) -> None:
        """Keep these groups unpruned from now on; MACs computed for earlier plans no longer apply."""
        self.unprunable.update(groups)
        self.scored = [replace(g, scores=None) if g.module in self.unprunable else g for g in self.scored]
        self._macs_cache.clear()

    def plan_at(self, ratio: float) -> tuple[Plan, int, int]:
        """The uniform plan for ``ratio`` with its MACs and params, computed once per ratio."""
        ratio = round(ratio, 4)
        if ratio not in self._macs_cache:
            self._macs_cache[ratio] = self.checked_plan(lambda: self._uniform(ratio))
        return self._macs_cache[ratio]

    def plan_for(self, goal: float, cost: Callable | None = None, choose: bool = True) -> tuple[Plan, int, int]:
        """The plan the allocator picks for a predicted ``cost`` (default: latency in ms) within ``goal``, with its
        MACs and params. With ``choose`` (default), a steepness not settled yet is chosen at this goal first."""

        def make(steepness: float | None = None, channels: str | None = None) -> Plan:
            if steepness is None:
                steepness = self.steepness.chosen if self.steepness else 0.0
                channels = self.steepness.channels if self.steepness else IMPORTANCE
            plan = allocate(self.scored, self.structure, cost or self.latency_model.predict, goal,
                            self.target.channel_multiple, self.allocation, self.spec, tuple(self.example.shape),
                            self.method, steepness)  # fmt: skip
            return rechoose_channels(plan, self.magnitude_scored) if channels == MAGNITUDE else plan

        unsettled = self.steepness is None or not self.steepness.settled
        if self.allocation == "global" and unsettled and self.steepness_batches and choose:
            first = self.steepness is None
            predict = cost or self.latency_model.predict
            self.steepness = choose_steepness(self.model, self.example, self.steepness_batches, make,
                                              compensating=self.compensating, unlabelled=self.steepness_unlabelled,
                                              cost=lambda plan: predict(self.structure.widths_of(plan)),
                                              goal=goal, channels=self.channel_choices())  # fmt: skip
            if first or self.steepness.settled:
                self.say(f"global allocation: {self.steepness.describe()}")
        return self.checked_plan(make)

    def channel_choices(self) -> tuple[str, ...]:
        """Which channels a cut group may keep: the build's scores, and by weight magnitude where it has those too."""
        return (IMPORTANCE, MAGNITUDE) if self.magnitude_scored else (IMPORTANCE,)

    def checked_plan(self, make: Callable[[], Plan]) -> tuple[Plan, int, int]:
        """Make a plan, prune a copy by it and count. torch-pruning's index mapping can fail at one width and not
        another (grouped convs, split/concat), so a plan that fails to prune or run is probed at its own widths;
        the culprits are kept whole and the plan is made again without them."""
        plan = make()
        for _ in range(MAX_REPROBES):
            try:
                return (plan, *count_macs_params(apply_plan(self.model, plan, self.example), self.example))
            except Exception as exc:  # whatever the model's own code raises at these widths
                failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            widths = {g.module: g.width for g in plan.groups}
            found = find_unprunable(self.model, self.example, self.scored, self.target.channel_multiple, widths=widths)
            if not found:
                break
            self.say(f"at the widths of this plan, {len(found)} more groups cannot be pruned safely: kept whole")
            self.keep_whole(found)
            # A plan made from fixed widths (edgeprune profile's samples) would cut them again: undo their cuts.
            plan = make()
            whole = [
                replace(g, kept=tuple(range(g.channels))) if g.module in self.unprunable else g for g in plan.groups
            ]
            plan = replace(plan, groups=tuple(whole))
        raise BadInput(f"torch-pruning cannot prune this model consistently at the widths the budget needs"
                       f" ({failure}); relax the budget, or pass --strict to list the groups")  # fmt: skip

    def _uniform(self, ratio: float) -> Plan:
        return uniform_plan(
            self.scored, ratio, self.target.channel_multiple, self.spec, tuple(self.example.shape), self.method
        )

    def share(self) -> BuildShare:
        """The inputs every candidate shares (farm/work.py)."""
        return BuildShare(self.model, self.example, self.target, self.backend.name, self.device, self.workdir,
                          self.reference, self.quiet_reference_ms, self.calibration)  # fmt: skip

    def measure(self, model: nn.Module, name: str) -> tuple[Measurement, Artifact]:
        """Export ``model`` into its own folder of the work dir and benchmark it on the device, in this process."""
        return export_and_measure(self.share(), model, name)


def search(ctx: SearchContext, baseline: tuple[Measurement, Artifact], budget_ms: float, max_rounds: int):
    """Run up to ``max_rounds`` measured rounds; return (accepted candidate or None, all candidates, unreachable)."""
    candidates: list[Candidate] = []
    baseline, baseline_artifact = baseline
    model = ctx.latency_model
    if baseline.p50 <= budget_ms:  # the unpruned model already fits: ship it as is
        plan, macs, params = ctx.plan_at(0.0)
        candidate = Candidate(0, plan, macs, params, baseline, baseline_artifact, baseline.p50)
        return candidate, [candidate], False
    model.add(ctx.structure.full_widths(), baseline.p50)  # calibrate on what the unpruned model measured
    # Today's machine against the fit: samples cached on a quieter or busier day outnumber this build's, so the
    # fit alone can miss by the same factor round after round. Each round aims by the ratio of the last
    # measurement to the fit's prediction for it.
    correction = baseline.p50 / max(model.predict(ctx.structure.full_widths()), 1e-9)
    for step in range(1, max_rounds + 1):
        # The unpruned model is a measured point too: after a first round under the band, it is the other side.
        measured = [(ctx.structure.full_widths(), baseline.p50)]
        measured += [(ctx.structure.widths_of(c.plan), c.latency) for c in candidates]
        # Between two plans measured on either side of the band, the goal is set in the refitted model's own units
        # from its predictions for them; else by the last correction (aim.py).
        aiming = aim(measured, budget_ms, model, correction)
        plans, goals = [], []
        for goal in round_goals(budget_ms, ctx.in_flight):
            plan, macs, _ = ctx.plan_for(aiming.to_model(goal))
            repeat = next((c for c in candidates if c.plan.groups == plan.groups), None)
            if repeat is not None:  # the refitted model still picks a plan measured already: aim past it
                goal *= (1 - NUDGE) if repeat.latency > GUARD * budget_ms else (1 + NUDGE)
                plan, macs, _ = ctx.plan_for(aiming.to_model(goal))
            known = [c.plan for c in candidates] if ctx.in_flight > 1 else []  # one alone is measured again
            if all(plan.groups != other.groups for other in plans + known):  # close goals can pick one plan
                plans.append(plan)
                goals.append(goal)
        if not plans:  # every goal picked a plan measured already: the band falls between two neighbouring plans
            break
        predictions = []
        for plan in plans:
            raw = model.predict(ctx.structure.widths_of(plan))
            predictions.append(aiming.to_ms(raw))
            macs = ctx.structure.macs(ctx.structure.widths_of(plan)) / ctx.structure.macs(ctx.structure.full_widths())
            ctx.say(f"round {step}: {macs:.0%} of the MACs, predicted {predictions[-1]:.3f} ms (aimed by"
                    f" {aiming.how}); exporting and measuring ...")  # fmt: skip
        measured_now = measure_plans(ctx, plans, baseline.p50, step, budget_ms)
        measured_now = [replace(c, predicted=p) for c, p in zip(measured_now, predictions, strict=True)]
        candidates += measured_now
        for candidate, predicted in zip(measured_now, predictions, strict=True):
            widths = ctx.structure.widths_of(candidate.plan)
            model.add(widths, candidate.latency)
            off = candidate.latency / predicted - 1
            if abs(off) > MISPRICED and learn_where_time_goes(ctx, candidate.artifact, widths):
                ctx.say(f"round {step}: measured {off:+.0%} off its prediction; its per-node times now price the"
                        " next round")  # fmt: skip
        in_band = [c for c in measured_now if BAND_LOW * budget_ms <= c.latency <= GUARD * budget_ms]
        # The least pruned of the round's candidates that landed in the band and stays under the guard timed again.
        for best in sorted(in_band, key=lambda c: -c.latency):
            confirmed = confirm(ctx, best, baseline.p50, budget_ms)
            candidates[candidates.index(best)] = confirmed
            measured_now[measured_now.index(best)] = confirmed
            if confirmed.latency <= GUARD * budget_ms:
                return confirmed, candidates, False
        # What the refitted model still misses at the plan aimed nearest the middle of the band (the refit already
        # learned the rest: correcting by the error of the model before it double-counts, and rounds swung past
        # the band and back).
        central = min(range(len(goals)), key=lambda i: abs(goals[i] - AIM * budget_ms))
        widths = ctx.structure.widths_of(measured_now[central].plan)
        correction = measured_now[central].latency / max(model.predict(widths), 1e-9)
        # The round's deepest plan: when even it is over, did the allocator reach its goal?
        deepest = min(range(len(goals)), key=lambda i: goals[i])
        latency, predicted, plan = measured_now[deepest].latency, predictions[deepest], plans[deepest]
        if latency > GUARD * budget_ms and predicted > goals[deepest] * 1.02:  # the allocator did not reach it
            # The most it can cut, whatever the fit says; at goal 0 every steepness makes that plan: none chosen there.
            most, _, _ = ctx.plan_for(0.0, model.roofline_ms, choose=False)
            if most.groups != plan.groups:
                model.use_scaled_roofline()  # a fit with too large a fixed time on noisy samples: cut further
                ctx.say("the fitted cost model cannot reach the budget; predicting with the scaled roofline")
            elif latency > budget_ms and not any(c.latency <= budget_ms for c in candidates):
                # The smallest model we make is still too slow, unless that one measurement was a busy spell: one
                # plan measured 0.88 and 0.49 ms in two builds here (RegNetX-200MF). Measured twice, it is final.
                if sum(c.plan.groups == plan.groups for c in candidates) >= 2 or step == max_rounds:
                    return None, candidates, True
                ctx.say("the most this allocation cuts measured over the budget: measuring it once more")
            else:
                break  # marginal at the most pruning we do, or an earlier round already met the budget
    # Out of rounds: the least-pruned candidate under the guard still meets the budget, with more pruning than
    # needed; failing that, the marginal candidate with the most room under the budget.
    guarded = [c for c in candidates if c.latency <= GUARD * budget_ms]
    if guarded:
        return max(guarded, key=lambda c: c.latency), candidates, False
    under = [c for c in candidates if c.latency <= budget_ms]
    return (min(under, key=lambda c: c.latency) if under else None), candidates, False


def learn_where_time_goes(ctx: SearchContext, artifact: Artifact, widths) -> bool:
    """Add ``artifact``'s per-node times (its plan has ``widths``) to the cost model, where the runtime gives them:
    each layer is then priced by what it measured, and the nodes after it at this width (score/layerwise.py). A
    refinement: where they cannot be taken, the build goes on with the whole-model fit, and says so."""
    if ctx.nodes_device is None:
        return False
    reference = ctx.reference if ctx.reference is not artifact else None  # the unpruned model is its own reference
    try:
        nodes = ctx.backend.node_times(artifact, tuple(ctx.example.shape), ctx.target, ctx.nodes_device, reference)
    except EdgepruneError as exc:
        ctx.say(f"per-node times not taken ({exc}); the cost model fits whole-model latencies only")
        ctx.nodes_device = None
        return False
    if nodes:
        ctx.latency_model.add_nodes(widths, *nodes)
    return bool(nodes)


def confirm(ctx: SearchContext, candidate: Candidate, baseline_p50: float, budget_ms: float) -> Candidate:
    """The candidate timed once more, its latency the larger of both times: accepted, it is under the guard both
    times. Timed beside the unpruned model, a plan's latency is a ratio of two timings, and either can land in a
    busy spell: rounds measured 6-8% under what their final artifacts then measured three times (over the budget,
    so the builds shipped nothing). The mean of two such timings still errs by half that, more than the guard's 3%.
    Accepting a round on two timings costs one more export and benchmark of the plan (through the executor, as
    every round is), not a round; the cost model learns from both."""
    again = measure_plans(ctx, [candidate.plan], baseline_p50, f"{candidate.step}-again", budget_ms, quality=False)[0]
    ctx.latency_model.add(ctx.structure.widths_of(candidate.plan), again.latency)
    latency = max(candidate.latency, again.latency)
    ctx.say(f"round {candidate.step}: timed again, {again.latency:.3f} ms; taken as {latency:.3f} ms")
    return replace(candidate, latency=latency, timed_again=again.latency,
                   again_slow_tries=again.measurement.slow_tries)  # fmt: skip


def measure_plan(ctx: SearchContext, plan: Plan, baseline_p50: float, step: int, budget_ms: float) -> Candidate:
    """Prune by ``plan``, export, measure: one round. Also how a pinned plan (--plan) is built without a search."""
    return measure_plans(ctx, [plan], baseline_p50, step, budget_ms)[0]


def measure_plans(ctx: SearchContext, plans: list[Plan], baseline_p50: float, step: int | str, budget_ms: float,
                  quality: bool = True):  # fmt: skip
    """The candidates of one round, evaluated on the executor (farm/work.py): all at once where it has workers;
    with ``quality``, each one's held-out quality before recovery too (for the report's trade-off plot)."""
    names = [f"round-{step}" if len(plans) == 1 else f"round-{step}-{i + 1}" for i in range(len(plans))]
    key = (id(ctx.model), ctx.reference, ctx.quiet_reference_ms)
    if ctx._shared is None or ctx._shared[0] != key:  # sent to the workers once per build, not once per candidate
        ctx._shared = (key, ctx.executor.share(ctx.share()))
    jobs = [CandidateJob(plan, name) for plan, name in zip(plans, names, strict=True)]
    candidates = []
    for plan, done in zip(plans, ctx.executor.map(evaluate, ctx._shared[1], jobs), strict=True):
        held_out = ctx.evaluate(apply_plan(ctx.model, plan, ctx.example)) if ctx.evaluate and quality else None
        measurement = done.measurement
        latency = measurement.comparable_p50(baseline_p50)
        candidates.append(Candidate(step, plan, done.macs, done.params, measurement, done.artifact, latency, held_out))
        alongside = ""
        if measurement.reference_p50:
            alongside = f", {measurement.reference_p50 / measurement.p50:.2f}x the unpruned model timed alongside"
        limit = f" (budget {budget_ms:.3f} ms)" if math.isfinite(budget_ms) else ""
        ctx.say(f"round {step}: p50 {measurement.p50:.3f} ms{alongside}{limit}{slow_state(measurement)}")
    return candidates


def slow_state(measurement: Measurement) -> str:
    """What a message says of timings set aside because the machine was in its slow state (backends/base.py)."""
    if not measurement.slow_tries:
        return ""
    ran = ", ".join(f"{ms:.3f}" for ms in measurement.slow_tries)
    return (
        f"; {len(measurement.slow_tries)} timing(s) set aside, the unpruned model alongside ran {ran} ms"
        f" (slow machine), against {measurement.reference_p50:.3f} ms in the one kept"
    )


def measure_final(ctx: SearchContext, artifact, baseline_p50: float, round_latency: float, budget_ms: float) -> list:
    """Benchmark the final artifact and return every try (one, unless the machine was busy).

    The final artifact has the accepted round's structure, so the same latency. When it measures over budget while
    its round did not, something else was using the machine (contention only ever adds time): measure again, at
    most FINAL_TRIES times in all. The report lists every try.
    """
    shape = tuple(ctx.example.shape)
    quiet = ctx.quiet_reference_ms  # no retake without a reference: nothing was timed beside the candidate
    finals = [ctx.backend.benchmark(artifact, shape, ctx.target, ctx.device, ctx.reference, quiet)]
    while finals[-1].comparable_p50(baseline_p50) > budget_ms >= round_latency and len(finals) < FINAL_TRIES:
        ctx.say(f"final artifact measured {finals[-1].comparable_p50(baseline_p50):.3f} ms, its round"
                f" {round_latency:.3f} ms: busy machine; measuring again")  # fmt: skip
        finals.append(ctx.backend.benchmark(artifact, shape, ctx.target, ctx.device, ctx.reference, quiet))
    return finals


def timed_beside_baseline(kind: str, device, baseline_p50: float, budget_ms: float) -> bool:
    """Whether candidates are timed alongside the unpruned model. A speedup is a ratio: always, so that a slow
    spell of the machine slows both and cancels out. A ms budget that needs pruning, measured on this (shared)
    machine: too, and judged on the p50 as it would have measured beside the baseline, since absolute p50s drift
    by tens of percent between rounds here and rounds chased the drift (tools/bench_scorer.py). Not on a board
    over SSH, the user's own, where it would only double the time of every round."""
    if kind == "speedup":
        return True
    return kind == "latency_ms" and isinstance(device, LocalDevice) and baseline_p50 > budget_ms


@contextmanager
def timed(say: Say, what: str) -> Iterator[None]:
    """Say that ``what`` starts, and how long it took when it ends without an error."""
    start = time.perf_counter()
    say(f"{what} ...")
    yield
    say(f"{what}: done in {time.perf_counter() - start:.1f} s")
