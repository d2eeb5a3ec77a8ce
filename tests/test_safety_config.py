"""Configs, flags and model files as an attacker or a careless hand writes them: every wrong type or value is one
line on stderr and exit 2 with nothing written, and weights are unpickled only when a real boolean or the flag says
so, which the build then announces."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.model import load_model

MODEL = """
import sys
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, exit_on_call=0):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 3))
        self.exit_on_call, self.calls = exit_on_call, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.exit_on_call:
            sys.exit(5)
        return self.body(x)


class Custom(BaseException):
    pass


def net():
    return Net()


def exits():
    sys.exit(0)


def closes():
    raise GeneratorExit()


def raises_custom():
    raise Custom("not an Exception")


def exits_in_forward():
    return Net(exit_on_call=1)


def exits_later():
    return Net(exit_on_call=3)
"""
TARGET = '\n[[targets]]\nname = "x86-openvino"\nlatency_ms = 1000.0\n'
SHAPE = ["--input-shape", "1,3,32,32"]
FAST = ["--model", "net.py:net", *SHAPE, "--latency-ms", "1000", "--recover-steps", "0"]


class Marker:
    """A pickled object whose unpickling creates a file: proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    (tmp_path / "net.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def build(*args: str):
    return CliRunner().invoke(app, ["build", *args])


def contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_refused(result, folder: Path, before: list[str], *words: str, only_line: bool = True) -> str:
    """Exit 2, one error line holding ``words`` (the only line on stderr unless progress came first), no traceback,
    and the folder as it was."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert len(errors) == 1, result.stderr
    if only_line:
        assert result.stderr.strip().splitlines() == errors, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert contents(folder) == before
    return errors[0]


# --- the project config: every setting typed and bounded ---

BAD_SETTINGS = [
    ('trust_pickle = "false"', "true or false"),
    ("trust_pickle = 0", "true or false"),
    ('strict = "yes"', "true or false"),
    ("compensate = 1", "true or false"),
    ("out = 5", "string"),
    ('out = ""', "non-empty string"),
    ("model = 5", "string"),
    ('model = "net.py:net\\nsecond line"', "one line"),
    ('method = ["auto"]', "string"),
    ("device = 7", "URL"),
    ("device = []", "URL"),
    ('device = ["ssh://a", 5]', "URL"),
    ('max_rounds = "x"', "integer"),
    ("max_rounds = 4.0", "integer"),
    ("max_rounds = true", "integer"),
    ("max_rounds = 0", "at least 1"),
    ("max_rounds = 1000000000", "at most 100"),
    ('seed = "abc"', "integer"),
    ("seed = -1", "at least 0"),
    ("seed = 4294967296", "at most 4294967295"),
    ('in_flight = "many"', "integer"),
    ("in_flight = 100000", "at most 64"),
    ("recover_steps = 10000000", "at most 100000"),
    ("adapt_steps = 10000000", "at most 100000"),
    ("calib_limit = 0", "at least 1"),
    ("calib_limit = 10000000000", "at most 1000000"),
    ("drop_blocks = 1000000", "at most 1000"),
    ("drop_blocks = -1", "count of 0 or more"),
    ('drop_blocks = "garbage"', "or auto"),
    ("input_shape = [1, 3, 100000, 100000]", "65536"),
    ("input_shape = [1, 3, 16384, 16384]", "values in all"),
    ("input_shape = [3]", "list of 2 to 8"),
]


@pytest.mark.parametrize(("line", "words"), BAD_SETTINGS, ids=[line[:40] for line, _ in BAD_SETTINGS])
def test_a_setting_of_the_wrong_type_or_range_is_one_line_and_exit_2(folder, line, words):
    key = line.split(" = ")[0]
    base = {"model": '"net.py:net"', "input_shape": "[1, 3, 32, 32]"}
    settings = "".join(f"{k} = {v}\n" for k, v in base.items() if k != key)
    (folder / "edgeprune.toml").write_text(f"{settings}{line}\n{TARGET}")
    before = contents(folder)
    assert_refused(build(), folder, before, "edgeprune.toml", key, words)


@pytest.mark.parametrize("line", ["seed = " + "9" * 5000, "seed = " + "[" * 5000 + "]" * 5000])
def test_a_pathological_config_is_one_line(folder, line):
    (folder / "edgeprune.toml").write_text(f'model = "net.py:net"\n{line}\n{TARGET}')
    before = contents(folder)
    assert_refused(build(), folder, before, "edgeprune.toml", "not a usable TOML file")


def test_a_tool_table_that_is_not_a_table_is_one_line(folder):
    (folder / "pyproject.toml").write_text('[project]\nname = "x"\n[tool]\nedgeprune = 5\n')
    before = contents(folder)
    assert_refused(build("--config", "pyproject.toml"), folder, before, "pyproject.toml", "[tool.edgeprune]")


# --- the flags: the same bounds, from the same table ---

BAD_FLAGS = [
    (["--max-rounds", "1000000000"], "--max-rounds must be at least 1 and at most 100"),
    (["--in-flight", "100000"], "--in-flight must be at least 1 and at most 64"),
    (["--recover-steps", "1000000000"], "--recover-steps must be at least 0 and at most 100000"),
    (["--adapt-steps", "1000000000"], "--adapt-steps must be at least 0 and at most 100000"),
    (["--calib-limit", "1000000000"], "--calib-limit must be at least 1 and at most 1000000"),
    (["--drop-blocks", "garbage"], "--drop-blocks takes a count of 0 or more"),
    (["--drop-blocks", "99999"], "at most 1000"),
    (["--input-shape", "1,3,100000,100000"], "--input-shape"),
    (["--latency-ms", "1e300"], "--latency-ms must be positive and at most 3600000"),
    (["--speedup", "1e9"], "--speedup must be at least 1 and at most 1000"),
    (["--memory-mb", "1e12"], "--memory-mb must be positive and at most 1000000"),
]


@pytest.mark.parametrize(("args", "words"), BAD_FLAGS, ids=[" ".join(args) for args, _ in BAD_FLAGS])
def test_a_flag_out_of_range_is_one_line_and_exit_2(folder, args, words):
    before = contents(folder)
    budget = [] if args[0] in ("--latency-ms", "--speedup", "--memory-mb") else ["--latency-ms", "1000"]
    assert_refused(build("--model", "net.py:net", *SHAPE, *budget, *args, "--out", "out"), folder, before, words)


# --- unpickling: only a real boolean turns it on, and the build says who did ---


def _malicious(path: Path, marker: Path, raw: bool = False) -> None:
    if raw:  # a bare pickle (protocol 4, which torch's weights-only reader also warns about), not torch's zip
        path.write_bytes(pickle.dumps({"body.0.weight": Marker(marker)}, protocol=4))
    else:
        torch.save({"body.0.weight": Marker(marker)}, path)


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_a_malicious_pickle_is_refused_as_pickled_objects_and_never_runs(folder, raw):
    _malicious(folder / "evil.pt", folder / "PWNED", raw)
    before = contents(folder)
    result = build(*FAST, "--weights", "evil.pt", "--out", "out")
    assert_refused(result, folder, before, "evil.pt", "holds pickled objects", "refuses", only_line=False)
    assert not (folder / "PWNED").exists()


def test_a_string_false_does_not_unpickle(folder):
    _malicious(folder / "evil.pt", folder / "PWNED")
    (folder / "edgeprune.toml").write_text(
        f'model = "net.py:net"\ninput_shape = [1, 3, 32, 32]\nweights = "evil.pt"\ntrust_pickle = "false"\n{TARGET}'
    )
    before = contents(folder)
    result = build()
    assert not (folder / "PWNED").exists()
    assert_refused(result, folder, before, "edgeprune.toml", "trust_pickle")
    (folder / "edgeprune.toml").write_text(
        f'model = "net.py:net"\ninput_shape = [1, 3, 32, 32]\nweights = "evil.pt"\ntrust_pickle = false\n{TARGET}'
    )
    before = contents(folder)
    assert_refused(build(), folder, before, "holds pickled objects", only_line=False)
    assert not (folder / "PWNED").exists()


def test_a_config_that_turns_unpickling_on_is_announced_with_its_file(folder):
    torch.save(load_model("net.py:net", input_shape=(1, 3, 32, 32)).module.state_dict(), folder / "w.pt")
    (folder / "edgeprune.toml").write_text(
        'model = "net.py:net"\ninput_shape = [1, 3, 32, 32]\nweights = "w.pt"\ntrust_pickle = true\n'
        f"recover_steps = 0\nout = 'build'\n{TARGET}"
    )
    result = build()
    assert result.exit_code == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "unpickling" in line]
    assert len(said) == 1 and "ON" in said[0] and "edgeprune.toml" in said[0], result.stderr
    assert (folder / "build" / "x86-openvino" / "report.json").is_file()


def test_the_flag_that_turns_unpickling_on_is_announced(folder):
    before = contents(folder)
    result = build("--model", "net.py:net", *SHAPE, "--weights", "missing.pt", "--trust-pickle", "--out", "out")
    assert_refused(result, folder, before, "missing.pt", only_line=False)
    said = [line for line in result.stderr.splitlines() if "unpickling" in line]
    assert len(said) == 1 and "ON" in said[0] and "--trust-pickle" in said[0], result.stderr


@pytest.mark.slow
def test_a_warning_of_torch_while_loading_weights_keeps_the_error_to_one_line(folder):
    """Torch warns about a pickle's protocol as it reads it; the user still sees one line, in a real process."""
    _malicious(folder / "evil.pt", folder / "PWNED", raw=True)
    command = [sys.executable, "-m", "edgeprune.cli", "build", *FAST, "--weights", "evil.pt", "--out", "out"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("edgeprune: error: weights file 'evil.pt' holds pickled")
    assert not (folder / "PWNED").exists() and not (folder / "out").exists()


# --- model code that exits is a failed build ---

EXITS = [
    ("net.py:exits", ["model factory 'net.py:exits'", "called sys.exit(0)"]),
    ("net.py:closes", ["model factory 'net.py:closes'", "GeneratorExit"]),
    ("net.py:raises_custom", ["model factory 'net.py:raises_custom'", "Custom", "not an Exception"]),
    ("net.py:exits_in_forward", ["model 'net.py:exits_in_forward'", "called sys.exit(5)"]),
    ("net.py:exits_later", ["sys.exit(5)", "nothing was written"]),
    ("exit_at_import.py:net", ["model file 'exit_at_import.py'", "called sys.exit(3)"]),
]


@pytest.mark.parametrize(("spec", "words"), EXITS, ids=[spec for spec, _ in EXITS])
def test_model_code_that_exits_is_a_failed_build(folder, spec, words):
    (folder / "exit_at_import.py").write_text("import sys\nsys.exit(3)\n")
    before = contents(folder)
    result = build("--model", spec, *SHAPE, "--latency-ms", "1000", "--recover-steps", "0", "--out", "out")
    assert_refused(result, folder, before, *words, only_line=False)
