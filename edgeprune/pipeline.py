"""One build, in phases (the public ``edgeprune.build`` calls it): prepare → score → search → recover → ship.

prepare.py checks and loads every input before the first slow step, so bad input fails in a second with one line;
the score phase scores the channel groups (after the depth choice, where blocks go) and sets up the cost model; a
strategy per budget kind searches (strategies.py); recovery runs once, on the chosen structure; ship.py exports,
checks, measures and publishes, so that the output folder only ever appears complete.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace

import torch
from torch import nn

from edgeprune.aim import budget_latency_ms
from edgeprune.context import SearchContext
from edgeprune.device import LocalDevice
from edgeprune.errors import BadInput, BudgetNotMet
from edgeprune.estimate import EstimateDevice
from edgeprune.farm.executor import make_executor
from edgeprune.loop import learn_where_time_goes, remove_blocks
from edgeprune.options import BATCH, SCORE_BATCHES, STEEPNESS_BATCHES, BuildOptions
from edgeprune.outdir import new_workdir
from edgeprune.prepare import prepare
from edgeprune.report import build_report, unreachable_message
from edgeprune.rewrite.depth import with_dropped
from edgeprune.rewrite.judge import Judge
from edgeprune.rewrite.lowrank import basis_only, decomposed_copy, with_decomposition
from edgeprune.rewrite.prune import count_macs_params
from edgeprune.rewrite.recover import recover
from edgeprune.rounds import measure_plan, round_zero, timed, timed_beside_baseline
from edgeprune.score.costmodel import new_model, profile_path
from edgeprune.score.importance import score_groups, select_structures
from edgeprune.score.memory import artifact_memory_mb
from edgeprune.score.structure import read_structure
from edgeprune.score.vote import vote_scores
from edgeprune.search.probe import keep_unprunable_whole
from edgeprune.search.steepness import SteepnessChoice, other_channel_scores
from edgeprune.ship import check_met, export_and_check, publish_build
from edgeprune.stages import Baseline, Prepared, Scoring, SearchResult
from edgeprune.strategies import STRATEGIES

__all__ = ["SCORE_BATCHES", "BuildOptions", "build"]


def build(options: BuildOptions, say=print) -> dict:
    """Run one build and return its report; the output folder holds the artifact, plan.json and report.json.

    Raises BadInput (exit 2) for unusable input, BudgetNotMet (exit 1) when no candidate meets the budget or the
    artifact's outputs do not match PyTorch; in both cases nothing is left in the output folder.
    """
    started = time.perf_counter()
    prep = prepare(options, say)
    executor = make_executor(options.executor)  # last of the checks: it may start a local Ray instance
    workdir = new_workdir(prep.out)
    try:
        # On Ray the device (or pool) is held by actors: one benchmark per device at a time, from any worker.
        ctx = SearchContext(prep.model, prep.example, [], options.model, prep.method.name, prep.target, prep.backend,
                            executor.devices(prep.device), workdir / "rounds", say, executor=executor,
                            in_flight=options.in_flight, allocation=options.allocation,
                            compensating=options.compensate or prep.method.refits)  # fmt: skip
        ctx.calibration = prep.calib.x if prep.calib is not None else prep.score_set.x
        held_out = Judge(prep.model, prep.eval_set.batches(BATCH))
        ctx.evaluate = lambda pruned: held_out(pruned)[1]
        baseline = measure_baseline(prep, ctx, say)
        if options.plan:  # a pinned plan: no scoring, no search; the same plan gives the same artifact bytes
            say(f"replaying {options.plan} instead of searching")
            chosen = measure_plan(ctx, prep.pinned, baseline.measurement.p50, 1, baseline.budget_ms)
            scoring, found = Scoring(), SearchResult(chosen, [chosen])
        else:
            scoring = score(prep, ctx, baseline, say)
            found = search_budget(prep, ctx, baseline, scoring, say)
        pruned, recovery = recover_accuracy(prep, ctx, found, held_out, say)
        shipped = export_and_check(prep, ctx, pruned, recovery, found.chosen, baseline, workdir, say)
        report = build_report(prep, ctx, baseline, scoring, found, shipped, time.perf_counter() - started)
        check_met(report, baseline, found.chosen)
        return publish_build(prep, report, found.chosen, scoring.neighbours, workdir)
    finally:
        executor.close()
        if workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)


def measure_baseline(prep: Prepared, ctx: SearchContext, say) -> Baseline:
    """Measure the unpruned model; where candidates are timed beside it, it becomes their reference."""
    with timed(say, "measuring the unpruned model"):
        measurement, artifact = ctx.measure(prep.model, "baseline")
    macs, params = count_macs_params(prep.model, prep.example)
    budget, device = prep.budget, prep.device
    # MACs, params and memory budgets are counted or computed on the model, not timed: no latency judges them.
    budget_ms = math.inf if prep.counted else budget_latency_ms(budget.kind, budget.value, measurement)
    memory = artifact_memory_mb(artifact.files["onnx"], prep.target.precision)
    what = f"{budget.kind.replace('_', ' ')} {budget.value:g}" if prep.counted else f"{budget_ms:.3f} ms p50"
    say(f"baseline p50 {measurement.p50:.3f} ms on {device.label}; budget {what}")
    if timed_beside_baseline(budget.kind, device, measurement.p50, budget_ms):
        ctx.reference = artifact
        # The slow state is this machine's (backends/base.py): boards, whose speeds differ, are not judged by it.
        ctx.quiet_reference_ms = measurement.p50 if isinstance(device, LocalDevice) else None
    return Baseline(measurement, artifact, macs, params, artifact.size_bytes(), memory, budget_ms)


def score(prep: Prepared, ctx: SearchContext, baseline: Baseline, say) -> Scoring:
    """Remove residual blocks where the depth choice says so, score the channel groups by the method, and set up
    the cost model and global allocation's steepness for the search."""
    method, example = prep.method, prep.example
    scoring = list(prep.score_set.batches(BATCH))[: SCORE_BATCHES.get(method.scores_with, 4)]
    depth, probe, whole = choose_blocks(prep, ctx, baseline, scoring, say)
    decomposed, neighbours = [], []
    if method.decomposes:
        ctx.model, decomposed = decomposed_copy(ctx.model, example)
        say(f"{len(decomposed)} layers in SVD form (basis + mix): their basis vectors prune like channels")
    with timed(say, f"scoring channel groups ({method.name})"):
        ctx.scored = score_or_refuse(ctx.model, example, method.scores_with, scoring)
        if method.basis_only:
            ctx.scored = basis_only(ctx.scored, decomposed)
        if method.votes:
            ctx.scored, neighbours = vote_scores(ctx.scored, prep.entries, prep.embedding)
            say(f"votes from {len(neighbours)} earlier tasks, similarity "
                + ", ".join(f"{n['similarity']:.3f}" for n in neighbours))  # fmt: skip
        ctx.scored = select_structures(ctx.scored, prep.options.structures)
        keep_unprunable_whole(ctx, prep.options.strict)
    ctx.structure = read_structure(ctx.model, example, [g.module for g in ctx.scored])
    ctx.latency_model = new_model(ctx.structure, prep.target, baseline.measurement.runtime)
    start = None
    if depth and depth.dropped and not prep.counted:  # the search starts from the model without them, measured
        start = round_zero(ctx, ctx.plan_at(0.0), probe, baseline.measurement.p50, baseline.budget_ms)
    if not prep.counted and not decomposed and not isinstance(prep.device, EstimateDevice):
        ctx.nodes_device = prep.device  # the build's device (or pool) itself, not the executor's handle of it
        if not ctx.latency_model.node_samples:
            ctx.latency_model.borrow_nodes(whole)  # the whole model's profile where blocks were removed
            full = start.artifact if start else baseline.artifact
            learn_where_time_goes(ctx, full, ctx.structure.full_widths())
    set_up_steepness(prep, ctx, say)
    return Scoring(depth, start, tuple(decomposed), tuple(neighbours))


