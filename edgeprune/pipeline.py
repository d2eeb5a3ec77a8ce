"""One build, through the four stages (the public ``edgeprune.build`` calls it): target → score →
(measure-and-adjust: rewrite → export → measure) → recover, export, validate → out/.

Everything is checked before the first slow step (target, backend, device, model, data, output folder), so bad
input fails in a second with one line, and the output folder only ever appears complete.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from edgeprune.adapt import adapt_to_task
from edgeprune.aim import budget_latency_ms
from edgeprune.backends import get_backend
from edgeprune.budgets import COUNTED, fit_counted_budget, fit_memory_budget
from edgeprune.data import labels_in_label_space, load_dataset, split_held_out
from edgeprune.device import LocalDevice, open_device
from edgeprune.errors import BadInput, BudgetNotMet
from edgeprune.estimate import EstimateDevice, measuring_device
from edgeprune.farm.executor import make_executor
from edgeprune.farm.pool import pool_status
from edgeprune.html import write_html
from edgeprune.loop import SearchContext, learn_where_time_goes, remove_blocks, search
from edgeprune.model import DEFAULT_MODEL, load_model
from edgeprune.outdir import claim_output, input_paths, new_workdir, publish
from edgeprune.report import unreachable_message, versions, write_json
from edgeprune.rewrite.depth import residual_blocks, with_dropped
from edgeprune.rewrite.judge import Judge
from edgeprune.rewrite.lowrank import basis_only, decomposed_copy, with_decomposition
from edgeprune.rewrite.plan import Plan
from edgeprune.rewrite.prune import count_macs_params
from edgeprune.rewrite.recover import recover
from edgeprune.rounds import measure_final, measure_plan, round_zero, timed, timed_beside_baseline
from edgeprune.score.allocate import ALLOCATIONS
from edgeprune.score.costmodel import new_model, profile_path
from edgeprune.score.depth import check_drop_blocks
from edgeprune.score.importance import STRUCTURES, score_groups, select_structures
from edgeprune.score.memory import artifact_memory_mb
from edgeprune.score.probe import keep_unprunable_whole
from edgeprune.score.steepness import SteepnessChoice, other_channel_scores
from edgeprune.score.structure import read_structure
from edgeprune.score.vote import load_entries, nearest, save_entry, task_embedding, vote_blocks, vote_scores
from edgeprune.target import Budget, load_target
from edgeprune.validate import (
    MANIFEST,
    REFERENCE_INPUTS,
    REFERENCE_OUTPUTS,
    file_hashes,
    input_hashes,
    read_key,
    write_manifest,
)

# compensate: taylor selection (with magnitude, a 2x build stayed at chance: README), then the closed-form
# least-squares refit; no gradient step. lowrank: prune SVD basis vectors; double: basis vectors and channels under
# one budget (rewrite/lowrank.py). vote: the kept channels of the nearest earlier tasks in --bank, within each
# group's worth by fisher on this task (score/vote.py). auto: fisher on the task's data, magnitude without data.
METHODS = ("auto", "magnitude", "taylor", "fisher", "compensate", "lowrank", "double", "vote")
IMPORTANCE = {"compensate": "taylor", "lowrank": "l2", "double": "l2", "vote": "fisher"}
# --method auto's scores with data: fisher's plans kept more than taylor's by top-1 or cosine at 8 of 11 goals (README).
DEFAULT_IMPORTANCE = "fisher"
BATCH = 16
# Images are read into memory whole, and a few hundred pin down BN statistics, int8 ranges and a refit; token ids are
# small, and distilling a pruned encoder wants every sentence there is (README, issue 6).
IMAGE_SAMPLES = 256
# Labels are what this tool's users lack: every one counts (at the cap of 256, a 50-per-class task lost half of its).
TRAIN_IMAGE_SAMPLES = 1024  # 50 per class for 20 classes; 600 MB at 224×224
STEEPNESS_BATCHES = 8  # of BATCH samples: global allocation's steepness is chosen on their outputs
# Batches of BATCH samples the channels are scored on (4 unless listed). Fisher sums per-sample squares, which need
# more samples to settle: on ConvNeXt-atto (digits), at one uniform ratio, its channels from 64 samples kept 0.752
# top-1 agreement, from 256 0.831 (L1 magnitude 0.856; README, Scorer benchmark).
SCORE_BATCHES = {"fisher": 16}
VALIDATION_SAMPLES = 16


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build takes; the CLI and the Python API both fill this in."""

    target: str = "x86-openvino"
    model: str = DEFAULT_MODEL
    weights: str | None = None
    budget: Budget | None = None
    input_shape: tuple[int, ...] | None = None
    calib: str | None = None
    method: str = "auto"
    compensate: bool = False  # the least-squares refit after pruning, for any method
    bank: str | None = None  # mask bank folder: store this build's kept channels; vote reads it
    train: str | None = None  # the task's labelled data: a new head when its classes are not the model's outputs
    aux: str | None = None  # auxiliary data for recovery (labelled or not)
    adapt_steps: int = 100
    device: str | None = None
    out: Path = Path("out")
    force: bool = False
    max_rounds: int = 4
    recover_steps: int = 20
    calib_limit: int | None = None  # most samples read per data set; None: (TRAIN_)IMAGE_SAMPLES, or every sentence
    seed: int = 0
    trust_pickle: bool = False
    trust_pickle_from: str | None = None  # what turned unpickling on: "--trust-pickle" or a config file's path
    strict: bool = False  # a group that cannot be pruned safely is an error, not kept whole
    plan: str | None = None  # replay this plan.json instead of searching (reproducible builds)
    config: str | None = None  # the project config the settings came from, if any
    key_file: str | None = None  # manifest.json is signed with this key (HMAC-SHA256; validate --key-file checks it)
    allocation: str = "global"  # or "uniform": the same fraction of every group (for comparison)
    steepness: float | None = None  # global allocation's; None: chosen on the task's data (score/steepness.py)
    structures: str = "all"  # or "heads" / "neurons": only attention heads, or all but them (score/importance.py)
    executor: str | None = None  # where candidates run: this process (None, "local") or Ray (farm/executor.py)
    in_flight: int = 1  # candidates per round
    drop_blocks: int | str | None = None  # residual blocks removed whole first, or "auto"; None: auto where it can


