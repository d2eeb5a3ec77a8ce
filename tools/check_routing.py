"""Check, architecture by architecture, that pruning routes every kept channel where it belongs.

    python tools/check_routing.py [--models resnet18 mixnet_s ...] [--ratio 0.5] [--multiple 8] [--markdown]

For each timm model of the robustness sweep (random weights, the sweep's input sizes): score the groups, keep
whole the ones the probe finds unprunable, cut ``--ratio`` of every other group, and compare the pruned model with
the unpruned one whose removed channels are silenced (edgeprune/rewrite/verify.py). A correct rewrite matches to
float precision; a wrong one (channels fed to the wrong layer) does not, although it runs and exports fine.
Models whose cut groups pass through a LayerNorm or GroupNorm cannot be checked this way and say so.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_models import parse_models  # noqa: E402


def check(name: str, side: int, ratio: float, multiple: int) -> dict:
    import torch

    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.rewrite.verify import check_routing
    from edgeprune.score.allocate import uniform_plan
    from edgeprune.score.importance import score_groups
    from edgeprune.search.probe import find_unprunable

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, side, side)
    scored = score_groups(model, example, "magnitude")
    unprunable = find_unprunable(model, example, scored, multiple)
    scored = [replace(g, scores=None) if g.module in unprunable else g for g in scored]
    plan = uniform_plan(scored, ratio, multiple, name, tuple(example.shape), "magnitude")
    pruned = apply_plan(model, plan, example, check_fit=False)
    result = check_routing(model, plan, pruned, example)
    cut = sum(g.width < g.channels for g in plan.groups)
    return {"cut": f"{cut} of {len(plan.groups)}", **result.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="timm names, NAME@SIDE to set the input side (default: all)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=8)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, family, side in parse_models(args.models):
        started = time.perf_counter()
        try:
            row = check(name, side, args.ratio, args.multiple)
        except Exception as exc:  # a model this check cannot run is a row, not the end of the table
            row = {"cut": "-", "checked": False, "relative_error": 0.0, "ok": False,
                   "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"}  # fmt: skip
        row |= {"model": name, "family": family, "seconds": time.perf_counter() - started}
        rows.append(row)
        verdict = ("routed right" if row["ok"] else "WRONG CHANNELS") if row["checked"] else "not checked"
        print(f"{name}: {verdict}, error {row['relative_error']:.1e}, {row['cut']} groups cut {row['reason']}",
              flush=True)  # fmt: skip
    if args.markdown:
        print("\n| model | family | groups cut | verdict | relative error | why not checked |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            verdict = ("routed right" if row["ok"] else "**wrong channels**") if row["checked"] else "not checked"
            error = f"{row['relative_error']:.1e}" if row["checked"] else ""
            print(f"| {row['model']} | {row['family']} | {row['cut']} | {verdict} | {error} | {row['reason']} |")
    checked = [r for r in rows if r["checked"]]
    print(
        f"\n{sum(r['ok'] for r in checked)} of {len(checked)} checked models route every channel right;"
        f" {len(rows) - len(checked)} could not be checked"
    )


if __name__ == "__main__":
    main()
