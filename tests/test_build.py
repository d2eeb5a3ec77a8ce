"""Builds through the Python API: real calibration data, a budget already met, a model from a file, the label rule."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample

from edgeprune import build
from edgeprune.data import Dataset, labels_in_label_space, load_dataset
from edgeprune.model import load_model
from edgeprune.pipeline import BuildOptions
from edgeprune.rewrite.judge import quality
from edgeprune.rewrite.recover import recover
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups
from edgeprune.target import Budget

MODEL_FILE = """
import torch
from torch import nn

def tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
"""


def make_folder(root: Path) -> Path:
    return make_sample().make_image_folder(root, classes=2, per_class=8, size=64)


@pytest.mark.slow
def test_build_with_an_image_folder_uses_fisher_and_recovers(tmp_path):
    # The budget is one the model meets for sure: this test is about the data path, not about latency (a 64x64
    # MobileNetV3 runs in about 0.3 ms, where a 1.2x budget is within the machine's noise).
    messages: list[str] = []
    report = build(
        BuildOptions(
            model="timm:mobilenetv3_small_100",
            input_shape=(1, 3, 64, 64),
            calib=str(make_folder(tmp_path / "data")),
            budget=Budget(latency_ms=1000.0),
            out=tmp_path / "out",
            recover_steps=3,
        ),
        say=messages.append,
    )
    assert report["method"] == "fisher" and report["data"]["synthetic"] is False and report["data"]["samples"] == 16
    quality = report["quality"]
    # Two classes are not the model's 1000 outputs: labels dropped, with a message, and fidelity measured.
    assert quality["metric"] == "fidelity" and any("labels are not used" in m for m in messages)
    assert quality["distill_steps"] == 3 and quality["recovery"].startswith("batch-norm recalibration")
    assert 0.0 <= quality["result"] <= 1.0 and quality["result"] == max(quality["pruned"], quality["recovered"])
    assert not any("synthetic" in m for m in messages)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["met_budget"] is True


@pytest.mark.slow
def test_recovery_after_pruning_keeps_the_better_weights():
    """recover() on a real 50% plan with real images: it reports before/after and ships the better of the two."""
    torch.manual_seed(0)
    loaded = load_model("timm:mobilenetv3_small_100", input_shape=(1, 3, 64, 64))
    example = torch.zeros(1, 3, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp))
        data = load_dataset(str(folder), (1, 3, 64, 64), loaded.input.mean, loaded.input.std)
    data = replace(data, y=None)
    scored = score_groups(loaded.module, example, "taylor", list(data.batches(8)))
    plan = uniform_plan(scored, 0.5, 8, "m", (1, 3, 64, 64), "taylor")
    shipped, info = recover(loaded.module, plan, example, data, data, steps=5, compensating=False)
    # All 5 steps: a held-out split of a few images is too small to stop early on.
    assert info["metric"] == "fidelity" and info["distill_steps"] == 5 and info["baseline"] == 1.0
    assert info["early_stopping"].startswith("off")
    assert info["result"] == max(info["pruned"], info["recovered"])
    # The mean of the iterates and the last weights were both judged; the better held out (a tie: the mean) is kept.
    which, scores = info["weights"].split(": ", 1)
    mean_score, last_score = (float(part.split()[0]) for part in scores.split(", "))
    assert which == ("the mean" if mean_score >= last_score else "the last")
    assert info["recovered"] == pytest.approx(max(mean_score, last_score), abs=1e-3)
    assert ("their weights averaged" in info["recovery"]) == (which == "the mean")
    assert sum(p.numel() for p in shipped.parameters()) < sum(p.numel() for p in loaded.module.parameters())
    metric, shipped_quality = quality(shipped, loaded.module, data.batches(8))
    assert shipped_quality == info["result"]


def test_budget_the_unpruned_model_meets_ships_it_unpruned(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    report = build(
        BuildOptions(model=f"{tmp_path / 'net.py'}:tiny", input_shape=(1, 3, 32, 32), budget=Budget(latency_ms=1000.0),
                     out=tmp_path / "out"),
        say=lambda message: None,
    )  # fmt: skip
    assert report["met_budget"] and report["iterations"][0]["step"] == 0 and len(report["iterations"]) == 1
    assert report["result"]["macs"] == report["baseline"]["macs"] and report["result"]["ratio"] == 0.0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert all(len(g["kept"]) == g["channels"] for g in plan["groups"])


@pytest.mark.parametrize(
    ("y", "class_names", "kept"),
    [
        (np.array([0, 5, 9]), (), True),  # .npz labels that are valid output indices
        (np.array([0, 5, 10]), (), False),  # one label past the model's 10 outputs
        (np.array([0, 1, 1]), ("cat", "dog"), False),  # a 2-class folder for a 10-class model
        (np.array([0, 1, 1]), tuple(f"c{i}" for i in range(10)), True),  # a folder with the model's 10 classes
    ],
)
def test_labels_count_only_in_the_models_label_space(y, class_names, kept):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    data = Dataset(x=torch.zeros(3, 3, 2, 2), y=torch.tensor(y), source="d", synthetic=False, class_names=class_names)
    said: list[str] = []
    result = labels_in_label_space(data, model, torch.zeros(1, 3, 2, 2), said.append)
    assert (result.y is not None) is kept
    assert bool(said) is not kept


def test_the_public_build_is_a_function_whatever_was_imported_first():
    """`edgeprune.build` is the API function, not shadowed by a submodule of the same name."""
    import edgeprune
    import edgeprune.pipeline  # noqa: F401

    assert callable(edgeprune.build) and edgeprune.build.__module__ == "edgeprune"


def test_which_budgets_time_candidates_beside_the_unpruned_model():
    from edgeprune.device import LocalDevice, SshDevice
    from edgeprune.rounds import timed_beside_baseline

    local, board = LocalDevice(), SshDevice(host="board", user="user")
    assert timed_beside_baseline("speedup", local, 5.0, 2.5) and timed_beside_baseline("speedup", board, 5.0, 2.5)
    assert timed_beside_baseline("latency_ms", local, 5.0, 3.0)  # this shared machine drifts between rounds
    assert not timed_beside_baseline("latency_ms", local, 5.0, 8.0)  # met unpruned: nothing to compare
    assert not timed_beside_baseline("latency_ms", board, 5.0, 3.0)  # the user's own board: no doubled rounds
    assert not timed_beside_baseline("memory_mb", local, 5.0, float("inf"))


def test_the_closing_table_says_when_quality_was_measured_on_random_inputs():
    from edgeprune.report import summary_rows

    size = {"latency_ms": {"p50": 2.0, "p99": 3.0}, "macs": 1e6, "params": 1e3, "size_bytes": 1e4}
    report = {"baseline": size, "result": size | {"comparable_p50": 1.0}, "measured_on": "local"}
    synthetic = {"metric": "fidelity", "baseline": 1.0, "result": 0.0, "evaluated_on": "synthetic inputs"}
    real = synthetic | {"evaluated_on": "16 held-out samples"}
    assert summary_rows(report | {"quality": synthetic})[-1][0] == "fidelity (random inputs)"
    assert summary_rows(report | {"quality": real})[-1][0] == "fidelity"
