"""The project config: every target of edgeprune.toml builds in one command; flags override the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.config import SCHEMA, SETTINGS, find_config, load_config
from edgeprune.errors import BadInput
from edgeprune.jobs import plan_jobs
from edgeprune.target import load_target

MODEL = """
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
"""
PROJECT = """
model = "net.py:net"
input_shape = [1, 3, 32, 32]
out = "build"
[[targets]]
name = "x86-openvino"
latency_ms = 1000.0
[[targets]]
name = "boards/x86-onnx.toml"
latency_ms = 1000.0
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "net.py").write_text(MODEL)
    (tmp_path / "boards").mkdir()
    # A second target of our own: this machine's CPU through ONNX Runtime.
    profile = Path(load_target("x86-openvino").path).read_text()
    profile = profile.replace('name = "x86-openvino"', 'name = "x86-onnx"').replace(
        'backend = "openvino"', 'backend = "onnx"'
    )
    (tmp_path / "boards" / "x86-onnx.toml").write_text(profile)
    (tmp_path / "edgeprune.toml").write_text(PROJECT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_build_with_no_flags_builds_every_target(project):
    result = CliRunner().invoke(app, ["build", "--json"])
    assert result.exit_code == 0, result.stderr
    reports = json.loads(result.stdout)["targets"]
    assert [r["target"] for r in reports] == ["x86-openvino", "x86-onnx"]
    assert [r["backend"] for r in reports] == ["openvino", "onnx"]
    assert (project / "build" / "x86-openvino" / "model.xml").is_file()
    assert (project / "build" / "x86-onnx" / "model.onnx").is_file()
    assert all(r["met_budget"] and r["model"]["input_shape"] == [1, 3, 32, 32] for r in reports)


@pytest.mark.slow
def test_exit_code_says_whether_every_target_built(project):
    (project / "edgeprune.toml").write_text(PROJECT + '[[targets]]\nname = "jetson-orin-int8"\n')
    result = CliRunner().invoke(app, ["build"])
    assert result.exit_code == 2  # an int8 target without calibration images fails, the others still build
    assert "[jetson-orin-int8] target 'jetson-orin-int8' is int8" in result.stderr
    assert sorted(p.name for p in (project / "build").iterdir()) == ["x86-onnx", "x86-openvino"]


@pytest.mark.slow
def test_flags_override_the_file(project):
    result = CliRunner().invoke(app, ["build", "--target", "x86-openvino", "--input-shape", "1,3,40,40", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["targets"][0]
    assert report["model"]["input_shape"] == [1, 3, 40, 40]
    assert sorted(p.name for p in (project / "build").iterdir()) == ["x86-openvino"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model = 'x'\n", "needs at least one [[targets]]"),
        ("modle = 'x'\n[[targets]]\nname = 'a'\n", "unknown key 'modle'"),
        ("[[targets]]\nname = 'a'\nspeedup = -1\n", "target 1"),
        ("[[targets]]\nname = 'a'\nspeedup = 2\nlatency_ms = 1\n", "exactly one"),
        ("[[targets]]\nname = 'a'\n[[targets]]\nname = 'a'\n", "listed twice"),
        ("input_shape = '1,3'\n[[targets]]\nname = 'a'\n", "input_shape"),
        ("targets = [", "not valid TOML"),
    ],
)
def test_a_malformed_config_is_one_line(tmp_path, text, words):
    path = tmp_path / "edgeprune.toml"
    path.write_text(text)
    with pytest.raises(BadInput) as info:
        load_config(path)
    assert words in str(info.value) and "\n" not in str(info.value) and "edgeprune.toml" in str(info.value)


def test_pyproject_tool_table_is_found(tmp_path):
    assert find_config(tmp_path) is None
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert find_config(tmp_path) is None
    table = "[tool.edgeprune]\nmodel = 'm:f'\n[[tool.edgeprune.targets]]\nname = 'a'\n"
    (tmp_path / "pyproject.toml").write_text(table)
    config = load_config(find_config(tmp_path))
    assert config.settings == {"model": "m:f"} and [t.target for t in config.targets] == ["a"]


EVERY_SETTING = """
model = "net.py:net"
weights = "w.pt"
input_shape = [1, 3, 32, 32]
calib = "calib"
method = "taylor"
allocation = "uniform"
out = "build"
seed = 4294967295
max_rounds = 100
recover_steps = 0
device = ["ssh://a", "ssh://b"]
plan = "plan.json"
strict = false
trust_pickle = false
compensate = true
bank = "bank"
train = "train"
aux = "aux"
adapt_steps = 100000
structures = "all"
executor = "local"
in_flight = 64
calib_limit = 1
drop_blocks = "auto"
key_file = "ci.key"
[[targets]]
name = "a"
"""


def test_every_setting_at_its_bounds_loads(tmp_path):
    (tmp_path / "edgeprune.toml").write_text(EVERY_SETTING)
    settings = load_config(tmp_path / "edgeprune.toml").settings
    assert set(settings) == set(SETTINGS)
    assert settings["device"] == "ssh://a,ssh://b" and settings["input_shape"] == (1, 3, 32, 32)
    assert (settings["seed"], settings["trust_pickle"], settings["drop_blocks"]) == (2**32 - 1, False, "auto")


@pytest.mark.parametrize("key", [key for key, rule in SCHEMA.items() if rule.kind == "integer"])
def test_a_flag_and_a_config_obey_the_same_bounds(tmp_path, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    high = SCHEMA[key].high
    with pytest.raises(BadInput, match=f"^--{key.replace('_', '-')} must be at least .* and at most {high}, got"):
        plan_jobs({key: high + 1}, {}, None)
    (tmp_path / "edgeprune.toml").write_text(f"{key} = {high + 1}\n[[targets]]\nname = 'a'\n")
    with pytest.raises(BadInput, match=f"edgeprune.toml: {key} must be at least .* and at most {high}, got"):
        plan_jobs({}, {}, None)
    (tmp_path / "edgeprune.toml").write_text(f"{key} = {high}\n[[targets]]\nname = 'a'\n")
    assert getattr(plan_jobs({}, {}, None)[0][0], key) == high  # the bound itself is allowed
    assert getattr(plan_jobs({key: high}, {}, None)[0][0], key) == high
