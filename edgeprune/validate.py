"""Check a built output folder on the target: `edgeprune validate OUT_DIR`.

Three checks, each against what the build recorded: every file's sha256 against manifest.json, the artifact's
outputs on the recorded inputs against PyTorch's recorded outputs, and the measured p50 against the budget. Made
for CI and on-device validation scripts: a verdict line, exit 0 or 1, and --json.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from edgeprune.backends import get_backend
from edgeprune.device import open_device
from edgeprune.errors import BadInput
from edgeprune.estimate import measuring_device
from edgeprune.target import load_target

MANIFEST = "manifest.json"
REFERENCE_INPUTS = "reference_inputs.npy"
REFERENCE_OUTPUTS = "reference_outputs.npy"


def sha256(path: Path) -> str:
    """The file's sha256, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path, names: list[str] | None = None) -> dict:
    """Size and sha256 of the files of ``folder`` (or of ``names`` in it), the manifest itself excluded."""
    paths = [folder / n for n in names] if names is not None else sorted(folder.iterdir())
    kept = [p for p in paths if p.is_file() and p.name != MANIFEST]
    return {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in kept}


def input_hashes(options, data) -> dict:
    """What a build (pipeline.BuildOptions, data.Dataset) read, by content, for its manifest: the model spec, the
    weights file's, the data's and a pinned plan's sha256, and the seed."""
    weights = {"path": options.weights, "sha256": sha256(Path(options.weights))} if options.weights else None
    data_hash = hashlib.sha256(data.x.numpy().tobytes()).hexdigest()
    plan = {"path": options.plan, "sha256": sha256(Path(options.plan))} if options.plan else None
    return {"model": options.model, "weights": weights, "calib": {"source": data.source, "sha256": data_hash},
            "plan": plan, "seed": options.seed}  # fmt: skip


def write_manifest(folder: Path, files: dict, inputs: dict, versions: dict) -> dict:
    """Write manifest.json: every output file with its size and sha256, the build's inputs, versions, command."""
    manifest = {"files": dict(sorted(files.items())), "inputs": inputs, "versions": versions, "command": sys.argv[1:]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def validate(folder: Path, device_url: str | None = None, latency_ms: float | None = None) -> dict:
    """Run the three checks on a build's output folder; the result has ``ok`` and a one-line ``verdict``.

    ``latency_ms`` replaces the budget the build recorded (to check against a tighter one). A folder that is not a
    complete edgeprune output is a BadInput.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        report = json.loads((folder / "report.json").read_text())
        files = manifest["files"]
        model_file = folder / report["artifacts"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"'{folder}' is not an edgeprune output folder (manifest.json and report.json): {exc}") from None

    problems = [f"{name}: missing" for name in files if not (folder / name).is_file()]
    problems += [
        f"{name}: sha256 differs from the manifest"
        for name, entry in files.items()
        if (folder / name).is_file() and sha256(folder / name) != entry["sha256"]
    ]
    result: dict = {"folder": str(folder), "hashes_ok": not problems}
    if problems:
        result.update(ok=False, verdict="invalid: " + "; ".join(problems))
        return result

    target = load_target(report["target"])
    backend = get_backend(report["backend"])
    backend.require()
    device = measuring_device(open_device(device_url), backend, target)
    artifact = _artifact(backend.name, model_file, folder, report)
    inputs = torch.from_numpy(np.load(folder / REFERENCE_INPUTS))
    expected = torch.from_numpy(np.load(folder / REFERENCE_OUTPUTS))
    outputs = backend.validate(artifact, inputs, expected, target, device)
    measured = backend.benchmark(artifact, tuple(report["model"]["input_shape"]), target, device)
    budget = latency_ms if latency_ms is not None else report["budget"]["latency_ms"]
    budget = math.inf if budget is None else budget  # a MACs or params budget: counted at build time, not timed
    result.update(
        outputs=outputs.to_dict(), latency_ms=measured.latency(), budget_ms=budget if math.isfinite(budget) else None,
        measured_on=device.label, within_budget=measured.p50 <= budget,
    )  # fmt: skip
    if not outputs.ok:
        problems.append(f"outputs differ from the recorded PyTorch outputs by {outputs.max_abs_err:.3g} (atol"
                        f" {outputs.atol:.3g})")  # fmt: skip
    if measured.p50 > budget:
        problems.append(f"p50 {measured.p50:.3f} ms on {device.label} is over the budget of {budget:.3g} ms")
    result["ok"] = not problems
    result["verdict"] = (
        ("invalid: " + "; ".join(problems))
        if problems
        else (
            f"valid: hashes match, outputs within {outputs.max_abs_err:.2g} of PyTorch (atol {outputs.atol:.2g}),"
            f" p50 {measured.p50:.3f} ms"
            + (f" <= {budget:.3f} ms" if math.isfinite(budget) else "")
            + f" on {device.label}"
        )
    )
    return result


def _artifact(backend: str, model_file: Path, folder: Path, report: dict):
    from edgeprune.backends import Artifact

    files = {role: folder / name for role, name in report["artifacts"].items()}
    return Artifact(backend=backend, model=model_file, files=files)
