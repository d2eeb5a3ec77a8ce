"""The measure-and-adjust search (loop.py, aim.py) on simulated targets: deterministic executors that time a target
the cost model's shape gets wrong, or that is busy once, so that the tests are about the search and not about this
machine's noise; nothing is exported."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from conftest import R18  # noqa: F401

from edgeprune.backends import Measurement, get_backend
from edgeprune.farm.executor import LocalExecutor
from edgeprune.farm.work import Evaluated
from edgeprune.loop import BAND_LOW, GUARD, SearchContext, search
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.rounds import confirm, measure_plans
from edgeprune.score.costmodel import new_model
from edgeprune.score.structure import read_structure
from edgeprune.target import load_target

TARGET = load_target("x86-openvino")


pytestmark = pytest.mark.usefixtures("private_cache")  # each test measures and caches afresh


class SkewedTarget(LocalExecutor):
    """An executor whose unit of work times a target that the cost model's shape gets wrong: its latency falls with
    the square of the MACs kept (12 ms at full width, 3 ms at half the MACs). Deterministic, so that the test is
    about the search and not about this machine's noise; nothing is exported."""

    def measure(self, model, example) -> Measurement:
        macs, _ = count_macs_params(model, example)
        self.full_macs = getattr(self, "full_macs", macs)
        p50 = 12.0 * (macs / self.full_macs) ** 2
        return Measurement(p50, p50, p50, p50, 100, "local", "simulated", 1)

    def map(self, function, shared, items, num_cpus=1) -> list:
        pruned = [apply_plan(shared.model, job.plan, shared.example) for job in items]
        return [Evaluated(0, 0, self.measure(model, shared.example), None) for model in pruned]


def test_rounds_between_two_measured_plans_aim_between_them(r18, r18_scored, example, tmp_path):
    """Once a round measured under the acceptance band (the unpruned model is over it), the next plan is aimed between
    the two by interpolation. Before, each round was corrected by the last one's error alone: on this target the
    rounds swung between 2.8 ms and the unpruned 12 ms and the build shipped 3.0 ms for a budget of 8 (4x for 1.5x);
    convnext_femto at 1.5x shipped 8% of its MACs (4.3x) that way in the sweep."""
    skewed = SkewedTarget()
    ctx = SearchContext(r18, example, r18_scored, R18, "magnitude", TARGET, get_backend("openvino"), None, tmp_path,
                        say=lambda _: None, executor=skewed)  # fmt: skip
    ctx.structure = read_structure(r18, example, [g.module for g in r18_scored])
    ctx.latency_model = new_model(ctx.structure, TARGET, "simulated")
    budget = 12.0 / 1.5
    chosen, candidates, unreachable = search(ctx, (skewed.measure(r18, example), None), budget, max_rounds=4)
    rounds = [round(c.latency, 2) for c in candidates]
    assert not unreachable and chosen is not None
    assert BAND_LOW * budget <= chosen.latency <= GUARD * budget, rounds
    assert candidates[0].latency < BAND_LOW * budget, rounds  # the first round is under the band ...
    assert all(c.latency < budget for c in candidates), rounds  # ... and no round went back over the budget


class _BusyOnce(SkewedTarget):
    """The skewed target, but its first measurement lands in a busy spell: three times its true latency."""

    def map(self, function, shared, items, num_cpus=1) -> list:
        done = super().map(function, shared, items, num_cpus)
        if not getattr(self, "busy_spell_over", False):
            self.busy_spell_over = True
            m = done[0].measurement
            done = [Evaluated(0, 0, replace(m, p50=3 * m.p50, p90=3 * m.p90, p99=3 * m.p99, mean=3 * m.mean), None)]
        return done


@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True])
def test_the_deepest_cut_is_measured_twice_before_a_budget_is_called_unreachable(r18, r18_scored, example,
                                                                                tmp_path, busy):  # fmt: skip
    """A build gave up after one round when the deepest plan it makes measured over budget: once in a busy spell
    it can measure 80% slow. That plan is measured again; only a second miss makes the budget unreachable."""
    skewed = _BusyOnce() if busy else SkewedTarget()
    ctx = SearchContext(r18, example, r18_scored, R18, "magnitude", TARGET, get_backend("openvino"), None, tmp_path,
                        say=lambda _: None, executor=skewed)  # fmt: skip
    ctx.structure = read_structure(r18, example, [g.module for g in r18_scored])
    ctx.latency_model = new_model(ctx.structure, TARGET, f"simulated-busy-{busy}")
    baseline = skewed.measure(r18, example)
    deepest, _, _ = ctx.plan_for(0.0, ctx.latency_model.roofline_ms)
    true_ms = skewed.measure(apply_plan(r18, deepest, example), example).p50
    # Reachable only by the deepest plan (in the middle of the band), or by nothing at all.
    budget = true_ms / (BAND_LOW + GUARD) * 2 if busy else true_ms / 2
    chosen, candidates, unreachable = search(ctx, (baseline, None), budget, max_rounds=4)
    assert [c.plan.groups == deepest.groups for c in candidates] == [True, True]
    if busy:
        assert not unreachable and chosen is candidates[1] and chosen.latency == pytest.approx(true_ms)
    else:
        assert unreachable and chosen is None