def build(options: BuildOptions, say=print) -> dict:
    """Run one build and return its report; the output folder holds the artifact, plan.json and report.json.

    Raises BadInput (exit 2) for unusable input, BudgetNotMet (exit 1) when no candidate meets the budget or the
    artifact's outputs do not match PyTorch; in both cases nothing is left in the output folder.
    """
    started = time.perf_counter()
    unpickling = (options.trust_pickle_from or "trust_pickle") if options.trust_pickle else None
    torch.manual_seed(options.seed)
    target = load_target(options.target)
    budget = options.budget or target.budget
    if options.method not in METHODS:
        raise BadInput(f"unknown --method '{options.method}'; known: {', '.join(METHODS)}")
    if options.allocation not in ALLOCATIONS:
        raise BadInput(f"unknown --allocation '{options.allocation}'; known: {', '.join(ALLOCATIONS)}")
    if options.structures not in STRUCTURES:
        raise BadInput(f"unknown --structures '{options.structures}'; known: {', '.join(STRUCTURES)}")
    if options.max_rounds < 1:
        raise BadInput(f"--max-rounds must be at least 1, got {options.max_rounds}")
    if options.in_flight < 1:
        raise BadInput(f"--in-flight must be at least 1, got {options.in_flight}")
    if options.calib_limit is not None and options.calib_limit < 1:
        raise BadInput(f"--calib-limit must be at least 1, got {options.calib_limit}")
    backend = get_backend(target.backend)
    backend.require()
    device = measuring_device(open_device(options.device or target.device), backend, target, say)
    out = claim_output(Path(options.out), options.force, input_paths(options, target.path))
    key = read_key(options.key_file) if options.key_file else None
    loaded = load_model(options.model, options.weights, options.input_shape, options.trust_pickle)
    shape, mean, std = loaded.input.shape, loaded.input.mean, loaded.input.std
    # --train: the task's labelled data; --calib: unlabelled images (int8 ranges, BN, compensation) where given.
    spec = loaded.input
    limit = options.calib_limit or (None if spec.takes_ids else IMAGE_SAMPLES)
    train_limit = options.calib_limit or (None if spec.takes_ids else TRAIN_IMAGE_SAMPLES)
    data = load_dataset(options.train or options.calib, shape, mean, std, train_limit if options.train else limit,
                        spec=spec)  # fmt: skip
    calib = load_dataset(options.calib, shape, mean, std, limit, spec=spec) if options.train and options.calib else None
    aux = load_dataset(options.aux, shape, mean, std, limit, spec=spec) if options.aux else None
    if options.method == "vote" and (not options.bank or data.synthetic):
        raise BadInput("--method vote needs --bank DIR (earlier builds' kept channels) and the task's --calib DATA")
    drop_blocks = check_drop_blocks(options.drop_blocks, options.plan, budget.kind in (*COUNTED, "memory_mb"),
                                    data.synthetic, options.allocation)  # fmt: skip
    if target.precision == "int8" and data.synthetic:
        raise BadInput(f"target '{target.name}' is int8, whose ranges are calibrated on real images: pass --calib DATA")
    method = options.method if options.method != "auto" else ("magnitude" if data.synthetic else DEFAULT_IMPORTANCE)
    if data.synthetic:
        say(
            "no --calib data: using 64 synthetic random inputs. Importance falls back to magnitude, batch-norm"
            " recalibration and fine-tuning are skipped, and fidelity is measured on random inputs, which says"
            " little about accuracy on real images; pass --calib DATA (see calibration/README.md)"
        )
    model, example = loaded.module, loaded.input.example()
    pinned = None
    if options.plan:  # checked whole against the model before anything slow
        pinned = Plan.load_pinned(options.plan, tuple(example.shape))
        pinned.check_against(model, example)
    # The task's embedding for the mask bank: the *pretrained* model's features, comparable across tasks.
    embedding = None
    if options.bank and not data.synthetic:
        embedding = task_embedding(model, example, (x for x, _ in data.batches(BATCH)))
    entries, voted_blocks = [], None
    if method == "vote":  # where the count is left open, the blocks the nearest earlier tasks removed (score/vote.py)
        entries = load_entries(Path(options.bank), options.model, tuple(example.shape), warn=say,
                               embedding_size=len(embedding), blocks=residual_blocks(model, example))  # fmt: skip
        nearest(entries, embedding)  # an empty bank is bad input now, not after the baseline is measured
        voted_blocks = vote_blocks(entries, embedding) if options.drop_blocks is None and drop_blocks else None
        drop_blocks = drop_blocks if voted_blocks is None else voted_blocks
    adapted = adapt_to_task(model, example, data, options.adapt_steps, BATCH, say) if options.train else None
    data = labels_in_label_space(data, model, example, say)
    aux = labels_in_label_space(aux, model, example, say) if aux is not None else None
    score_set, eval_set = split_held_out(data)

    executor = make_executor(options.executor)  # last of the checks: it may start a local Ray instance
    workdir = new_workdir(out)
    try:
        # On Ray the device (or pool) is held by actors: one benchmark per device at a time, from any worker.
        ctx = SearchContext(model, example, [], options.model, method, target, backend, executor.devices(device),
                            workdir / "rounds", say, executor=executor, in_flight=options.in_flight,
                            allocation=options.allocation,
                            compensating=options.compensate or method == "compensate")  # fmt: skip
        ctx.calibration = calib.x if calib is not None else score_set.x
        held_out = Judge(model, eval_set.batches(BATCH))
        ctx.evaluate = lambda pruned: held_out(pruned)[1]
        with timed(say, "measuring the unpruned model"):
            baseline, baseline_artifact = ctx.measure(model, "baseline")
        base_macs, base_params = count_macs_params(model, example)
        base_size = baseline_artifact.size_bytes()
        # MACs, params and memory budgets are counted or computed on the model, not timed: no latency judges them.
        counted = budget.kind in (*COUNTED, "memory_mb")
        budget_ms = math.inf if counted else budget_latency_ms(budget.kind, budget.value, baseline)
        base_memory = artifact_memory_mb(baseline_artifact.files["onnx"], target.precision)
        what = f"{budget.kind.replace('_', ' ')} {budget.value:g}" if counted else f"{budget_ms:.3f} ms p50"
        say(f"baseline p50 {baseline.p50:.3f} ms on {device.label}; budget {what}")
        if timed_beside_baseline(budget.kind, device, baseline.p50, budget_ms):
            ctx.reference = baseline_artifact
            # The slow state is this machine's (backends/base.py): boards, whose speeds differ, are not judged by it.
            ctx.quiet_reference_ms = baseline.p50 if isinstance(device, LocalDevice) else None
        decomposed, neighbours, depth, start, probe = [], [], None, None, None
        if options.plan:  # a pinned plan: no scoring, no search; the same plan gives the same artifact bytes
            say(f"replaying {options.plan} instead of searching")
            chosen = measure_plan(ctx, pinned, baseline.p50, 1, budget_ms)
            candidates = [chosen]
        else:
            importance = IMPORTANCE.get(method, method)
            scoring = list(score_set.batches(BATCH))[: SCORE_BATCHES.get(importance, 4)]
            if drop_blocks and (counted or baseline.p50 > budget_ms):  # else the model fits as it is
                how = "as the bank voted" if voted_blocks is not None else drop_blocks
                with timed(say, f"choosing residual blocks to remove ({how})"):
                    counts = lambda m: _score(m, example, importance, scoring[:4])  # noqa: E731 (64 samples a count)
                    depth, probe = remove_blocks(ctx, drop_blocks, list(score_set.batches(BATCH))[:STEEPNESS_BATCHES],
                                                 baseline.p50, budget_ms, counts, baseline.runtime)  # fmt: skip
                say(depth.describe())
            if method in ("lowrank", "double"):
                ctx.model, decomposed = decomposed_copy(ctx.model, example)
                say(f"{len(decomposed)} layers in SVD form (basis + mix): their basis vectors prune like channels")
            with timed(say, f"scoring channel groups ({method})"):
                ctx.scored = _score(ctx.model, example, importance, scoring)
                if method == "lowrank":
                    ctx.scored = basis_only(ctx.scored, decomposed)
                if method == "vote":
                    ctx.scored, neighbours = vote_scores(ctx.scored, entries, embedding)
                    say(
                        f"votes from {len(neighbours)} earlier tasks, similarity "
                        + ", ".join(f"{n['similarity']:.3f}" for n in neighbours)
                    )
                ctx.scored = select_structures(ctx.scored, options.structures)
                keep_unprunable_whole(ctx, options.strict)
            ctx.structure = read_structure(ctx.model, example, [g.module for g in ctx.scored])
            whole, ctx.latency_model = ctx.latency_model, new_model(ctx.structure, target, baseline.runtime)
            if depth and depth.dropped and not counted:  # the search starts from the model without them, measured
                start = round_zero(ctx, ctx.plan_at(0.0), probe, baseline.p50, budget_ms)
            if not counted and not decomposed and not isinstance(device, EstimateDevice):
                ctx.nodes_device = device  # the build's device (or pool) itself, not the executor's handle of it
                if not ctx.latency_model.node_samples:
                    ctx.latency_model.borrow_nodes(whole)  # the whole model's profile where blocks were removed
                    full = start.artifact if start else baseline_artifact
                    learn_where_time_goes(ctx, full, ctx.structure.full_widths())
            if options.steepness is not None:
                ctx.steepness = SteepnessChoice(options.steepness, {}, 0)
            elif not data.synthetic:  # global allocation's steepness is chosen on them (score/steepness.py)
                ctx.steepness_batches = list(score_set.batches(BATCH))[:STEEPNESS_BATCHES]
                if calib is not None and not calib.synthetic:  # the final refit fits on them too (recover)
                    ctx.steepness_unlabelled = list(calib.batches(BATCH))[:STEEPNESS_BATCHES]
                # Channels by magnitude or energy, judged beside the scores' own choice (score/steepness.py);
                # vote's channels are the earlier tasks' choice, which is its point.
                if importance in ("fisher", "taylor") and method != "vote" and options.allocation == "global":
                    ctx.channel_scores = other_channel_scores(ctx.model, example, ctx.steepness_batches, say)
            cost_model = {"started_from": ctx.latency_model.source}
            say(f"cost model: {cost_model['started_from']}; {options.allocation} allocation")
            try:
                if budget.kind == "memory_mb":
                    if base_memory["total_mb"] <= budget.value:
                        chosen, candidates = _unpruned(ctx, baseline, baseline_artifact, base_memory), None
                    else:
                        chosen, candidates = fit_memory_budget(ctx, budget.value, baseline.p50, options.max_rounds)
                    if chosen is None:
                        least = min(c.memory_mb for c in candidates)
                        raise BudgetNotMet(
                            f"memory budget of {budget.value:g} MB not reached: the smallest artifact needs"
                            f" {least:.2f} MB (weights + peak activations); relax the budget or use a smaller model"
                        )
                    candidates = candidates or [chosen]
                elif counted:
                    chosen, reached = fit_counted_budget(ctx, budget.kind, budget.value, (base_macs, base_params),
                                                         baseline.p50)  # fmt: skip
                    if chosen is None:
                        raise BudgetNotMet(
                            f"{budget.kind.replace('_', ' ')} {budget.value:g} not reachable: the deepest cut keeps"
                            f" {reached:.3f} of the unpruned model; relax the budget or use a smaller model"
                        )
                    candidates = [chosen]
                else:
                    chosen, candidates, unreachable = search(
                        ctx, (baseline, baseline_artifact), budget_ms, options.max_rounds, start
                    )
            finally:  # what this build measured makes the next build of this model start closer
                ctx.latency_model.save(profile_path(target, baseline.runtime, ctx.structure), baseline.runtime)
                cost_model["after_build"] = ctx.latency_model.source
            if chosen is None:
                raise BudgetNotMet(unreachable_message(candidates, budget_ms, device.label, unreachable,
                                                       ctx.unprunable, len(ctx.scored)))  # fmt: skip
            if decomposed:  # plan.json replays on the original model: it decomposes these layers first
                chosen = replace(chosen, plan=with_decomposition(chosen.plan, decomposed))
            if depth:  # and it bypasses these blocks before anything else
                chosen = replace(chosen, plan=with_dropped(chosen.plan, list(depth.dropped)))

        with timed(say, "recovering accuracy on the chosen structure"):
            steps = 0 if method == "compensate" else options.recover_steps
            pruned, recovery = recover(model, chosen.plan, example, score_set, eval_set, steps, ctx.compensating,
                                       BATCH, aux, calib, held_out)  # fmt: skip
        with timed(say, "exporting and validating the final artifact"):
            artifact = backend.export(pruned, example, workdir, target, ctx.calibration)
            inputs = eval_set.x[:VALIDATION_SAMPLES]
            with torch.no_grad():
                reference = torch.cat([pruned(inputs[i : i + 1]) for i in range(len(inputs))])
            validation = backend.validate(artifact, inputs, reference, target, ctx.device)
        if not validation.ok:
            limit = (f"cosine similarity {validation.cosine:.3f} below {validation.min_cosine}" if validation.min_cosine
                     else f"beyond the tolerance {validation.atol:.3g}")  # fmt: skip
            raise BudgetNotMet(
                f"the {backend.name} artifact's outputs differ from PyTorch by {validation.max_abs_err:.3g}, {limit}"
                f" for {target.precision}; nothing was written"
            )
        with timed(say, "measuring the final artifact"):
            finals = measure_final(ctx, artifact, baseline.p50, chosen.latency, budget_ms)
        result = min(finals, key=lambda m: m.comparable_p50(baseline.p50))
        latency = result.comparable_p50(baseline.p50)
        speedup = (result.reference_p50 or baseline.p50) / result.p50
        chosen.plan.save(workdir / "plan.json")
        torch.save(pruned.state_dict(), workdir / "pruned_state_dict.pt")
        # What `edgeprune validate` checks the artifact against later, on the device.
        np.save(workdir / REFERENCE_INPUTS, inputs.numpy())
        np.save(workdir / REFERENCE_OUTPUTS, reference.numpy())
        shutil.rmtree(workdir / "rounds")
        report = {
            "target": target.name, "backend": backend.name, "precision": target.precision,
            "budget": {"kind": budget.kind, "value": budget.value, "latency_ms": None if counted else budget_ms},
            "measured_on": device.label, "device_pool": pool_status(ctx.device),
            "executor": {"name": executor.name, "in_flight": options.in_flight},
            "baseline": {
                "latency_ms": baseline.latency(), "macs": base_macs, "params": base_params, "size_bytes": base_size,
                "peak_memory_mb": baseline.peak_memory_mb, "memory": base_memory,
            },
            "result": {
                "latency_ms": result.latency(), "macs": chosen.macs, "params": chosen.params,
                "size_bytes": artifact.size_bytes(), "peak_memory_mb": result.peak_memory_mb,
                "speedup": speedup, "ratio": chosen.plan.ratio, "comparable_p50": latency,
                "final_tries_p50": [m.p50 for m in finals],
                "macs_ratio": chosen.macs / base_macs, "params_ratio": chosen.params / base_params,
                "memory": artifact_memory_mb(artifact.files["onnx"], target.precision),
            },
            "met_budget": latency <= budget_ms,
            "iterations": [c.to_dict() for c in candidates],
            "accepted_step": chosen.step,
            "validation": validation.to_dict(),
            "quality": recovery, "adapted": adapted,
            "method": method, "seed": options.seed, "allocation": None if options.plan else options.allocation,
            "cost_model": None if options.plan else cost_model,
            "steepness": ctx.steepness.to_dict() if ctx.steepness else None,
            "depth": depth.to_dict() if depth else None,
            "unprunable": [{"module": name, "reason": reason} for name, reason in sorted(ctx.unprunable.items())],
            "model": {"spec": options.model, "weights": options.weights, "input_shape": list(example.shape),
                      "unpickling_granted_by": unpickling},
            "data": {"calib": data.source, "synthetic": data.synthetic, "samples": len(data)},
            "runtime": result.runtime, "threads": result.threads,
            "artifacts": {role: path.name for role, path in artifact.files.items()}
            | {"plan": "plan.json", "pytorch_state_dict": "pruned_state_dict.pt", "report": "report.json",
               "reference_inputs": REFERENCE_INPUTS, "reference_outputs": REFERENCE_OUTPUTS, "manifest": MANIFEST,
               "html": "report.html"},
            "versions": versions(),
            "build_seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        if device.label == "local" and backend.name == "tflite":  # LiteRT runs on the host too, not as on the board
            report["host_measurement"] = (
                f"measured with LiteRT on this machine's CPU, not on a {target.name} board; pass --device ssh://… to"
                " measure on the board"
            )
        if isinstance(device, EstimateDevice):
            report["not_measured"] = (
                f"nothing was measured on a {target.name} device: every latency here is a roofline estimate from the"
                " profile's [estimate] figures, and the outputs were checked with ONNX Runtime (fp32), not"
                f" {backend.name}"
            )
        if budget.kind == "memory_mb":  # the shipped artifact's own graph, computed again
            report["met_budget"] = report["result"]["memory"]["total_mb"] <= budget.value
        elif counted:  # met by construction (counted exactly); the latency is reported, not judged
            report["met_budget"] = report["result"][budget.kind] <= budget.value
        if not report["met_budget"]:
            raise BudgetNotMet(
                f"the final artifact measured {latency:.3f} ms p50, over the budget of {budget_ms:.3f} ms"
                f" (the accepted round measured {chosen.latency:.3f} ms); the device is noisy or the budget tight",
                report,
            )
        if method == "vote":
            report["vote"] = {"neighbours": neighbours, "blocks": voted_blocks}  # None: chosen on this task
        if options.bank and not data.synthetic:  # this task's kept channels, for later vote builds
            info = {"method": method, "target": target.name, "data": data.source, "quality": recovery.get("result")}
            report["bank_entry"] = str(save_entry(Path(options.bank), options.model, tuple(example.shape), embedding,
                                                  chosen.plan.to_dict(), info))  # fmt: skip
        write_json(workdir / "report.json", report)
        files = file_hashes(workdir)
        write_html(workdir / "report.html", report, chosen.plan.widths(), files)  # shows every file but itself
        files |= file_hashes(workdir, ["report.html"])
        write_manifest(workdir, files, input_hashes(options, data), report["versions"], key=key)
        publish(workdir, out)
        return report
    finally:
        executor.close()
        if workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)


def _unpruned(ctx: SearchContext, baseline, baseline_artifact, memory: dict):
    """The unpruned model as the chosen candidate: it already fits a memory budget."""
    from edgeprune.rounds import Candidate

    plan, macs, params = ctx.plan_at(0.0)
    return Candidate(0, plan, macs, params, baseline, baseline_artifact, baseline.p50, memory_mb=memory["total_mb"])


def _score(model, example: torch.Tensor, method: str, batches: list) -> list:
    """Score the groups; a model torch-pruning cannot trace at all is bad input, named in one line."""
    try:
        return score_groups(model, example, method, batches)
    except Exception as exc:  # raised from tracing the user's model
        raise BadInput(
            f"torch-pruning cannot follow this model's graph: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        ) from None
