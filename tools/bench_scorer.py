"""Benchmark of stage 2's cost model and global allocation on x86-openvino.
docs/benchmarks/scorer.md holds its latest table.

    python tools/bench_scorer.py [--models timm:resnet18@128 ...] [--samples 8] [--candidates 6] [--repeats 1]
                                 [--reprofiles 0]
                                 [--epochs 3] [--weights-dir DIR] [--prediction-only] [--arms global uniform]
                                 [--markdown]

Every model is first trained on a real task here, scikit-learn's handwritten digits upsampled to its input
(tools/digits_task.py; EfficientNet-Lite0 from its ImageNet weights, the timm models from scratch): 1,200 digits
to train, the other 597 held out for calibration and evaluation. Then, per model, in a fresh cache:
(a) prediction: `edgeprune profile` measures --samples plans and fits the latency model; then --candidates new
    plans (global and uniform, from 85% down to 45% of the predicted baseline) are predicted by that fit *before*
    they are measured. The table gives how many land within ±10% of their measured p50, and the median error.
    With --repeats R each candidate is measured R times and judged on the timing whose unpruned model alongside ran
    quickest (as a build keeps one of its tries); the table then also gives how far its R measurements spread
    ((max − min) / that one), the noise the prediction is judged against, and the profile's unpruned p50 over the
    quickest the unpruned model ran beside the candidates: over 1.3 (SLOW_STATE), the whole profile ran in the
    machine's slow state, and its fit prices every cut at that state's ratios. With --reprofiles N such a profile
    is taken again (from no measurement, told the quiet level the candidates showed), at most N times, and the
    candidates, measured already, are predicted by the last profile's fit, which has not seen them either; the
    column lists every profile's ratio, so a discarded profile is on the table.
    Profile samples and candidates alike are timed beside the unpruned model and taken as the p50 they would
    have measured under the profile's baseline (comparable p50), as a build on this machine judges its rounds; a
    timing whose unpruned model alongside ran in the machine's slow state is taken again, as a round's is.
(b) fidelity at equal measured latency: two builds to the same latency budget (0.6 × the unpruned p50 measured by
    the profile), both given the same 256 training digits as --calib, no distillation: edgeprune's default (global
    allocation of fisher scores computed on those digits), and Torch-Pruning's uniform L1 (magnitude importance,
    the same fraction of every group, rounded to the same multiple). Fidelity of each pruned model to the unpruned one
    on the 597 held-out digits, which no build sees: top-1 agreement and mean cosine similarity of outputs, and the
    task accuracy of both. Global allocation's steepness is chosen by the build on its --calib digits. The verdict
    table calls a winner only where the better arm landed at no more latency than the other (see verdict()).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_task import accuracy, agreement, digits, task_model_spec, train  # noqa: E402

from edgeprune.backends.base import SLOW_STATE, quietest  # noqa: E402

TRAIN = 1200  # digits to train on; the other 597 are held out

DEFAULT_MODELS = ["timm:resnet18@128", "timm:mobilenetv3_large_100@128", "edgeprune.zoo:efficientnet_lite0@128",
                  "timm:regnetx_002@128"]  # fmt: skip


def predictions(spec: str, weights: str, shape: tuple[int, ...], samples: int, count: int, repeats: int = 1,
                reprofiles: int = 0) -> tuple[list[dict], float, list[float]]:  # fmt: skip
    """Profile, then predict and measure ``count`` new plans (each ``repeats`` times, judged on the timing whose
    reference ran quickest); return the rows, the unpruned p50, and each profile's unpruned p50 over the quickest
    the unpruned model ran beside the candidates (more than one where a profile in the slow state was taken again,
    at most ``reprofiles`` times)."""
    from edgeprune.backends import get_backend
    from edgeprune.device import open_device
    from edgeprune.loop import SearchContext
    from edgeprune.model import load_model
    from edgeprune.profile import run_profile
    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.score.allocate import allocate
    from edgeprune.score.costmodel import new_model, profile_path
    from edgeprune.score.importance import score_groups
    from edgeprune.score.structure import read_structure
    from edgeprune.target import load_target

    say = lambda message: None  # noqa: E731
    profiled = run_profile("x86-openvino", spec, weights, input_shape=shape, samples=samples, say=say)
    target = load_target("x86-openvino")
    model = load_model(spec, weights, input_shape=shape).module
    example = torch.zeros(shape)
    scored = [replace(g, scores=None) if g.module in profiled["kept_whole"] else g
              for g in score_groups(model, example, "magnitude")]  # fmt: skip
    structure = read_structure(model, example, [g.module for g in scored])
    latency = new_model(structure, target, profiled["runtime"])
    backend, device = get_backend(target.backend), open_device(None)
    measured = []  # (allocation, widths, tries)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = SearchContext(model, example, scored, spec, "magnitude", target, backend, device, Path(tmp), say)
        ctx.structure, ctx.latency_model = structure, latency
        # Measured as a build measures its rounds here: beside the unpruned model, judged on the comparable p50, and
        # taken again where the unpruned model alongside ran in the machine's slow state (backends/base.py).
        unpruned, ctx.reference = ctx.measure(model, "unpruned")
        ctx.quiet_reference_ms = unpruned.p50
        full = latency.predict(structure.full_widths())
        for i, fraction in enumerate(np.linspace(0.85, 0.45, count)):
            allocation = ("global", "uniform")[i % 2]
            plan = allocate(scored, structure, latency.predict, fraction * full, target.channel_multiple, allocation,
                            spec, shape, "magnitude")  # fmt: skip
            pruned = apply_plan(model, plan, example)
            # Measured ``repeats`` times (each a p50 beside the unpruned model), and judged on the timing whose
            # unpruned model alongside ran quickest, the rule by which a build keeps one of its tries
            # (Backend.benchmark): one timing in the machine's slow state reads 15-60% off (bench_repeatability.py),
            # wider than the ±10% being judged, and with two of three repeats in it a median is one of them.
            tries = [ctx.measure(pruned, f"candidate-{i}-{k}")[0] for k in range(repeats)]
            measured.append((allocation, structure.widths_of(plan), tries))
    # The profile's unpruned p50 against the quickest the unpruned model ran since (alone, then beside the
    # candidates: ctx.quiet_reference_ms): far over 1, the whole profile ran in the machine's slow state, which no
    # timing inside it could tell (edgeprune/profile.py), and its fit prices every cut at that state's ratios. With
    # --reprofiles it is taken again, from no measurement, told that quiet level; the candidates, measured already,
    # are predicted by the new fit, which has not seen them either.
    levels = [profiled["baseline_p50"] / ctx.quiet_reference_ms]
    while levels[-1] > SLOW_STATE and len(levels) <= reprofiles:
        profile_path(target, profiled["runtime"], structure).unlink()
        profiled = run_profile("x86-openvino", spec, weights, input_shape=shape, samples=samples, say=say,
                               quiet_ms=ctx.quiet_reference_ms)  # fmt: skip
        latency = new_model(structure, target, profiled["runtime"])
        levels.append(profiled["baseline_p50"] / ctx.quiet_reference_ms)
    baseline_p50, rows = profiled["baseline_p50"], []
    for allocation, widths, tries in measured:
        predicted = latency.predict(widths)
        runs = [m.comparable_p50(baseline_p50) for m in tries]
        comparable = quietest(tries).comparable_p50(baseline_p50)
        rows.append({"allocation": allocation, "predicted": predicted, "measured": comparable,
                     "error": (predicted - comparable) / comparable,
                     "spread": (max(runs) - min(runs)) / comparable})  # fmt: skip
    return rows, baseline_p50, levels


ARMS = {"global": "fisher", "uniform": "magnitude"}  # allocation → importance: edgeprune's default, and TP's L1
CALIB = 256  # training digits a build scores and recalibrates on


def fidelity(spec: str, weights: str, shape: tuple[int, ...], budget_ms: float, calib: Path, heldout: Path,
             allocation: str, out: Path) -> dict:  # fmt: skip
    """Build to ``budget_ms`` with ``allocation`` on ``calib``; the fidelity to the unpruned model on ``heldout``."""
    from edgeprune.data import load_dataset
    from edgeprune.errors import EdgepruneError
    from edgeprune.graph.plan import Plan
    from edgeprune.model import load_model
    from edgeprune.pipeline import BuildOptions, build
    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.target import Budget

    options = BuildOptions(model=spec, weights=weights, input_shape=shape, budget=Budget(latency_ms=budget_ms),
                           calib=str(calib), out=out, recover_steps=0, allocation=allocation,
                           method=ARMS[allocation])  # fmt: skip
    try:
        report = build(options, say=lambda message: None)
    except EdgepruneError as exc:
        report = getattr(exc, "report", None)
        if report is None:
            return {"allocation": allocation, "error": str(exc)}
    loaded = load_model(spec, weights, input_shape=shape)
    model = loaded.module
    example = torch.zeros(shape)
    if not (out / "plan.json").is_file():
        return {"allocation": allocation, "error": "over budget on its final measurement", "report": report}
    pruned = apply_plan(model, Plan.load(out / "plan.json"), example)
    pruned.load_state_dict(torch.load(out / "pruned_state_dict.pt", weights_only=True))
    data = load_dataset(str(heldout), shape, loaded.input.mean, loaded.input.std, 10_000)
    with torch.no_grad():
        a, b = model(data.x), pruned.eval()(data.x)
    top1, cosine = agreement(b, a)
    return {
        "accuracy": accuracy(pruned, data.x, data.y), "unpruned_accuracy": accuracy(model, data.x, data.y),
        "allocation": allocation, "latency": report["result"]["comparable_p50"], "rounds": _rounds(report),
        "macs": report["result"]["macs"] / report["baseline"]["macs"],
        "top1": top1, "cosine": cosine,
        "steepness": (report.get("steepness") or {}).get("chosen"), "depth": report.get("depth") or {},
    }  # fmt: skip


def _depth_note(depth: dict) -> str:
    """How many residual blocks the build removed, and the counts it judged (blocks: distance, - where channels
    could not reach the budget)."""
    if not depth.get("residual_blocks"):
        return ""
    judged = ", ".join(f"{j['blocks']}: " + ("-" if j["distance"] is None else f"{j['distance']:.3f}")
                       for j in depth.get("auto_judged") or ())  # fmt: skip
    removed = f"{len(depth['dropped'])} of {len(depth['residual_blocks'])} blocks removed"
    return removed + (f" (judged {judged})" if judged else "")


def _rounds(report: dict) -> str:
    """The search's measured rounds (as bench_transfer counts them), and where residual blocks were removed, "+ 0":
    the model without them measured at full width before the search (round 0), and the depth choice's own exports."""
    steps = {i["step"] for i in report["iterations"]}
    depth = report.get("depth") or {}
    probes = len(depth.get("auto_measured") or ())
    extra = f" + 0 (+{probes} depth probes)" if 0 in steps else ""
    return f"{len(steps - {0})}{extra}"


