"""The build's outputs: report.json (the contract CI scripts read, DESIGN.md) and an output folder that appears
whole or not at all.

A build writes into a temporary folder beside the output and renames it into place when everything is written, so
an interrupted or failed build leaves no partial output, and an existing output is replaced only with --force.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from edgeprune.errors import BadInput, raise_if_stopped

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


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output folder that exists and is not empty unless ``force``; done before any work starts."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(f"--out '{out}' already holds files; pass --force to replace them, or choose another folder")


def new_workdir(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same filesystem, so the final rename is atomic).

    Its name carries this process's id. A build killed outright (SIGKILL, power loss) cannot clean up after itself,
    so partial folders of processes that no longer run are removed here: running the build again is enough.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def publish(workdir: Path, out: Path) -> None:
    """Move the finished ``workdir`` to ``out``; an old ``out`` is set aside first and removed only afterwards."""
    raise_if_stopped()  # a stop signal whose exception a library swallowed still leaves no output
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    workdir.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
