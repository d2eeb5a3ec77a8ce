"""Devices over SSH, against a real OpenSSH server started on 127.0.0.1 with throwaway keys (tests/sshd.py)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import TINY_CNN
from sshd import sshd_available

from edgeprune.backends.openvino import OpenVinoBackend
from edgeprune.device import DeviceError, LocalDevice, SshDevice, open_device, parse_ssh_url
from edgeprune.errors import BadInput
from edgeprune.model import load_model
from edgeprune.target import BenchmarkSettings, load_target

pytestmark = pytest.mark.skipif(not sshd_available(), reason="needs /usr/sbin/sshd (apt-get install openssh-server)")
SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two OpenVINO artifacts (MobileNetV3-small and a narrower copy) and PyTorch's outputs on 3 inputs."""
    torch.manual_seed(0)
    model = load_model("timm:mobilenetv3_small_100", input_shape=SHAPE).module.eval()
    target = dataclasses.replace(load_target("x86-openvino"), benchmark=BenchmarkSettings(warmup=2, iterations=10))
    folder = tmp_path_factory.mktemp("artifacts")
    artifact = OpenVinoBackend().export(model, torch.zeros(SHAPE), folder, target)
    inputs = torch.randn(3, *SHAPE[1:])
    with torch.no_grad():
        reference = model(inputs)
    return artifact, inputs, reference, target


def _remote_folders() -> set[str]:
    return set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "edgeprune.*")))


def test_validate_and_benchmark_run_on_the_device_and_clean_up(server, artifacts):
    artifact, inputs, reference, target = artifacts
    device = open_device(server.url())
    assert isinstance(device, SshDevice) and device.label == f"ssh://{device.user}@127.0.0.1:{server.port}"
    before = _remote_folders()
    remote = OpenVinoBackend().validate(artifact, inputs, reference, target, device)
    local = OpenVinoBackend().validate(artifact, inputs, reference, target, LocalDevice())
    # The same runner on the same runtime: the outputs that came back are the ones this machine computes.
    assert remote.ok and remote.samples == 3 and remote.max_abs_err == pytest.approx(local.max_abs_err, abs=1e-6)
    # model.xml and its model.bin went up; the reference (also called model.xml) went to a folder of its own.
    measured = OpenVinoBackend().benchmark(artifact, SHAPE, target, device, reference=artifact)
    assert measured.measured_on == device.label and measured.runtime.startswith("openvino")
    assert measured.p50 > 0 and measured.reference_p50 and measured.iterations >= 10
    # Fewer is fine: each connect also removes folders that killed builds left on the board.
    assert _remote_folders() <= before, "the device's temporary folder was left behind"


def test_a_runner_failure_on_the_device_names_the_device_and_the_reason(server, artifacts, tmp_path):
    artifact, _, _, target = artifacts
    broken = tmp_path / "model.xml"
    broken.write_text("<not-an-ir/>")
    with pytest.raises(DeviceError, match=r"runner failed on ssh://.*could not load"):
        OpenVinoBackend().benchmark(replace(artifact, model=broken), SHAPE, target, open_device(server.url()))


def test_unreachable_device_and_unknown_host_key_fail_at_the_connect_step(server, tmp_path):
    closed = dataclasses.replace(parse_ssh_url(server.url()), port=server.port + 1 if server.port < 65535 else 1024)
    with pytest.raises(DeviceError, match=r"step 'connect' failed"):
        closed.check()
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError, match=r"step 'connect' failed.*known_hosts"):
        open_device(server.url(known_hosts=str(empty)).replace(f"known_hosts={server.known_hosts}&", ""))


def test_a_step_past_its_timeout_is_one_line(server):
    device = dataclasses.replace(parse_ssh_url(server.url()), timeout_s=1.0)
    with pytest.raises(DeviceError, match=r"step 'run' timed out after 1 s"):
        device.remote("run", ["sleep", "5"], device.timeout_s)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ssh://", "not an SSH URL"),
        ("ssh://host:99999", "bad port"),
        ("ssh://user:secret@host", "no password"),
        ("ssh://host/some/path", "not an SSH URL"),
        ("ssh://host?colour=blue", "unknown option(s) colour"),
        ("ssh://host?identity=/nonexistent/key", "does not exist"),
        ("ssh://host?timeout=-3", "timeout must be"),
        ("telnet://host", "not supported"),
    ],
)
def test_malformed_device_urls_are_bad_input(url, words):
    with pytest.raises(BadInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        open_device(url, check=False)


@pytest.mark.slow
def test_a_build_measured_over_ssh_reports_the_device(server, tmp_path):
    out = tmp_path / "out"
    # A small model and a counted budget (MACs): every measurement of the build still runs on the device.
    model = TINY_CNN
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--model", model, "--macs-ratio", "0.6",
               "--device", server.url(), "--out", str(out), "--json"]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["measured_on"] == parse_ssh_url(server.url()).label
    assert report["validation"]["ok"] and report["met_budget"] is True


@pytest.mark.slow
def test_litert_runs_on_the_device_too(server, tmp_path):
    pytest.importorskip("litert_torch", reason="the tflite extra is not installed")
    from edgeprune.backends import get_backend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    target = replace(load_target("arm-tflite"), benchmark=BenchmarkSettings(warmup=2, iterations=10))
    backend = get_backend("tflite")
    artifact = backend.export(model, torch.zeros(1, 3, 16, 16), tmp_path, target)
    inputs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        reference = model(inputs)
    device = open_device(server.url())
    assert backend.validate(artifact, inputs, reference, target, device).ok
    measured = backend.benchmark(artifact, (1, 3, 16, 16), target, device)
    assert measured.measured_on == device.label and measured.runtime.startswith("litert")
    assert measured.threads == min(4, os.cpu_count())  # the target's 4, at most one per core