@pytest.mark.slow
@pytest.mark.parametrize("in_flight", [2, 4])
def test_candidates_in_flight_spread_over_the_band_and_take_fewer_rounds(r18, r18_scored, example, tmp_path, in_flight):
    """With several candidates per round their goals spread around the band, so the search needs fewer rounds on
    the target the cost model gets wrong (above: one candidate at a time takes 2), and ships one of them."""
    rounds = {}
    for k in (1, in_flight):
        skewed = SkewedTarget()
        ctx = SearchContext(r18, example, r18_scored, R18, "magnitude", TARGET, get_backend("openvino"), None,
                            tmp_path, say=lambda _: None, executor=skewed, in_flight=k)  # fmt: skip
        ctx.structure = read_structure(r18, example, [g.module for g in r18_scored])
        ctx.latency_model = new_model(ctx.structure, TARGET, f"simulated-{k}-{in_flight}")
        budget = 12.0 / 1.5
        chosen, candidates, _ = search(ctx, (skewed.measure(r18, example), None), budget, max_rounds=4)
        assert chosen is not None and BAND_LOW * budget <= chosen.latency <= GUARD * budget
        rounds[k] = max(c.step for c in candidates)
        per_round = [sum(c.step == step for c in candidates) for step in range(1, rounds[k] + 1)]
        assert per_round[0] == k  # the first round measures every candidate; later ones skip plans measured already
    assert rounds[in_flight] < rounds[1], rounds


class _LowFirst(SkewedTarget):
    """The skewed target, but every plan's first timing reads 8% fast (the unpruned model timed beside it caught a
    busy spell, so the ratio flatters the plan); timed again, it reads true."""

    def map(self, function, shared, items, num_cpus=1) -> list:
        done = super().map(function, shared, items, num_cpus)
        self.timed = getattr(self, "timed", {})
        out = []
        for job, evaluated in zip(items, done, strict=True):
            key = tuple(g.kept for g in job.plan.groups)
            m = evaluated.measurement
            self.timed[key] = self.timed.get(key, 0) + 1
            if self.timed[key] == 1:
                m = replace(m, p50=0.92 * m.p50)
            out.append(Evaluated(0, 0, m, None))
        return out


@pytest.mark.slow
def test_a_round_in_the_band_is_timed_again_before_it_is_accepted(r18, r18_scored, example, tmp_path):
    """A plan whose one timing put it in the band while it truly ran over the budget shipped nothing: its final
    artifact, timed three times, measured over. The accepted round is now timed twice, and both must be under the
    guard. On this target, accepting one timing shipped a plan truly 0.4% over a 3x budget (4 ms)."""
    target = _LowFirst()
    ctx = SearchContext(r18, example, r18_scored, R18, "magnitude", TARGET, get_backend("openvino"), None, tmp_path,
                        say=lambda _: None, executor=target)  # fmt: skip
    ctx.structure = read_structure(r18, example, [g.module for g in r18_scored])
    ctx.latency_model = new_model(ctx.structure, TARGET, "simulated-low-first")
    truth = SkewedTarget()
    truth.measure(r18, example), target.measure(r18, example)  # both scale by the unpruned model's MACs
    budget = 12.0 / 3
    # One plan, timed once (8% fast), then confirmed: the larger of both timings, and the cost model has both.
    plan, _, _ = ctx.plan_for(0.9 * budget)
    true_ms = truth.measure(apply_plan(r18, plan, example), example).p50
    once = measure_plans(ctx, [plan], 12.0, 1, budget)[0]
    samples = len(ctx.latency_model.samples)
    confirmed = confirm(ctx, once, 12.0, budget)
    assert once.latency == pytest.approx(0.92 * true_ms) and confirmed.latency == pytest.approx(true_ms)
    assert len(ctx.latency_model.samples) == samples + 1 and confirmed.plan is plan
    # In a search, the plan shipped truly meets the budget (without the second timing: 0.4% over).
    target = _LowFirst()  # no plan timed yet: every first timing reads fast
    ctx.executor = target  # a new executor: the shared inputs are sent to it anew
    ctx.latency_model = new_model(ctx.structure, TARGET, "simulated-low-first-search")
    chosen, candidates, _ = search(ctx, (target.measure(r18, example), None), budget, max_rounds=6)
    assert chosen is not None and chosen.latency <= GUARD * budget
    assert truth.measure(apply_plan(r18, chosen.plan, example), example).p50 <= budget


