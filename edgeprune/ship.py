"""The build's last phase: the recovered model exported, checked against PyTorch and measured; then the report,
the manifest and the output folder published whole (outdir.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.context import SearchContext
from edgeprune.errors import BudgetNotMet
from edgeprune.html import write_html
from edgeprune.options import VALIDATION_SAMPLES
from edgeprune.outdir import publish
from edgeprune.report import write_json
from edgeprune.rounds import Candidate, measure_final, timed
from edgeprune.score.vote import save_entry
from edgeprune.stages import Baseline, Prepared, Shipped
from edgeprune.validate import REFERENCE_INPUTS, REFERENCE_OUTPUTS, file_hashes, input_hashes, write_manifest


def export_and_check(prep: Prepared, ctx: SearchContext, pruned: nn.Module, recovery: dict, chosen: Candidate,
                     baseline: Baseline, workdir: Path, say) -> Shipped:  # fmt: skip
    """Export the recovered model, check its outputs against PyTorch's (BudgetNotMet where they differ), measure
    it, and save the plan, the state dict and the reference inputs and outputs beside it."""
    backend, target = prep.backend, prep.target
    with timed(say, "exporting and validating the final artifact"):
        artifact = backend.export(pruned, prep.example, workdir, target, ctx.calibration)
        inputs = prep.eval_set.x[:VALIDATION_SAMPLES]
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
        finals = measure_final(ctx, artifact, baseline.measurement.p50, chosen.latency, baseline.budget_ms)
    chosen.plan.save(workdir / "plan.json")
    torch.save(pruned.state_dict(), workdir / "pruned_state_dict.pt")
    # What `edgeprune validate` checks the artifact against later, on the device.
    np.save(workdir / REFERENCE_INPUTS, inputs.numpy())
    np.save(workdir / REFERENCE_OUTPUTS, reference.numpy())
    shutil.rmtree(workdir / "rounds")
    return Shipped(pruned, recovery, artifact, inputs, reference, validation, finals)


def check_met(report: dict, baseline: Baseline, chosen: Candidate) -> None:
    """BudgetNotMet (with the report) where the final artifact is over the budget its round met."""
    if not report["met_budget"]:
        latency = report["result"]["comparable_p50"]
        raise BudgetNotMet(
            f"the final artifact measured {latency:.3f} ms p50, over the budget of {baseline.budget_ms:.3f} ms"
            f" (the accepted round measured {chosen.latency:.3f} ms); the device is noisy or the budget tight",
            report,
        )


def publish_build(prep: Prepared, report: dict, chosen: Candidate, neighbours: tuple, workdir: Path) -> dict:
    """Store the task's kept channels in the bank (for later vote builds), write report.json, report.html and the
    manifest, and publish the work dir as the output folder; the report as written."""
    options, data = prep.options, prep.data
    if prep.method.votes:
        report["vote"] = {"neighbours": list(neighbours), "blocks": prep.voted_blocks}  # None: chosen on this task
    if options.bank and not data.synthetic:
        info = {"method": prep.method.name, "target": prep.target.name, "data": data.source,
                "quality": report["quality"].get("result")}  # fmt: skip
        report["bank_entry"] = str(save_entry(Path(options.bank), options.model, tuple(prep.example.shape),
                                              prep.embedding, chosen.plan.to_dict(), info))  # fmt: skip
    write_json(workdir / "report.json", report)
    files = file_hashes(workdir)
    write_html(workdir / "report.html", report, chosen.plan.widths(), files)  # shows every file but itself
    files |= file_hashes(workdir, ["report.html"])
    write_manifest(workdir, files, input_hashes(options, data), report["versions"], key=prep.key)
    publish(workdir, prep.out)
    return report
