"""The build's report: report.json (the contract CI scripts read), the versions it records, and the terminal's
closing lines. Where it is written and how it is published: edgeprune/outdir.py."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeprune.rounds import Candidate

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
