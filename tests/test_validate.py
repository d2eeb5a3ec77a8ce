"""`edgeprune validate`: passes on a fresh build; fails on an altered artifact, a tighter budget, drifted outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeprune import build
from edgeprune.cli import app
from edgeprune.pipeline import BuildOptions
from edgeprune.target import Budget

MODEL = """
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    (root / "net.py").write_text(MODEL)
    options = BuildOptions(model=f"{root / 'net.py'}:net", input_shape=(1, 3, 32, 32), budget=Budget(latency_ms=1000.0),
                           out=root / "out")  # fmt: skip
    build(options, say=lambda message: None)
    return root / "out"


def copy_of(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "out"))


def run(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def test_manifest_lists_every_file_with_its_hash(built):
    manifest = json.loads((built / "manifest.json").read_text())
    on_disk = {p.name for p in built.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((built / name).read_bytes()).hexdigest()
    assert manifest["inputs"]["seed"] == 0 and manifest["inputs"]["calib"]["source"] == "synthetic"
    assert "torch" in manifest["versions"]


def test_a_fresh_build_validates(built):
    result = run(str(built), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["hashes_ok"] and data["outputs"]["ok"] and data["within_budget"]
    assert data["verdict"].startswith("valid: hashes match")


def test_an_altered_artifact_fails(built, tmp_path):
    out = copy_of(built, tmp_path)
    with open(out / "model.bin", "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
    result = run(str(out))
    assert result.exit_code == 1 and result.stdout.strip() == "invalid: model.bin: sha256 differs from the manifest"


def test_a_tighter_budget_fails(built):
    result = run(str(built), "--latency-ms", "0.0001")
    assert result.exit_code == 1
    assert result.stdout.startswith("invalid: p50") and "over the budget of 0.0001 ms" in result.stdout


def test_drifted_outputs_fail(built, tmp_path):
    """The recorded PyTorch outputs no longer match what the artifact computes (hashes kept consistent)."""
    out = copy_of(built, tmp_path)
    outputs = np.load(out / "reference_outputs.npy")
    np.save(out / "reference_outputs.npy", outputs + 0.5)
    manifest = json.loads((out / "manifest.json").read_text())
    digest = hashlib.sha256((out / "reference_outputs.npy").read_bytes()).hexdigest()
    manifest["files"]["reference_outputs.npy"]["sha256"] = digest
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run(str(out))
    assert result.exit_code == 1 and "outputs differ from the recorded PyTorch outputs by 0.5" in result.stdout


def test_not_an_output_folder_is_bad_input(tmp_path):
    result = run(str(tmp_path))
    assert result.exit_code == 2 and "is not an edgeprune output folder" in result.stderr


@pytest.mark.slow
def test_two_builds_of_a_pinned_plan_give_identical_artifacts(built, tmp_path):
    """Reproducible artifacts: the same plan, inputs, versions and seed give byte-identical files."""
    import torch

    from edgeprune.model import load_model
    from edgeprune.score.allocate import uniform_plan
    from edgeprune.score.importance import score_groups

    spec = f"{built.parent / 'net.py'}:net"
    loaded = load_model(spec, input_shape=(1, 3, 32, 32))
    scored = score_groups(loaded.module, torch.zeros(1, 3, 32, 32), "magnitude")
    uniform_plan(scored, 0.5, 8, spec, (1, 3, 32, 32), "magnitude").save(tmp_path / "plan.json")
    hashes = []
    for name in ("a", "b"):
        options = BuildOptions(model=spec, input_shape=(1, 3, 32, 32), budget=Budget(latency_ms=1000.0),
                               out=tmp_path / name, plan=str(tmp_path / "plan.json"))  # fmt: skip
        report = build(options, say=lambda message: None)
        assert report["result"]["macs"] < report["baseline"]["macs"] and len(report["iterations"]) == 1
        hashes.append(json.loads((tmp_path / name / "manifest.json").read_text())["files"])
    shipped = ("model.xml", "model.bin", "model.onnx", "plan.json", "pruned_state_dict.pt", "reference_outputs.npy")
    for name in shipped:
        assert hashes[0][name]["sha256"] == hashes[1][name]["sha256"], name
    assert (tmp_path / "a" / "plan.json").read_text() == (tmp_path / "plan.json").read_text()


def test_a_plan_for_another_input_shape_is_bad_input(built, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "build",
            "--model",
            f"{built.parent / 'net.py'}:net",
            "--input-shape",
            "1,3,48,48",
            "--plan",
            str(built / "plan.json"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "pass --input-shape 1,3,32,32" in result.stderr
