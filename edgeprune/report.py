"""The build's report: report.json (the contract CI scripts read), the versions it records, and the terminal's
closing lines. Where it is written and how it is published: edgeprune/outdir.py."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

from edgeprune.context import SearchContext
from edgeprune.estimate import EstimateDevice
from edgeprune.farm.pool import pool_status
from edgeprune.rounds import Candidate
from edgeprune.score.memory import artifact_memory_mb
from edgeprune.stages import Baseline, Prepared, Scoring, SearchResult, Shipped
from edgeprune.validate import MANIFEST, REFERENCE_INPUTS, REFERENCE_OUTPUTS

SCHEMA_VERSION = 1  # report.json's contract (docs/report.md): raised when a field changes meaning or goes
VERSIONED = ("edgeprune", "torch", "torch-pruning", "timm", "onnx", "onnxruntime", "onnxsim", "openvino", "numpy")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape an artifact (those installed)."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(what, baseline, result) rows for the terminal's closing table."""
    base, result = report["baseline"], report["result"]
    estimate = " (estimate)" if report["measured_on"] == "estimate" else ""

    # The pruned p50 in the baseline's conditions: for a speedup budget it was timed beside the unpruned model.
    rows = [
        (
            "latency p50",
            f"{base['latency_ms']['p50']:.3f} ms{estimate}",
            f"{result['comparable_p50']:.3f} ms{estimate}",
        ),
        ("latency p99", f"{base['latency_ms']['p99']:.3f} ms", f"{result['latency_ms']['p99']:.3f} ms"),
        ("MACs", f"{base['macs'] / 1e6:.1f} M", f"{result['macs'] / 1e6:.1f} M"),
        ("params", f"{base['params'] / 1e6:.2f} M", f"{result['params'] / 1e6:.2f} M"),
        ("artifact size", f"{base['size_bytes'] / 1e6:.2f} MB", f"{result['size_bytes'] / 1e6:.2f} MB"),
    ]
    quality = report.get("quality")
    if quality:
        # On random inputs top-1 agreement says little (a pruned model that is fine on images can score 0 there):
        # the row says what it was measured on.
        on_noise = " (random inputs)" if quality.get("evaluated_on") == "synthetic inputs" else ""
        rows.append((quality["metric"] + on_noise, f"{quality['baseline']:.3f}", f"{quality['result']:.3f}"))
    return rows


def unreachable_message(
    candidates: list[Candidate], budget_ms: float, device: str, unreachable: bool,
    kept_whole: dict[str, str] | None = None, groups: int = 0,
) -> str:  # fmt: skip
    """One line saying what was reached, for a budget no round met, and why (groups kept whole), and what to change."""
    best = min(candidates, key=lambda c: c.latency)
    advice = "relax the budget or use a smaller model" if unreachable else "allow more --max-rounds or relax the budget"
    why = ""
    if unreachable and kept_whole:  # most often the cause: torch-pruning cannot follow much of this graph
        first = next(iter(kept_whole.values()))
        why = f"; {len(kept_whole)} of {groups} groups cannot be pruned safely and are kept whole ({first[:120]})"
    return (
        f"budget of {budget_ms:.3g} ms p50 not reached: the fastest candidate (ratio {best.plan.ratio:.2f}) ran at"
        f" {best.latency:.3f} ms on {device} after {len({c.step for c in candidates})} round(s){why}; {advice}"
    )


def build_report(prep: Prepared, ctx: SearchContext, baseline: Baseline, scoring: Scoring, found: SearchResult,
                 shipped: Shipped, seconds: float) -> dict:  # fmt: skip
    """report.json's contents, from the phases' results (pipeline.py); ``met_budget`` judged as the budget's kind
    asks: a latency on the final timing, a count or the memory on the shipped artifact."""
    options, target, budget, chosen = prep.options, prep.target, prep.budget, found.chosen
    result, device, artifact = shipped.best(baseline.measurement.p50), prep.device, shipped.artifact
    latency = result.comparable_p50(baseline.measurement.p50)
    report = {
        "schema_version": SCHEMA_VERSION,
        "target": target.name, "backend": prep.backend.name, "precision": target.precision,
        "budget": {"kind": budget.kind, "value": budget.value,
                   "latency_ms": None if prep.counted else baseline.budget_ms},
        "measured_on": device.label, "device_pool": pool_status(ctx.device),
        "executor": {"name": ctx.executor.name, "in_flight": options.in_flight},
        "baseline": {
            "latency_ms": baseline.measurement.latency(), "macs": baseline.macs, "params": baseline.params,
            "size_bytes": baseline.size_bytes, "peak_memory_mb": baseline.measurement.peak_memory_mb,
            "memory": baseline.memory,
        },
        "result": {
            "latency_ms": result.latency(), "macs": chosen.macs, "params": chosen.params,
            "size_bytes": artifact.size_bytes(), "peak_memory_mb": result.peak_memory_mb,
            "speedup": (result.reference_p50 or baseline.measurement.p50) / result.p50, "ratio": chosen.plan.ratio,
            "comparable_p50": latency, "final_tries_p50": [m.p50 for m in shipped.finals],
            "macs_ratio": chosen.macs / baseline.macs, "params_ratio": chosen.params / baseline.params,
            "memory": artifact_memory_mb(artifact.files["onnx"], target.precision),
        },
        "met_budget": latency <= baseline.budget_ms,
        "iterations": [c.to_dict() for c in found.candidates],
        "accepted_step": chosen.step,
        "validation": shipped.validation.to_dict(),
        "quality": shipped.recovery, "adapted": prep.adapted,
        "method": prep.method.name, "seed": options.seed, "allocation": None if options.plan else options.allocation,
        "cost_model": None if options.plan else found.cost_model,
        "steepness": ctx.steepness.to_dict() if ctx.steepness else None,
        "depth": scoring.depth.to_dict() if scoring.depth else None,
        "unprunable": [{"module": name, "reason": reason} for name, reason in sorted(ctx.unprunable.items())],
        "model": {"spec": options.model, "weights": options.weights, "input_shape": list(prep.example.shape),
                  "unpickling_granted_by": prep.unpickling},
        "data": {"calib": prep.data.source, "synthetic": prep.data.synthetic, "samples": len(prep.data)},
        "runtime": result.runtime, "threads": result.threads,
        "artifacts": {role: path.name for role, path in artifact.files.items()}
        | {"plan": "plan.json", "pytorch_state_dict": "pruned_state_dict.pt", "report": "report.json",
           "reference_inputs": REFERENCE_INPUTS, "reference_outputs": REFERENCE_OUTPUTS, "manifest": MANIFEST,
           "html": "report.html"},
        "versions": versions(),
        "build_seconds": round(seconds, 1),
    }  # fmt: skip
    if device.label == "local" and prep.backend.name == "tflite":  # LiteRT runs on the host too, not as on the board
        report["host_measurement"] = (
            f"measured with LiteRT on this machine's CPU, not on a {target.name} board; pass --device ssh://… to"
            " measure on the board"
        )
    if isinstance(device, EstimateDevice):
        report["not_measured"] = (
            f"nothing was measured on a {target.name} device: every latency here is a roofline estimate from the"
            " profile's [estimate] figures, and the outputs were checked with ONNX Runtime (fp32), not"
            f" {prep.backend.name}"
        )
    if budget.kind == "memory_mb":  # the shipped artifact's own graph, computed again
        report["met_budget"] = report["result"]["memory"]["total_mb"] <= budget.value
    elif prep.counted:  # met by construction (counted exactly); the latency is reported, not judged
        report["met_budget"] = report["result"][budget.kind] <= budget.value
    return report