def verdict(global_arm: dict | None, uniform_arm: dict | None) -> str:
    """Which allocation (b) says is better. Both builds land somewhere in the acceptance band, [0.85, 0.97] of the
    budget, so their latencies differ by up to 14% plus noise: a higher top-1 agreement decides only where it came
    with no more latency than the other arm's; otherwise the row says so rather than calling it."""
    if not global_arm or "error" in global_arm or not uniform_arm or "error" in uniform_arm:
        return "not decided: a build failed"
    better, faster = global_arm["top1"] - uniform_arm["top1"], global_arm["latency"] <= uniform_arm["latency"]
    slower = global_arm["latency"] / uniform_arm["latency"] - 1
    if better >= 0 and faster:
        return f"global wins: {better:+.3f} top-1 agreement at {slower:+.0%} latency"
    if better < 0 and not faster:
        quicker = uniform_arm["latency"] / global_arm["latency"] - 1
        return f"uniform wins: {-better:+.3f} top-1 agreement at {quicker:+.0%} latency"
    return f"not decided: global {better:+.3f} top-1 agreement at {slower:+.0%} latency"


def _steepness_note(chosen: float | str | None) -> str:
    """The report's steepness["chosen"]: a number, "uniform" (the uniform ratio), or None (not global)."""
    return "" if chosen is None else "uniform ratio" if chosen == "uniform" else f"steepness {chosen:g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="SPEC@SIDE")
    parser.add_argument("--samples", type=int, default=8, help="profile measurements per model")
    parser.add_argument("--candidates", type=int, default=6,
                        help="new plans predicted, then measured, per model (0: (b) only)")  # fmt: skip
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measurements per candidate in (a); the one whose unpruned model alongside ran quickest counts",
    )
    parser.add_argument(
        "--reprofiles",
        type=int,
        default=0,
        help="(a): take a profile that ran in the machine's slow state again, at most this often",
    )
    parser.add_argument("--prediction-only", action="store_true", help="run (a) only, not the builds of (b)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="(b)'s builds: both, or one")
    parser.add_argument("--budget-fraction", type=float, default=0.6, help="of the unpruned p50, for (b)")
    parser.add_argument("--epochs", type=int, default=4, help="of training on the digits before pruning")
    parser.add_argument("--weights-dir", help="keep trained weights here and reuse them")
    parser.add_argument("--train-only", action="store_true", help="train (into --weights-dir) and stop")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    err = Console(stderr=True)
    predicted_rows, fidelity_rows, trained_rows, verdict_rows = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-scorer-") as tmp:
        os.environ["EDGEPRUNE_CACHE"] = str(Path(tmp) / "cache")  # every model starts from no measurement
        for item in args.models:
            name, _, side = item.rpartition("@") if "@" in item else (item, "", "224")
            shape = (1, 3, int(side), int(side))
            x, y = digits(int(side))
            calib, heldout = Path(tmp) / f"calib-{side}.npz", Path(tmp) / f"heldout-{side}.npz"
            np.savez(calib, x=x[:CALIB].numpy(), y=y[:CALIB].numpy())
            np.savez(heldout, x=x[TRAIN:].numpy(), y=y[TRAIN:].numpy())
            spec = task_model_spec(name, Path(tmp))
            from edgeprune.model import load_model

            # Trained weights are kept in --weights-dir (when given) so that training, which need not run on a
            # quiet machine, can be done beforehand with --train-only.
            folder = Path(args.weights_dir) if args.weights_dir else Path(tmp)
            weights = str(folder / f"{name.replace(':', '_')}-{side}-e{args.epochs}.pt")
            model = load_model(spec, input_shape=shape).module
            untrained = args.prediction_only and not Path(weights).is_file()
            if untrained:  # latency does not depend on the weights
                folder.mkdir(parents=True, exist_ok=True)
                weights = str(folder / f"{name.replace(':', '_')}-{side}-untrained.pt")
                torch.save(model.state_dict(), weights)
            elif Path(weights).is_file():
                model.load_state_dict(torch.load(weights, weights_only=True))
                model.eval()
            else:
                err.print(f"{name} at {side}: training on {TRAIN} digits for {args.epochs} epochs ...")
                model = train(model, x[:TRAIN], y[:TRAIN], args.epochs)
                folder.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), weights)
            trained_rows.append([name, "untrained" if untrained else f"{accuracy(model, x[TRAIN:], y[TRAIN:]):.3f}"])
            err.print(f"  held-out accuracy {trained_rows[-1][1]}")
            if args.train_only:
                continue
            try:
                rows, baseline, levels = predictions(spec, weights, shape, args.samples, args.candidates,
                                                     args.repeats, args.reprofiles)  # fmt: skip
            except Exception as exc:  # one model's failure is a row of the table, not the end of the benchmark
                predicted_rows.append([name, "-", "-", "-", "-", "-", f"failed: {' '.join(str(exc).split())[:200]}"])
                continue
            errors = [abs(r["error"]) for r in rows]
            for r in rows:  # signed, on stderr: a fit that misses one way and noise that misses both look alike
                err.print(f"    {r['allocation']}: predicted {r['predicted']:.3f} ms, measured {r['measured']:.3f} ms"
                          f" ({r['error']:+.1%}, repeats spread {r['spread']:.1%})")  # fmt: skip
            if errors:  # none with --candidates 0: the profile only, for (b)'s baseline
                level = " → ".join(f"{v:.2f}x" + (" (slow)" if v > SLOW_STATE else "") for v in levels)
                predicted_rows.append([name, str(len(rows)), f"{sum(e <= 0.10 for e in errors)}/{len(rows)}",
                                       f"{statistics.median(errors):.1%}", f"{max(errors):.1%}",
                                       f"{statistics.median(r['spread'] for r in rows):.1%}",
                                       level])  # fmt: skip
                err.print("  " + " | ".join(predicted_rows[-1]))
            if args.prediction_only:
                continue
            budget = args.budget_fraction * baseline
            arms = {}
            for allocation in args.arms:
                err.print(f"{name}: building to {budget:.3f} ms with {allocation} allocation ...")
                try:
                    out = Path(tmp) / f"out-{len(fidelity_rows)}"
                    r = fidelity(spec, weights, shape, budget, calib, heldout, allocation, out)
                except Exception as exc:
                    r = {"error": f"failed: {' '.join(str(exc).split())[:200]}"}
                if "error" in r:
                    fidelity_rows.append([name, f"{allocation} ({ARMS[allocation]})", f"{budget:.3f}", *["-"] * 6,
                                          r["error"]])  # fmt: skip
                    continue
                fidelity_rows.append([name, f"{allocation} ({ARMS[allocation]})", f"{budget:.3f}",
                                      f"{r['latency']:.3f}", f"{r['macs']:.0%}", str(r["rounds"]),
                                      f"{r['top1']:.3f}", f"{r['cosine']:.4f}",
                                      f"{r['accuracy']:.3f} ({r['unpruned_accuracy']:.3f})",
                                      "; ".join(filter(None, (_steepness_note(r["steepness"]),
                                                              _depth_note(r["depth"]))))])  # fmt: skip
                err.print("  " + " | ".join(fidelity_rows[-1]))
                arms[allocation] = r
            verdict_rows.append([name, verdict(arms.get("global"), arms.get("uniform"))])
    heads = (
        [
            "model",
            "candidates",
            "within ±10%",
            "median |error|",
            "worst |error|",
            "median spread of repeats",
            "profile's unpruned p50 / quickest beside the candidates (each profile)",
        ],
        [
            "model",
            "allocation (importance)",
            "budget ms",
            "measured ms",
            "MACs",
            "rounds",
            "top-1 agreement",
            "cosine",
            "accuracy (unpruned)",
            "note",
        ],
        ["model", "held-out accuracy after training"],
        ["model", "global allocation against uniform L1"],
    )
    titles = ("(a) predicted vs measured latency", "(b) fidelity at equal measured latency", "the trained models",
              "(b) verdict")  # fmt: skip
    tables = (predicted_rows, fidelity_rows, trained_rows, verdict_rows)
    for title, head, rows in zip(titles, heads, tables, strict=True):
        if args.markdown:
            print(f"\n{title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            print("\n".join("| " + " | ".join(row) + " |" for row in rows))
        else:
            table = Table(*head, title=title)
            for row in rows:
                table.add_row(*row)
            Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