class _SlowStateAt(SkewedTarget):
    """The skewed target timed beside the unpruned model (12 ms quiet), with the timings numbered in ``slow`` (1 = the
    first) left in the machine's slow state after their retakes: the unpruned model alongside ran 1.45x its quiet
    p50 and the plan 1.7x, as measured here (backends/base.py), so the ratio reads the plan 17% slow."""

    def __init__(self, slow: set[int]) -> None:
        self.slow, self.count = slow, 0

    def map(self, function, shared, items, num_cpus=1) -> list:
        out = []
        for evaluated in super().map(function, shared, items, num_cpus):
            self.count += 1
            m = evaluated.measurement
            plan_factor, reference = (1.7, 1.45 * 12.0) if self.count in self.slow else (1.0, 12.0)
            out.append(Evaluated(0, 0, replace(m, p50=plan_factor * m.p50, reference_p50=reference), None))
        return out


@pytest.mark.parametrize(("slow", "baseline_slow"), [({1}, False), ({2}, False), ({2}, True), ({1, 2}, False)])
def test_a_timing_left_in_the_slow_state_does_not_outweigh_a_quiet_one(r18, r18_scored, example, tmp_path, slow,
                                                                        baseline_slow):  # fmt: skip
    """A round in the band timed twice is taken at the larger timing; but a timing whose reference ran in the slow
    state reads the plan ~15% slow, and took the demo's 2.17x round for 1.78x: two more rounds. Where one of the two
    is in that state, the other counts. A baseline timed in the slow state sets the quiet level too high to tell; the
    quickest reference seen since lowers it (the demo failed its final check so, twice in three builds)."""
    target = _SlowStateAt(slow)
    quiet = 1.45 * 12.0 if baseline_slow else 12.0
    ctx = SearchContext(r18, example, r18_scored, R18, "magnitude", TARGET, get_backend("openvino"), None, tmp_path,
                        say=lambda _: None, executor=target, quiet_reference_ms=quiet)  # fmt: skip
    ctx.structure = read_structure(r18, example, [g.module for g in r18_scored])
    ctx.latency_model = new_model(ctx.structure, TARGET, "simulated-slow-state")
    truth = SkewedTarget()
    truth.measure(r18, example), target.measure(r18, example)
    budget = 12.0 / 3
    plan, _, _ = ctx.plan_for(0.9 * budget)
    true_ms = truth.measure(apply_plan(r18, plan, example), example).p50
    confirmed = confirm(ctx, measure_plans(ctx, [plan], 12.0, 1, budget)[0], 12.0, budget)
    slow_ms = true_ms * 1.7 / 1.45
    assert confirmed.latency == pytest.approx(slow_ms if slow == {1, 2} else true_ms)
    assert ctx.quiet_reference_ms == (1.45 * 12.0 if slow == {1, 2} and baseline_slow else 12.0)


class _SlowSpell:
    """A backend whose machine is in its slow state for ``spell_s`` seconds from its first timing: the unpruned model
    alongside runs 1.45x its quiet p50, the pruned one 1.7x, so the ratio reads 17% slow (backends/base.py)."""

    def __init__(self, spell_s: float):
        self.spell_s, self.start, self.times = spell_s, None, []

    def benchmark(self, artifact, shape, target, device=None, reference=None, quiet_reference_ms=None) -> Measurement:
        now = time.monotonic()
        self.start = now if self.start is None else self.start
        slow = now - self.start < self.spell_s
        self.times.append(now - self.start)
        p50, reference_p50 = (0.28 * 1.7, 0.62 * 1.45) if slow else (0.28, 0.62)
        return Measurement(p50, p50, p50, p50, 100, "local", "simulated", 1, reference_p50=reference_p50)


@pytest.mark.slow
@pytest.mark.parametrize("pause_s", [0.0, 0.4])
def test_the_final_check_waits_out_a_slow_spell_before_it_fails_a_build(monkeypatch, pause_s):
    """A 2x build whose baseline was timed slow (0.90 ms: budget 0.45) accepted a round at 0.37 ms, then timed its
    final artifact three times back to back in a spell of the slow state, longer than the three tries, and failed
    (2026-12-05, 0.475 ms). With pauses that grow between the tries the third is taken after the spell and holds."""
    from types import SimpleNamespace

    from edgeprune import rounds

    monkeypatch.setattr(rounds, "FINAL_PAUSE_S", pause_s)
    backend, said = _SlowSpell(spell_s=1.0), []
    ctx = SimpleNamespace(example=torch.zeros(1, 3, 8, 8), backend=backend, target=TARGET, device=None,
                          reference="unpruned", quiet_reference_ms=0.62, say=said.append)  # fmt: skip
    baseline_p50, budget = 0.90, 0.45
    finals = rounds.measure_final(ctx, "artifact", baseline_p50, 0.37, budget)
    assert len(finals) == rounds.FINAL_TRIES and finals[0].comparable_p50(baseline_p50) > budget
    assert [m.startswith("final artifact measured") for m in said] == [True, True]
    if pause_s:
        assert backend.times[1] >= pause_s and backend.times[2] >= 3 * pause_s
        assert finals[-1].comparable_p50(baseline_p50) <= budget and "measuring again in 0.8 s" in said[-1]
    else:  # back to back, every try inside the spell: the build would fail
        assert all(m.comparable_p50(baseline_p50) > budget for m in finals)
