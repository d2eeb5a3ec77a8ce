"""The command line as a user meets it: exit codes, one-line errors, nothing half-written, a real build."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import without_quick_profiles
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.graph.plan import Plan
from edgeprune.model import load_model
from edgeprune.rewrite.prune import apply_plan

runner = CliRunner()
SMALL = ["--model", "timm:mobilenetv3_small_100", "--input-shape", "1,3,96,96"]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_targets_lists_every_bundled_profile():
    result = invoke("targets")
    assert result.exit_code == 0
    for name in ("x86-openvino", "jetson-orin", "jetson-orin-nano", "arm-tflite"):
        assert name in result.stdout


def test_targets_show_prints_json_that_matches_the_profile():
    result = invoke("targets", "show", "x86-openvino", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["backend"] == "openvino" and data["threads"] >= 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--target", "nope"], ["unknown target 'nope'", "x86-openvino"]),
        (["--model", "timm:no_such_net"], ["no_such_net"]),
        (["--model", "no_such_pkg.mod:factory"], ["cannot import"]),
        (["--model", "missing_file.py:factory"], ["does not exist"]),
        (["--model", "no-colon-here"], ["has no ':'"]),
        (["--input-shape", "1,3,abc"], ["--input-shape"]),
        (["--speedup", "0.5"], ["--speedup"]),
        (["--latency-ms", "1", "--speedup", "2"], ["one budget"]),
        (["--target", "arm-tflite-int8"], ["int8", "pass --calib DATA"]),
        (["--calib", "nowhere.npz"], ["nowhere.npz"]),
        (["--method", "guess"], ["--method"]),
        (["--calib-limit", "0"], ["--calib-limit must be at least 1"]),
        (["--memory-mb", "-1"], ["--memory-mb must be positive"]),
        (["--device", "ssh://nobody@127.0.0.1:1"], ["ssh://nobody@127.0.0.1:1", "step 'connect' failed"]),
        (["--device", "telnet://board"], ["not supported"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    result = invoke("build", *args, "--out", "out")
    assert_one_line_error(result, 2, *words)
    assert leftovers(tmp_path) == []


def test_malformed_profile_data_and_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.toml").write_text('name = "bad"\nbackend = "openvino"\nthreads = "two"\n')
    assert_one_line_error(invoke("build", "--target", "bad.toml"), 2, "bad.toml")
    Path("calib.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_line_error(invoke("build", *SMALL, "--calib", "calib.npz"), 2, "calib.npz")
    # A well-formed shape the model cannot take: one channel for an RGB stem.
    assert_one_line_error(invoke("build", *SMALL[:2], "--input-shape", "1,1,96,96"), 2, "--input-shape")
    assert sorted(leftovers(tmp_path)) == ["bad.toml", "calib.npz"]


@pytest.mark.slow
def test_missing_backend_package_names_the_extra(tmp_path):
    """With openvino unimportable, a build for an OpenVINO target says which extra to install."""
    code = (
        "import sys; sys.modules['openvino'] = None\n"  # an import of openvino now raises ImportError
        "from edgeprune.cli import main; sys.argv = ['edgeprune', 'build', '--out', 'o']; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "edgeprune: error: the openvino backend needs its package: pip install 'edgeprune[openvino]'"
    ]
    assert leftovers(tmp_path) == []


def test_weights_that_are_not_a_state_dict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"epoch": 3, "note": "no tensors"}, "not_state.pt")
    torch.save(torch.nn.Linear(2, 2), "pickled_module.pt")
    Path("text.pt").write_text("not a checkpoint")
    assert_one_line_error(invoke("build", *SMALL, "--weights", "not_state.pt"), 2, "not a state dict")
    assert_one_line_error(invoke("build", *SMALL, "--weights", "pickled_module.pt"), 2, "--trust-pickle")
    assert_one_line_error(invoke("build", *SMALL, "--weights", "text.pt"), 2, "not a PyTorch")
    wrong = {"fc.weight": torch.zeros(3, 3)}
    torch.save(wrong, "wrong_shapes.pt")
    assert_one_line_error(invoke("build", *SMALL, "--weights", "wrong_shapes.pt"), 2, "does not fit the model")
    assert sorted(leftovers(tmp_path)) == ["not_state.pt", "pickled_module.pt", "text.pt", "wrong_shapes.pt"]


def test_existing_output_needs_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("out").mkdir()
    Path("out/keep.txt").write_text("user data")
    assert_one_line_error(invoke("build", *SMALL, "--out", "out"), 2, "--force")
    assert Path("out/keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_unreachable_budget_exits_1_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("build", *SMALL, "--latency-ms", "0.0001", "--out", "out")
    # The deepest plan is measured twice before a budget is called unreachable (one can be a busy spell): 2 rounds, or
    # 3 where the session's cached measurements of this model fit a cost model whose deepest plan is not the roofline's
    # (the loop first moves to the scaled roofline's; a fresh clone's suite once met that).
    assert_one_line_error(result, 1, "not reached", "relax the budget")
    assert "measuring it once more" in result.stderr
    assert re.search(r"after [23] round\(s\)", result.stderr), result.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.timing
def test_build_meets_a_speedup_and_its_plan_replays(tmp_path):
    """A real build on OpenVINO: the report contract, the files, and plan.json replayed weight for weight."""
    out = tmp_path / "out"
    env = without_quick_profiles(dict(os.environ, PYTHONWARNINGS="ignore"))  # the speedup is judged
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--model", "timm:resnet18", "--input-shape",
               "1,3,96,96", "--speedup", "1.5", "--max-rounds", "2", "--out", str(out), "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)
    if done.returncode == 1 and "the device is noisy" in done.stderr:
        # The accepted round met the budget and the shipped artifact measured over it three times: a busy shared
        # machine (contention only adds time). What a user does, the test does: build again (nothing was written).
        assert not out.exists()
        done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report == json.loads((out / "report.json").read_text())
    for key in ("target", "backend", "precision", "budget", "measured_on", "baseline", "result", "met_budget",
                "iterations", "validation", "quality", "method", "artifacts", "versions"):  # fmt: skip
        assert key in report, key
    assert report["met_budget"] is True and report["measured_on"] == "local"
    # A speedup budget is met by the ratio measured in one run (the unpruned model timed alongside).
    assert report["result"]["comparable_p50"] <= report["budget"]["latency_ms"]
    assert report["result"]["speedup"] >= 1.5
    assert report["result"]["latency_ms"]["reference_p50"] > report["result"]["latency_ms"]["p50"]
    assert report["result"]["macs"] < report["baseline"]["macs"]
    assert 1 <= len(report["iterations"]) <= 2
    assert report["validation"]["ok"] and report["validation"]["max_abs_err"] <= report["validation"]["atol"]
    for name in report["artifacts"].values():
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    plan = Plan.load(out / "plan.json")
    assert all(len(g.kept) % 8 == 0 or len(g.kept) == g.channels for g in plan.groups)  # x86-openvino's multiple
    torch.manual_seed(report["seed"])  # no --weights: timm's random init, which the build seeds with its seed
    original = load_model("timm:resnet18", input_shape=(1, 3, 96, 96)).module
    replayed = apply_plan(original, plan, torch.zeros(1, 3, 96, 96))
    saved = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    replayed_state = replayed.state_dict()
    assert saved.keys() == replayed_state.keys()
    assert all(saved[k].shape == replayed_state[k].shape for k in saved)
    # The saved weights were recovered after pruning (BN recalibration needs real data; this build had none), so
    # without --calib they are the pruned pretrained weights themselves.
    assert all(torch.equal(saved[k], replayed_state[k]) for k in saved)