def choose_blocks(prep: Prepared, ctx: SearchContext, baseline: Baseline, scoring: list, say):
    """--drop-blocks: the residual blocks removed whole before channels are cut (loop.remove_blocks), where the
    model does not fit as it is: (the choice, its measurement of the model without them, the whole model's cost
    model), or Nones."""
    p50, budget_ms = baseline.measurement.p50, baseline.budget_ms
    if not (prep.drop_blocks and (prep.counted or p50 > budget_ms)):
        return None, None, None
    how = "as the bank voted" if prep.voted_blocks is not None else prep.drop_blocks
    importance = prep.method.scores_with
    with timed(say, f"choosing residual blocks to remove ({how})"):
        counts = lambda m: score_or_refuse(m, prep.example, importance, scoring[:4])  # noqa: E731 (64 samples a count)
        depth, found = remove_blocks(ctx, prep.drop_blocks, list(prep.score_set.batches(BATCH))[:STEEPNESS_BATCHES],
                                     p50, budget_ms, counts, baseline.measurement.runtime)  # fmt: skip
    say(depth.describe())
    return depth, found.measured, found.whole_cost


def set_up_steepness(prep: Prepared, ctx: SearchContext, say) -> None:
    """Global allocation's steepness: as given, or chosen on the task's batches at its first plan
    (search/steepness.py)."""
    options = prep.options
    if options.steepness is not None:
        ctx.steepness = SteepnessChoice(options.steepness, {}, 0)
    elif not prep.data.synthetic:
        ctx.steepness_batches = list(prep.score_set.batches(BATCH))[:STEEPNESS_BATCHES]
        if prep.calib is not None and not prep.calib.synthetic:  # the final refit fits on them too (recover)
            ctx.steepness_unlabelled = list(prep.calib.batches(BATCH))[:STEEPNESS_BATCHES]
        # Channels by magnitude or energy, judged beside the scores' own choice (search/steepness.py);
        # vote's channels are the earlier tasks' choice, which is its point.
        gradients = prep.method.scores_with in ("fisher", "taylor")
        if gradients and not prep.method.votes and options.allocation == "global":
            ctx.channel_scores = other_channel_scores(ctx.model, prep.example, ctx.steepness_batches, say)


