"""Global allocation's steepness at one predicted latency, offline: does the distance a build chooses by rank plans
as their held-out fidelity does, and where does each land against uniform allocation?
docs/benchmarks/steepness.md holds its latest table.

    python tools/bench_steepness.py --weights-dir DIR [--models timm:convnext_atto@128 ...] [--fractions 0.55 ...]

Per model (trained on the digits as tools/bench_scorer.py trains it; weights from --weights-dir, trained there when
missing): `edgeprune profile` fits the latency model, then at each of --fractions of the unpruned model's predicted
latency it makes, for fisher and for taylor scores, the global plan at a build's steepnesses (0, 1, 2, 4) and the
uniform plan of those scores, and Torch-Pruning's uniform L1 plan, prunes each and recalibrates batch norm on 128
training digits. For each: the predicted latency and MACs, the output distance a build chooses by (KL, on those 128
digits) and the top-1 agreement and mean cosine with the unpruned model on the 597 held-out digits; "*" marks the
plan of each importance that a build would choose (the least distance). Nothing is exported or timed beyond the
profile: the plans are compared at equal *predicted* latency, which the builds of bench_scorer.py cannot pin.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_task import agreement, digits, task_model_spec, trained_weights  # noqa: E402

TRAIN = 1200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["timm:convnext_atto@128"], help="SPEC@SIDE")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.55], help="of the predicted latency")
    parser.add_argument("--weights-dir", required=True, help="trained weights (as bench_scorer.py keeps them)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    from edgeprune.model import load_model
    from edgeprune.profile import run_profile
    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.rewrite.recover import recalibrate_batchnorm
    from edgeprune.score.allocate import UNIFORM_STEEPNESS, allocate
    from edgeprune.score.costmodel import new_model
    from edgeprune.score.importance import score_groups
    from edgeprune.score.structure import read_structure
    from edgeprune.search.steepness import STEEPNESSES, output_distance
    from edgeprune.target import load_target

    target = load_target("x86-openvino")
    head = ["model", "goal", "importance", "allocation", "steepness", "predicted ms", "MACs", "distance (calib)",
            "top-1", "cosine"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    with tempfile.TemporaryDirectory(prefix="bench-steepness-") as tmp:
        os.environ["EDGEPRUNE_CACHE"] = str(Path(tmp) / "cache")
        for item in args.models:
            name, _, side = item.rpartition("@")
            shape = (1, 3, int(side), int(side))
            x, y = digits(int(side))
            spec = task_model_spec(name, Path(tmp))
            weights = trained_weights(name, int(side), Path(args.weights_dir), args.epochs, spec, x, y, TRAIN)
            profiled = run_profile("x86-openvino", spec, str(weights), input_shape=shape, samples=8,
                                   say=lambda message: None)  # fmt: skip
            model = load_model(spec, str(weights), input_shape=shape).module.eval()
            example = torch.zeros(shape)
            calib = [(x[i : i + 16], None) for i in range(0, 256, 16)]  # scored on the first 64, judged on 128
            with torch.no_grad():
                reference = model(x[TRAIN:])
            scores = {method: [replace(g, scores=None) if g.module in profiled["kept_whole"] else g
                               for g in score_groups(model, example, method, calib[:4])]
                      for method in ("fisher", "taylor", "magnitude")}  # fmt: skip
            structure = read_structure(model, example, [g.module for g in scores["magnitude"]])
            latency = new_model(structure, target, profiled["runtime"])
            finite = [s for s in STEEPNESSES if s != UNIFORM_STEEPNESS]  # a build's; its uniform ratio is below
            for fraction in args.fractions:
                goal = fraction * latency.predict(structure.full_widths())
                for method, scored in scores.items():
                    arms = [("global", s) for s in finite] if method != "magnitude" else []
                    rows = []
                    for allocation, steepness in [*arms, ("uniform", None)]:
                        plan = allocate(scored, structure, latency.predict, goal, target.channel_multiple, allocation,
                                        spec, shape, method, steepness or 0.0)  # fmt: skip
                        pruned = apply_plan(model, plan, example)
                        recalibrate_batchnorm(pruned, calib[8:])
                        widths = structure.widths_of(plan)
                        with torch.no_grad():
                            out = pruned.eval()(x[TRAIN:])
                        top1, cosine = agreement(out, reference)
                        macs = structure.macs(widths) / structure.macs(structure.full_widths())
                        shown = "-" if steepness is None else f"{steepness:g}"
                        row = [name, f"{fraction:g}", method, allocation, shown, f"{latency.predict(widths):.3f}",
                               f"{macs:.0%}", None, f"{top1:.3f}", f"{cosine:.3f}"]  # fmt: skip
                        rows.append((output_distance(pruned, model, calib[8:]), row))
                    chosen = min(range(len(rows)), key=lambda i: rows[i][0])
                    for i, (distance, row) in enumerate(rows):
                        row[7] = f"{distance:.4f}" + (" *" if i == chosen and method != "magnitude" else "")
                        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
