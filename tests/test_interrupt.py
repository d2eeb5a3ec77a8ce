"""Builds killed at several stages leave no partial output, and can simply be run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CNN

# A conv stack built in code: the stages are the same as a big model's, only quicker to reach.
MODEL = TINY_CNN
BUILD = [sys.executable, "-m", "edgeprune.cli", "build", "--model", MODEL, "--input-shape", "1,3,64,64", "--out", "out"]


def start(folder: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", COLUMNS="200")
    # SIGINT as a terminal's Ctrl-C delivers it: a native library the test process loaded can leave SIGINT ignored,
    # and an ignored signal stays ignored in children (Python then installs no KeyboardInterrupt handler).
    return subprocess.Popen([*BUILD, *extra], cwd=folder, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for(process: subprocess.Popen, marker: str, timeout: float = 240) -> list[str]:
    """Read the build's progress lines until one contains ``marker``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return seen
    process.kill()
    pytest.fail(f"the build never reached {marker!r}: {''.join(seen)[-800:]}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("budget", "marker", "sig", "code"),
    [
        ("--speedup=1.5", "measuring the unpruned model ...", signal.SIGINT, 130),
        ("--speedup=1.5", "round 1:", signal.SIGTERM, 143),
        # A budget the unpruned model meets skips the search and reaches the last stage quickly.
        ("--latency-ms=1000", "exporting and validating the final artifact ...", signal.SIGTERM, 143),
    ],
)
def test_a_killed_build_leaves_nothing(tmp_path, budget, marker, sig, code):
    process = start(tmp_path, budget)
    wait_for(process, marker)
    process.send_signal(sig)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == code, rest
    assert "no output was written" in rest and "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "partial output left behind"


@pytest.mark.slow
def test_after_sigkill_the_next_build_cleans_up_and_succeeds(tmp_path):
    process = start(tmp_path, "--speedup", "1.5")
    wait_for(process, "measuring the unpruned model ...")
    process.kill()  # SIGKILL: no handler runs, the partial folder stays
    process.wait(timeout=60)
    partial = [p.name for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".out.partial-")
    # Run again: a budget the unpruned model meets, so the build is quick; the dead run's folder is removed.
    again = start(tmp_path, "--latency-ms", "1000")
    rest = again.stderr.read()
    assert again.wait(timeout=240) == 0, rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "report.json").is_file()


# A model whose first forward pass sends the build SIGTERM from inside a finaliser. The handler's exception is raised
# there, and Python only prints it ("Exception ignored in ...") and goes on: the way a library that catches everything
# once let a build run to the end and exit 0 after a SIGTERM.
SWALLOWING_MODEL = """
import os, signal
from torch import nn

class SignalInFinaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100000):  # bytecodes for the handler to run on, inside this finaliser
            pass

class Net(nn.Sequential):
    sent = False

    def forward(self, x):
        if not Net.sent:
            Net.sent = True
            SignalInFinaliser()  # dropped at once: its finaliser runs here
        return super().forward(x)

def net():
    return Net(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
"""


@pytest.mark.slow
def test_a_stop_signal_whose_exception_is_swallowed_still_stops_the_build(tmp_path):
    (tmp_path / "swallow.py").write_text(SWALLOWING_MODEL)
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
    done = subprocess.run(
        [sys.executable, "-m", "edgeprune.cli", "build", "--model", f"{tmp_path / 'swallow.py'}:net",
         "--input-shape", "1,3,32,32", "--speedup", "1.5", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert "Exception ignored" in done.stderr, "the signal's exception was not swallowed: the test proves nothing"
    assert done.returncode == 143, done.stderr[-1500:]
    assert "terminated; no output was written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swallow.py"], "partial output left behind"


# A child forked while the parent held a lock in C, waiting on it (pthread_mutex_lock is not interrupted by
# signals), as OpenVINO's usage-report process did; the parent then stops it as multiprocessing does, SIGTERM.
FORKED_CHILD_STUCK_IN_A_LOCK = """
import ctypes, multiprocessing, os, signal, sys
from edgeprune.errors import install_stop_handlers
if sys.argv[1] == "ours":
    install_stop_handlers()
    install_stop_handlers()  # twice: what came before ours is still SIG_DFL
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
libc.pthread_mutex_lock(mutex)
child = multiprocessing.get_context("fork").Process(target=libc.pthread_mutex_lock, args=(mutex,), daemon=True)
child.start()
child.join(0.5)
child.terminate()
child.join(10)
print(child.exitcode, signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)
if child.is_alive():
    os.kill(child.pid, signal.SIGKILL)
"""


@pytest.mark.parametrize("handlers", ["ours", "python's"])
def test_sigterm_stops_a_child_a_library_forked_even_stuck_in_a_lock(handlers):
    """A finished demo build hung for 10 minutes after "wrote out/": OpenVINO's forked usage-report child waited on
    a lock forever, and our SIGTERM handler, Python code it never ran, kept it alive when multiprocessing stopped it
    at exit. A forked child gets back the handlers that were there before ours (SIG_DFL): SIGTERM stops it."""
    done = subprocess.run([sys.executable, "-c", FORKED_CHILD_STUCK_IN_A_LOCK, handlers], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    exitcode, parent_has_ours = done.stdout.split()
    assert exitcode == str(-signal.SIGTERM)
    assert parent_has_ours == str(handlers == "ours")  # the parent keeps its handler