def search_budget(prep: Prepared, ctx: SearchContext, baseline: Baseline, scoring: Scoring, say) -> SearchResult:
    """The budget kind's strategy (strategies.py); its cost model saved for the next build of this model whatever
    happens, and the accepted plan made to replay on the original model (decomposition, removed blocks)."""
    cost_model = {"started_from": ctx.latency_model.source}
    say(f"cost model: {cost_model['started_from']}; {prep.options.allocation} allocation")
    runtime = baseline.measurement.runtime
    try:
        found = STRATEGIES[prep.budget.kind](ctx, prep, baseline, scoring.start)
    finally:  # what this build measured makes the next build of this model start closer
        ctx.latency_model.save(profile_path(prep.target, runtime, ctx.structure), runtime)
        cost_model["after_build"] = ctx.latency_model.source
    chosen = found.chosen
    if chosen is None:
        raise BudgetNotMet(unreachable_message(found.candidates, baseline.budget_ms, prep.device.label,
                                               found.unreachable, ctx.unprunable, len(ctx.scored)))  # fmt: skip
    if scoring.decomposed:  # plan.json replays on the original model: it decomposes these layers first
        chosen = replace(chosen, plan=with_decomposition(chosen.plan, list(scoring.decomposed)))
    if scoring.depth:  # and it bypasses these blocks before anything else
        chosen = replace(chosen, plan=with_dropped(chosen.plan, list(scoring.depth.dropped)))
    return replace(found, chosen=chosen, cost_model=cost_model)


def recover_accuracy(prep: Prepared, ctx: SearchContext, found: SearchResult, held_out: Judge, say):
    """The model pruned by the accepted plan, its accuracy recovered once (rewrite/recover.py), and what it kept."""
    with timed(say, "recovering accuracy on the chosen structure"):
        steps = prep.options.recover_steps if prep.method.fine_tunes else 0
        return recover(prep.model, found.chosen.plan, prep.example, prep.score_set, prep.eval_set, steps,
                       ctx.compensating, BATCH, prep.aux, prep.calib, held_out)  # fmt: skip


def score_or_refuse(model: nn.Module, example: torch.Tensor, method: str, batches: list) -> list:
    """Score the groups; a model torch-pruning cannot trace at all is bad input, named in one line."""
    try:
        return score_groups(model, example, method, batches)
    except Exception as exc:  # raised from tracing the user's model
        raise BadInput(
            f"torch-pruning cannot follow this model's graph: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        ) from None
