"""TensorRT without a Jetson: the board-ready files, the calibration table, the estimate, and the trtexec code path.

TensorRT and trtexec cannot run here (no NVIDIA GPU). What can is tested for real: the parser on real trtexec output
text (tests/data/trtexec, copied from public issues), the calibration table's format against a real TensorRT cache
line, the roofline estimate on a hand-computable graph, a whole build to an estimate-labelled report, and the
runner's trtexec driving code with a stand-in trtexec that prints one of those real outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeprune.backends import get_backend
from edgeprune.backends.runner import parse_trtexec
from edgeprune.backends.tensorrt import calibration_table, read_calibration_table, version_code
from edgeprune.device import RUNNER
from edgeprune.errors import BadInput
from edgeprune.estimate import EstimateDevice, graph_roofline_ms
from edgeprune.target import load_target

SAMPLES = Path(__file__).parent / "data" / "trtexec"


def test_parser_reads_real_trtexec_summaries():
    trt10 = parse_trtexec((SAMPLES / "trt10_issue4177.txt").read_text())
    assert trt10["throughput_qps"] == 130.298
    assert trt10["latency"] == {"min": 5.38672, "max": 13.3664, "mean": 7.60628, "median": 7.16092,
                                "p90": 10.2996, "p95": 10.8698, "p99": 12.9675}  # fmt: skip
    assert trt10["gpu_compute"]["median"] == 7.14139 and trt10["h2d"]["p99"] == 0.0515137
    assert trt10["total_host_walltime_s"] == 3.00082 and trt10["total_gpu_compute_time_s"] == 2.96536
    # A report line before the summary ("Average on 10 runs - GPU latency: ...") is not the summary's latency.
    ptlflow = parse_trtexec((SAMPLES / "trt10_ptlflow65.txt").read_text())
    assert ptlflow["latency"]["median"] == 30.7585 and ptlflow["latency"]["p95"] == 30.8396
    assert "total_gpu_compute_time_s" not in ptlflow  # that copy stops before the line
    old = parse_trtexec((SAMPLES / "trt84_issue2129.txt").read_text())  # TensorRT 8.4: the 99th percentile only
    assert old["latency"] == {"min": 2.55664, "max": 9.1418, "mean": 7.03175, "median": 7.40112, "p99": 7.92065}
    with pytest.raises(ValueError, match="no performance summary"):
        parse_trtexec("[I] Building an engine from file model.onnx\n&&&& FAILED TensorRT.trtexec")


def test_calibration_table_matches_tensorrts_format():
    # Real lines of TensorRT caches: a 10.9 header, names with spaces and brackets, big-endian float32 hex.
    header, table = read_calibration_table(
        "TRT-100900-EntropyCalibration2\nimages: 3c021406\n(Unnamed Layer* 8) [Constant]_output: 39137939\n"
    )
    assert header == "TRT-100900-EntropyCalibration2"
    assert table["images"] == pytest.approx(0.0079393, rel=1e-4)
    assert table["(Unnamed Layer* 8) [Constant]_output"] == struct.unpack(">f", bytes.fromhex("39137939"))[0]
    assert version_code("8.6.1") == "8601" and version_code("10.3.0") == "100300" and version_code("10.9") == "100900"
    written = calibration_table({"input": 2.54, "/conv/Conv_output_0": 127.0}, "10.3.0")
    header, table = read_calibration_table(written)
    assert header == "TRT-100300-EntropyCalibration2"
    assert table == {"input": pytest.approx(0.02), "/conv/Conv_output_0": pytest.approx(1.0)}  # amax / 127


def test_roofline_of_a_hand_computable_graph(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("Relu", ["c"], ["output"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], [weight],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    # Conv: 4·8·8 outputs × 3 MACs = 768 MACs = 1536 FLOP; moves (192 in + 12 weights + 256 out) × 4 bytes = 1840 B.
    # Relu: (256 + 256) × 4 = 2048 B, no MACs. At 1 GFLOP/s and 1 GB/s: conv memory-bound.
    assert graph_roofline_ms(tmp_path / "model.onnx", "fp32", 1.0, 1.0) == pytest.approx((1840 + 2048) * 1e-6)
    assert graph_roofline_ms(tmp_path / "model.onnx", "fp32", 1.0, 1e6) == pytest.approx(1536 * 1e-6, rel=1e-3)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_int8_export_writes_the_boards_files(tmp_path):
    target = load_target("jetson-orin-int8")
    torch.manual_seed(0)
    calibration = torch.randn(16, 3, 32, 32)
    artifact = get_backend("tensorrt").export(Small().eval(), torch.zeros(1, 3, 32, 32), tmp_path, target, calibration)
    assert set(artifact.files) == {"onnx", "trtexec", "calibration"} and artifact.model == tmp_path / "model.onnx"
    script = (tmp_path / "trtexec.sh").read_text()
    assert "trtexec --onnx=model.onnx --saveEngine=model.engine --int8 --fp16 --calib=calibration.cache" in script
    assert "--loadEngine=model.engine --shapes=input:1x3x32x32 --warmUp=500 --iterations=200" in script
    assert os.access(tmp_path / "trtexec.sh", os.X_OK)
    header, table = read_calibration_table((tmp_path / "calibration.cache").read_text())
    assert header == "TRT-100300-EntropyCalibration2"
    graph = onnx.load(tmp_path / "model.onnx").graph
    activations = {o for n in graph.node for o in n.output} | {"input"}
    assert activations <= set(table), "every activation of the graph needs a scale"
    # The entropy threshold clips outliers: the input's range is at most its largest value, and far from zero.
    assert 0.5 * 127 * table["input"] < float(calibration.abs().max()) * 1.0001
    assert table["input"] * 127 <= float(calibration.abs().max()) * 1.0001
    with pytest.raises(BadInput, match="needs calibration images"):
        get_backend("tensorrt").export(Small().eval(), torch.zeros(1, 3, 32, 32), tmp_path / "x", target)


@pytest.mark.slow
def test_without_a_device_the_build_ships_board_files_and_says_nothing_was_measured(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--target", "jetson-orin-nano", "--model",
               "timm:mobilenetv3_small_100", "--input-shape", "1,3,96,96", "--speedup", "1.5", "--out", str(out),
               "--json", "--recover-steps", "0"]  # fmt: skip
    assert shutil.which("trtexec") is None, "this test is about a machine without TensorRT"
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["measured_on"] == "estimate" and report["met_budget"] is True
    assert "nothing was measured on a jetson-orin-nano device" in report["not_measured"]
    assert report["runtime"].startswith("roofline estimate")
    assert report["result"]["speedup"] >= 1.5 and report["validation"]["ok"]
    assert {"model.onnx", "trtexec.sh"} <= {p.name for p in out.iterdir()}
    assert "--fp16" in (out / "trtexec.sh").read_text()
    assert "roofline estimate" in done.stderr  # said while building, not only in the report


def test_runner_drives_trtexec_and_reads_its_summary(tmp_path):
    """The runner's tensorrt runtime, with a stand-in trtexec on PATH that logs its arguments and prints a real
    trtexec output (TensorRT 10, issue 4177): the commands it builds and the figures it reports."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                    f"echo '&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec'\n"
                    f"cat {SAMPLES / 'trt10_issue4177.txt'}\n")  # fmt: skip
    fake.chmod(0o755)
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "calibration.cache").write_text("TRT-100300-EntropyCalibration2\n")
    args = ["--runtime", "tensorrt", "--model", str(tmp_path / "model.onnx"), "--shape", "1,3,32,32", "--threads",
            "8", "--precision", "int8", "--warmup", "50", "--iterations", "200", "--windows", "2"]  # fmt: skip
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    done = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["runtime"] == "tensorrt 10.3.0"
    assert result["latency_ms"]["p50"] == 7.16092 and result["latency_ms"]["p99"] == 12.9675
    assert result["latency_ms"]["iterations"] == round(130.298 * 3.00082)
    calls = log.read_text().splitlines()
    assert calls[0].startswith(f"--onnx={tmp_path / 'model.onnx'} --saveEngine=")
    assert f"--int8 --fp16 --calib={tmp_path / 'calibration.cache'} --skipInference" in calls[0]
    assert len(calls) == 3 and all("--loadEngine=" in c and "--iterations=200" in c for c in calls[1:])


def test_estimate_device_answers_the_runner_contract(tmp_path):
    target = load_target("jetson-orin")
    torch.manual_seed(0)
    model = Small().eval()
    artifact = get_backend("tensorrt").export(model, torch.zeros(1, 3, 32, 32), tmp_path, target)
    device = EstimateDevice(target)
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(inputs)
    backend = get_backend("tensorrt")
    assert backend.validate(artifact, inputs, reference, target, device).ok
    measured = backend.benchmark(artifact, (1, 3, 32, 32), target, device, reference=artifact)
    expected = graph_roofline_ms(tmp_path / "model.onnx", "fp16", 42000.0, 204.8)
    assert measured.p50 == pytest.approx(expected) and measured.reference_p50 == pytest.approx(expected)
    assert measured.measured_on == "estimate" and measured.runtime.startswith("roofline estimate")
    assert dataclasses.replace(target).estimate.peak_gflops == 42000.0
