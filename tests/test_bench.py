"""`edgeprune bench`: time an existing artifact on a target, here, or as an estimate where nothing runs it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from edgeprune.backends import get_backend
from edgeprune.cli import app
from edgeprune.target import load_target


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An OpenVINO artifact with the model.onnx every build leaves beside it."""
    folder = tmp_path_factory.mktemp("artifact")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    get_backend("openvino").export(model, torch.zeros(1, 3, 24, 24), folder, load_target("x86-openvino"))
    return folder


def bench(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_times_an_artifact_with_the_targets_runtime(folder):
    result = bench(str(folder / "model.xml"), "--target", "x86-openvino", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["input_shape"] == [1, 3, 24, 24]  # read from model.onnx beside it
    assert report["backend"] == "openvino" and report["runtime"].startswith("openvino") and not report["estimate"]
    assert report["measured_on"] == "local" and report["threads"] == load_target("x86-openvino").threads
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]


def test_bench_of_an_onnx_for_a_jetson_is_an_estimate_and_says_so(folder):
    result = bench(str(folder / "model.onnx"), "--target", "jetson-orin")
    assert result.exit_code == 0, result.output
    assert "ESTIMATE (not measured)" in result.stdout and "jetson-orin" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nowhere/model.xml", "--target", "x86-openvino"], "does not exist"),
        (
            ["{folder}/model.xml", "--target", "arm-tflite"],
            "is for openvino, but target 'arm-tflite' runs tflite",
        ),
        (["{folder}/model.bin", "--target", "x86-openvino"], "cannot tell the runtime"),
    ],
)
def test_bench_bad_input_is_one_line(folder, args, words):
    result = bench(*(a.format(folder=folder) for a in args))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr
