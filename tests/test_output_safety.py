"""What --out and --force may touch: never the user's folders, inputs or another build's output; only what a build
wrote. Real builds of a tiny model and real folders; every refusal is one line, exit 2, and every file survives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_line_error, invoke

from edgeprune import build
from edgeprune.errors import BadInput
from edgeprune.outdir import claim_output, new_workdir, not_an_output, publish
from edgeprune.pipeline import BuildOptions
from edgeprune.target import Budget

MODEL = """
from torch import nn

def net():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    model.edgeprune_input = {"shape": (1, 3, 16, 16)}
    return model
"""
# A counted budget and no recovery: a build of this model takes a few seconds.
QUICK = ["--macs-ratio", "0.8", "--recover-steps", "0", "--max-rounds", "1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes: what must survive a refused build."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            found[str(path.relative_to(folder))] = path.read_bytes() if not path.is_symlink() else b"->link"
    return found


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A team's folder: the model's source, its calibration data, a mask bank and a config, as the working folder."""
    folder = tmp_path / "proj"
    (folder / "bank").mkdir(parents=True)
    (folder / "net.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.random((8, 3, 16, 16), dtype=np.float32), y=np.arange(8) % 4)
    (folder / "bank" / "earlier-task.json").write_text('{"kept": "an earlier build"}\n')
    (folder / "secrets.txt").write_text("the team's keys\n")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(scope="module")
def earlier_output(tmp_path_factory) -> Path:
    """A real build's output folder, made once; tests copy it."""
    root = tmp_path_factory.mktemp("earlier")
    (root / "net.py").write_text(MODEL)
    build(BuildOptions(model=f"{root}/net.py:net", budget=Budget(macs_ratio=0.8), recover_steps=0, max_rounds=1,
                       out=root / "out"), say=lambda message: None)  # fmt: skip
    return root / "out"


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_force_never_replaces_the_working_folder_or_above(project, out):
    before = snapshot(project)
    result = invoke("build", "--model", "net.py:net", "--calib", "calib.npz", "--bank", "bank", *QUICK, "--out", out,
                    "--force")  # fmt: skip
    assert_one_line_error(result, 2, f"--out '{out}'", "choose a folder of its own")
    assert snapshot(project) == before
    assert not list(Path("/").glob(".*partial-*"))


def test_force_never_replaces_the_home_folder(project, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("private key\n")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    for out in (home, home.parent):
        result = invoke("build", "--model", "net.py:net", *QUICK, "--out", str(out), "--force")
        assert_one_line_error(result, 2, "choose a folder of its own")
    assert snapshot(home) == before


@pytest.mark.parametrize(
    ("flag", "inside"),
    [("--bank", "bank"), ("--calib", "calib.npz"), ("--model", "net.py:net"), ("--weights", "w.pt"),
     ("--plan", "plan.json")],
)  # fmt: skip
def test_force_never_replaces_a_folder_that_holds_an_input(project, flag, inside):
    """The input sits in a folder given as --out (here one the user filled by hand): --out there would delete it."""
    sub = project / "outputs"
    shutil.copytree(project / "bank", sub / "bank")
    for name in ("calib.npz", "net.py"):
        shutil.copy(project / name, sub / name)
    (sub / "w.pt").write_bytes(b"weights")
    (sub / "plan.json").write_text("{}")
    args = ["--model", "net.py:net"] if flag != "--model" else []
    before = snapshot(project)
    result = invoke("build", *args, flag, f"outputs/{inside}", *QUICK, "--out", "outputs", "--force")
    assert_one_line_error(result, 2, "--out 'outputs' holds", "which the build reads")
    assert snapshot(project) == before


def test_a_config_never_lies_in_the_folder_a_target_builds_into(project):
    """With a project config every target builds into OUT/<target>: that folder may not be the config's own."""
    folder = project / "build" / "x86-openvino"
    folder.mkdir(parents=True)
    (folder / "edgeprune.toml").write_text('model = "net.py:net"\nrecover_steps = 0\nout = ".."\n'
                                           '[[targets]]\nname = "x86-openvino"\nmacs_ratio = 0.8\n')  # fmt: skip
    shutil.copy(project / "net.py", folder / "net.py")
    before = snapshot(project)
    result = invoke("build", "--config", "build/x86-openvino/edgeprune.toml", "--force")
    assert result.exit_code == 2, result.output
    assert "which the build reads" in result.stderr and "edgeprune.toml" in result.stderr
    assert snapshot(project) == before


def test_a_key_file_is_never_in_the_output_folder(project):
    Path("keys").mkdir()
    Path("keys/ci.key").write_bytes(b"secret")
    result = invoke("build", "--model", "net.py:net", *QUICK, "--key-file", "keys/ci.key", "--out", "keys")
    assert_one_line_error(result, 2, "--out 'keys'", "keys/ci.key")
    assert Path("keys/ci.key").read_bytes() == b"secret"


@pytest.mark.slow
def test_a_build_signed_with_a_key_file_validates_with_that_key_only(project):
    Path("keys").mkdir()
    Path("keys/ci.key").write_bytes(b"secret")
    Path("keys/other.key").write_bytes(b"another secret")
    built = invoke("build", "--model", "net.py:net", *QUICK, "--key-file", "keys/ci.key", "--out", "out")
    assert built.exit_code == 0, built.stderr
    assert json.loads(Path("out/manifest.json").read_text())["signature"]
    checked = invoke("validate", "out", "--key-file", "keys/ci.key")
    assert checked.exit_code == 0 and "signature verified" in checked.stdout, checked.output
    assert invoke("validate", "out", "--key-file", "keys/other.key").exit_code == 1


def test_an_empty_output_must_not_hold_a_bank_the_build_would_create(project):
    """An empty --out with --bank inside it: the bank entry would be written into the folder the build replaces."""
    Path("fresh").mkdir()
    result = invoke("build", "--model", "net.py:net", "--calib", "calib.npz", "--bank", "fresh/bank", *QUICK, "--out",
                    "fresh")  # fmt: skip
    assert_one_line_error(result, 2, "fresh/bank", "which the build reads")


def test_force_replaces_only_what_a_build_wrote(project, earlier_output):
    # A folder of the user's that merely has the names of a build's files: a file name proves nothing.
    lookalike = project / "lookalike"
    lookalike.mkdir()
    (lookalike / "report.json").write_text("{}")
    (lookalike / "manifest.json").write_text(json.dumps({"files": {}}))
    (lookalike / "notes.md").write_text("the team's notes\n")
    # A real output that the user added a file to: that file is not the build's to delete.
    added = project / "added"
    shutil.copytree(earlier_output, added)
    (added / "measurements.csv").write_text("board,ms\n")
    # A real output whose artifact was edited afterwards.
    edited = project / "edited"
    shutil.copytree(earlier_output, edited)
    (edited / "plan.json").write_text((edited / "plan.json").read_text() + " ")
    before = snapshot(project)
    for folder, why in ((lookalike, "names no model artifact"), (added, "measurements.csv: not listed"),
                        (edited, "plan.json: ")):  # fmt: skip
        result = invoke("build", "--model", "net.py:net", *QUICK, "--out", folder.name, "--force")
        assert_one_line_error(result, 2, "not an earlier build's output", why)
    assert snapshot(project) == before


@pytest.mark.slow
def test_force_replaces_an_earlier_output_with_a_new_one(project, earlier_output):
    shutil.copytree(earlier_output, project / "out")
    assert not_an_output(project / "out") is None
    old_report = json.loads((project / "out" / "report.json").read_text())
    result = invoke("build", "--model", "net.py:net", *QUICK[2:], "--macs-ratio", "0.9", "--out", "out", "--force")
    assert result.exit_code == 0, result.stderr
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["budget"]["value"] == 0.9 and old_report["budget"]["value"] == 0.8
    assert not_an_output(project / "out") is None
    assert sorted(p.name for p in project.iterdir()) == ["bank", "calib.npz", "net.py", "out", "secrets.txt"]


def test_a_symlinked_out_is_refused_and_left_as_it_was(project, earlier_output):
    real = project / "real-out"
    shutil.copytree(earlier_output, real)
    (project / "link").symlink_to(real)
    (project / "dangling").symlink_to(project / "nowhere")
    before = snapshot(project)
    for link in ("link", "dangling"):
        result = invoke("build", "--model", "net.py:net", *QUICK, "--out", link, "--force")
        assert_one_line_error(result, 2, f"--out '{link}' is a symbolic link")
    assert snapshot(project) == before
    assert (project / "link").is_symlink() and (project / "dangling").is_symlink()


def test_a_build_that_finished_there_meanwhile_is_never_replaced(tmp_path):
    """Two builds claim the same absent folder; the first publishes; the second fails and leaves it alone."""
    out = tmp_path / "out"
    first, second = claim_output(out, False, []), claim_output(out, False, [])
    mine, theirs = new_workdir(first), new_workdir(second)
    (mine / "report.json").write_text('{"build": "first"}')
    (theirs / "report.json").write_text('{"build": "second"}')
    publish(mine, first)
    with pytest.raises(BadInput, match="changed while this build ran"):
        publish(theirs, second)
    assert (out / "report.json").read_text() == '{"build": "first"}'
    shutil.rmtree(theirs)  # the build's own clean-up does this
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_two_builds_to_one_folder_at_once_never_replace_each_other(project):
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--model", "net.py:net", *QUICK[2:], "--out", "shared"]
    ratios = ("0.8", "0.9")
    runs = [subprocess.Popen([*command, "--macs-ratio", r], stderr=subprocess.PIPE, text=True) for r in ratios]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in outcomes) == [0, 2], outcomes
    loser = next(stderr for code, stderr in outcomes if code == 2)
    assert "--out 'shared'" in loser.splitlines()[-1], loser
    winner = next(float(r) for r, (code, _) in zip(ratios, outcomes, strict=True) if code == 0)
    assert json.loads((project / "shared" / "report.json").read_text())["budget"]["value"] == winner
    assert not_an_output(project / "shared") is None
    assert not [p.name for p in project.iterdir() if p.name.startswith(".")]
