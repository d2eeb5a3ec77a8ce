"""tools/ci/build_and_validate.sh: a project config in, validated archives out, an exit code CI can trust."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "ci" / "build_and_validate.sh"
MODEL = """
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
"""


def run(folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONWARNINGS="ignore")
    return subprocess.run(["bash", str(SCRIPT)], cwd=folder, capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.slow
def test_builds_validates_and_archives_every_target(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    (tmp_path / "edgeprune.toml").write_text(
        'model = "net.py:net"\ninput_shape = [1, 3, 16, 16]\n[[targets]]\nname = "x86-openvino"\nlatency_ms = 1000.0\n'
    )
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "validated: x86-openvino" in done.stdout
    with tarfile.open(tmp_path / "dist" / "x86-openvino.tar.gz") as archive:
        names = archive.getnames()
    assert "x86-openvino/manifest.json" in names and "x86-openvino/model.xml" in names
    assert (tmp_path / "build.report.json").read_text().strip().startswith("{")


@pytest.mark.slow
def test_a_budget_not_met_fails_the_job(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    (tmp_path / "edgeprune.toml").write_text(
        'model = "net.py:net"\ninput_shape = [1, 3, 16, 16]\n[[targets]]\nname = "x86-openvino"\nlatency_ms = 0.00001\n'
    )
    done = run(tmp_path)
    assert done.returncode == 1 and "not reached" in done.stderr
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == []
