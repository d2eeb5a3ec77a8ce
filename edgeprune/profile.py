"""`edgeprune profile`: measure how this model's latency responds to width on the target, and cache the fit.

A profile is a handful of plans of different widths (uniform cuts, and random per-group cuts so that the kinds of
layers can be told apart), each exported and measured on the target's own runtime. The latency model fitted to them
is what a build then starts from (builds add their own rounds to the same cache). Where the target's runtime cannot
run here, the command prints the roofline estimate from the profile's figures instead, and says so.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeprune.backends import get_backend
from edgeprune.backends.base import SLOW_STATE
from edgeprune.device import open_device
from edgeprune.errors import BadInput, EdgepruneError, raise_if_stopped
from edgeprune.estimate import EstimateDevice, measuring_device
from edgeprune.loop import SearchContext
from edgeprune.model import DEFAULT_MODEL, load_model
from edgeprune.rewrite.prune import apply_plan
from edgeprune.rounds import timed_beside_baseline
from edgeprune.score.allocate import plan_from_widths, uniform_plan
from edgeprune.score.costmodel import LatencyModel, new_model, profile_path
from edgeprune.score.importance import score_groups
from edgeprune.score.structure import read_structure
from edgeprune.search.probe import find_unprunable
from edgeprune.target import load_target

UNIFORM_RATIOS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class ProfileRow:
    name: str
    macs_fraction: float
    predicted_ms: float  # by the fit on the other samples (left out), or the estimate
    measured_ms: float | None


def run_profile(
    target_name: str, model_spec: str = DEFAULT_MODEL, weights: str | None = None,
    input_shape: tuple[int, ...] | None = None, device_url: str | None = None, samples: int = 10,
    trust_pickle: bool = False, say=print, quiet_ms: float | None = None,
) -> dict:  # fmt: skip
    """Profile ``model_spec`` on ``target_name``; return what was measured and where the fit is cached.
    ``quiet_ms``: the unpruned model's p50 out of the machine's slow state where it is known from elsewhere (an
    earlier timing on this machine): samples timed over SLOW_STATE times it are taken again, as against the
    quickest the profile itself sees. Unused where nothing is timed beside the unpruned model (a board over SSH)."""
    if samples < 4:
        raise BadInput("--samples must be at least 4 (the unpruned model, three uniform cuts)")
    target = load_target(target_name)
    loaded = load_model(model_spec, weights, input_shape, trust_pickle)
    model, example = loaded.module, loaded.input.example()
    scored, whole, structure, plans = _profile_plans(model, example, target, model_spec, samples)
    full = structure.full_widths()
    try:
        backend = get_backend(target.backend)
        backend.require()
        device = open_device(device_url or target.device)
        if isinstance(measuring_device(device, backend, target), EstimateDevice):
            raise BadInput(f"no device here runs {backend.name}; pass --device ssh://… to measure on the board")
    except EdgepruneError as exc:  # the runtime cannot run here: the roofline stands in, labelled as such
        latency = new_model(structure, target, "estimate")
        rows = [ProfileRow(name, structure.macs(structure.widths_of(p)) / structure.macs(full),
                           latency.predict(structure.widths_of(p)), None) for name, p in plans]  # fmt: skip
        return {"target": target.name, "model": model_spec, "source": latency.source, "not_measured": str(exc),
                "rows": rows, "cache": None, "kept_whole": sorted(whole)}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="edgeprune-profile-") as tmp:
        ctx = SearchContext(model, example, scored, model_spec, "profile", target, backend, device, Path(tmp), say)
        measured, retaken = _measure_samples(ctx, structure, plans, quiet_ms)
        runtime = measured[0][2].runtime
    baseline_p50, p50s = comparable_samples([m for _, _, m, _ in measured])
    measured = [(name, widths, p50, nodes) for (name, widths, _, nodes), p50 in zip(measured, p50s, strict=True)]
    latency = new_model(structure, target, runtime)
    for _, widths, p50, nodes in measured:
        if nodes:
            latency.add_nodes(widths, *nodes)
        latency.add(widths, p50)
    path = profile_path(target, runtime, structure)
    raise_if_stopped()  # Ctrl-C that a library swallowed: the cache is left as it was, as the CLI then says
    latency.save(path, runtime)
    return {"target": target.name, "model": model_spec, "source": latency.source, "not_measured": None,
            "rows": _held_out_rows(latency, structure, target, measured), "cache": str(path),
            "kept_whole": sorted(whole), "runtime": runtime, "baseline_p50": baseline_p50,
            "timed_beside": ctx.reference is not None, "retaken": [plans[i][0] for i in retaken],
            "quiet_ms": ctx.quiet_reference_ms}  # fmt: skip


def _profile_plans(model, example, target, model_spec: str, samples: int) -> tuple[list, set, object, list]:
    """The scored groups, the groups kept whole, the structure, and ``samples`` named plans to measure: the unpruned
    model, the uniform cuts, then random per-group cuts so that the kinds of layers vary independently."""
    scored = score_groups(model, example, "magnitude")  # latency depends on widths, not on which channels
    whole = {g.module for g in scored if g.reason} | set(
        find_unprunable(model, example, scored, target.channel_multiple)
    )
    scored = [replace(g, scores=None) if g.module in whole else g for g in scored]
    structure = read_structure(model, example, [g.module for g in scored])
    full = structure.full_widths()
    shape = tuple(example.shape)
    plans = [("unpruned", uniform_plan(scored, 0.0, target.channel_multiple, model_spec, shape, "profile"))]
    plans += [(f"uniform {r:.0%}", uniform_plan(scored, r, target.channel_multiple, model_spec, shape, "profile"))
              for r in UNIFORM_RATIOS]  # fmt: skip
    rng = np.random.default_rng(0)
    for i in range(samples - len(plans)):
        multiple = target.channel_multiple
        cut = np.maximum(
            multiple, np.round(structure.channels * rng.uniform(0.3, 1.0, len(full)) / multiple) * multiple
        )
        cut = np.where([g.scores is None for g in scored], structure.channels, np.minimum(cut, structure.channels))
        plans.append((f"random {i + 1}", plan_from_widths(scored, cut, model_spec, shape, "profile")))
    return scored, whole, structure, plans


def _measure_samples(ctx: SearchContext, structure, plans: list, quiet_ms: float | None) -> tuple[list, list[int]]:
    """Each plan exported and measured as (name, widths, measurement, node times), those taken in the machine's slow
    state taken again; and the indices of the plans taken again."""
    shape = tuple(ctx.example.shape)

    def take(folder: str, name: str, plan) -> tuple:
        pruned_plan, _, _ = ctx.checked_plan(lambda plan=plan: plan)
        measurement, artifact = ctx.measure(apply_plan(ctx.model, pruned_plan, ctx.example), folder)
        # Where the time goes, node by node, when the runtime can say: what the per-layer fit learns from.
        nodes = ctx.backend.node_times(artifact, shape, ctx.target, ctx.device, ctx.reference)
        return (name, structure.widths_of(pruned_plan), measurement, nodes), artifact

    measured = []
    for i, (name, plan) in enumerate(plans, 1):
        ctx.say(f"[{i}/{len(plans)}] {name}: exporting and measuring ...")
        sample, artifact = take(f"sample-{i}", name, plan)
        measured.append(sample)
        if i == 1 and timed_beside_baseline("latency_ms", ctx.device, math.inf, 0.0):
            # On this (shared) machine every sample is timed beside the unpruned model, as a build's rounds
            # are, and fitted as the ratio of the two: absolute p50s of one artifact spread by 30-80% here
            # from one benchmark to the next, the ratio far less (tools/bench_repeatability.py). A sample whose
            # reference ran in the machine's slow state is taken again, as a round is (backends/base.py).
            ctx.reference, ctx.quiet_reference_ms = artifact, min(sample[2].p50, quiet_ms or math.inf)
    # A sample is judged slow against the quickest the reference ran in the whole profile, not only before it:
    # a profile that began in the slow state (it lasts minutes) had nothing quicker to judge its first samples
    # by, and there a pruned model slows more than its reference, so the ratio misprices every cut
    # (docs/measurement.md). So are its per-node times, in a run of their own: RegNetX-200MF's unpruned model,
    # counted beside one sample, summed 1.295 ms against 0.81-0.91 beside the seven others. Those samples are
    # taken again now; the retake's own tries keep the quickest.
    levels = [_node_level(nodes, i == 0) for i, (*_, nodes) in enumerate(measured)]
    # The quickest counted beside a sample: the unpruned model's own count, taken alone, runs quicker than any
    # taken beside another model, and would call ordinary samples slow.
    quickest = min((level for level in levels[1:] if level), default=levels[0])
    retaken = [
        i for i, (_, _, m, _) in enumerate(measured)
        if _slow(m, i == 0, ctx.quiet_reference_ms) or (levels[i] and levels[i] > SLOW_STATE * quickest)
    ]  # fmt: skip
    for i in retaken:
        ctx.say(f"{plans[i][0]}: timed or counted in the machine's slow state (the unpruned model over {SLOW_STATE}x"
                " the quickest the profile saw it run); measuring again ...")  # fmt: skip
        # Its own folder: the unpruned model's first one holds the reference every timing runs beside.
        measured[i] = take(f"sample-{i + 1}-again", *plans[i])[0]
    return measured, retaken


def _held_out_rows(latency: LatencyModel, structure, target, measured: list) -> list[ProfileRow]:
    """One row per sample, its latency predicted by a fit on all the other samples."""
    rows, earlier = [], len(latency.samples) - len(measured)  # samples cached by earlier builds come first
    full_macs = structure.macs(structure.full_widths())
    for i, (name, widths, p50, _) in enumerate(measured):
        held_out = [s for j, s in enumerate(latency.samples) if j != earlier + i]
        nodes_held_out = [s for s in latency.node_samples if not np.array_equal(s[0], widths)]
        others = LatencyModel(structure, target, samples=held_out, node_samples=nodes_held_out,
                              precision=target.precision)  # fmt: skip
        others.fit()
        rows.append(ProfileRow(name, structure.macs(widths) / full_macs, others.predict(widths), p50))
    return rows


def _slow(measurement, unpruned: bool, quiet_ms: float | None) -> bool:
    """Whether a sample was timed in the machine's slow state: its reference ran that far over the quiet level, or,
    the unpruned model timed alone, it did."""
    if unpruned:
        return bool(quiet_ms) and measurement.p50 > SLOW_STATE * quiet_ms
    return measurement.in_slow_state(quiet_ms)


def _node_level(nodes: tuple | None, unpruned: bool) -> float | None:
    """The unpruned model's summed node time counted beside a sample's (its own, for the unpruned sample); None
    where nothing was counted beside it (a board over SSH): a sample's own sum says nothing of the machine."""
    if not nodes:
        return None
    found, reference_ms = nodes
    return reference_ms or (sum(node[2] for node in found) if unpruned else None)


def comparable_samples(measurements: list) -> tuple[float, list[float]]:
    """The unpruned model's p50 and every sample's p50 as it would have measured beside it. ``measurements[0]`` is
    the unpruned model, alone; the others carry its p50 timed alongside (``reference_p50``) or not. The unpruned
    p50 is the median of every time it was measured, so that one slow spell does not scale every sample."""
    unpruned = [measurements[0].p50] + [m.reference_p50 for m in measurements[1:] if m.reference_p50]
    baseline_p50 = float(np.median(unpruned))
    if len(unpruned) == 1:  # nothing was timed alongside (a board over SSH): the p50s as measured
        return baseline_p50, [m.p50 for m in measurements]
    return baseline_p50, [baseline_p50] + [m.comparable_p50(baseline_p50) for m in measurements[1:]]
