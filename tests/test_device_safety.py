"""SSH devices against hostile URLs, runs past their timeout and builds killed mid-run: the URL is refused before any
``ssh`` starts, options never reach ``ssh`` or ``scp`` as a destination, a timed-out runner is killed on the board,
and the board's temporary folders left by killed builds are removed, never anything else (tests/sshd.py's server)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sshd import sshd_available

from edgeprune.device import DeviceError, SshDevice, open_device, parse_ssh_url
from edgeprune.errors import BadInput

needs_sshd = pytest.mark.skipif(not sshd_available(), reason="needs /usr/sbin/sshd (apt-get install openssh-server)")
FOREVER = ["--shape", "1,4", "--iterations", "1000000000"]  # the runner's timed loop, far past any test's timeout


def _relu_model(folder: Path, name: str) -> Path:
    """A one-node ONNX model (ReLU on a 1x4 float tensor) that onnxruntime loads in milliseconds."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    path = folder / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


def _runners(marker: str) -> dict[int, str]:
    """Runner processes on this machine (the board, here) whose arguments name ``marker``: pid → runner.py's path.
    The local ``ssh`` carries the same words inside one joined argument, so it never counts."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        scripts = [arg for arg in argv if arg.endswith("/runner.py")]
        if scripts and any(marker in arg for arg in argv):
            found[int(entry.name)] = scripts[0]
    return found


def _end(pids) -> None:
    """Kill leftover runners this test started (by pid), so that a failing run leaves nothing behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- URLs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ssh://-oProxyCommand=touch marker@127.0.0.1:1",
        "ssh://-oProxyCommand=touch${IFS}marker",
        "ssh://-oProxyCommand=touch%20marker@127.0.0.1:1",
        "ssh://user@-oProxyCommand=touch",
        "ssh://-user@127.0.0.1:1",
        "ssh://us;er@127.0.0.1:1",
        "ssh://us$(touch marker)er@127.0.0.1:1",
        "ssh://a b@127.0.0.1:1",
        "ssh://user@ho\nst",
        "ssh://user@ho\tst",
        "ssh://us\x00er@host",
        "ssh://user@host%0a",
        "ssh://user@ho'st",
        "ssh://[::1",
        "ssh://[fe80::1%25eth0]:22",
        "ssh://[not-an-address]:22",
        "ssh://user@127.0.0.1:0",
        "ssh://user@127.0.0.1:1?python=-c",
        "ssh://user@127.0.0.1:1?python=python3%20-c%20import%20os",
        "ssh://user@127.0.0.1:1?python=python3;touch%20marker",
        "ssh://user@127.0.0.1:1?python=bin/python3",
        "ssh://user@127.0.0.1:1?python=-oProxyCommand=touch%20marker",
    ],
)
def test_a_hostile_device_url_is_one_line_bad_input_and_starts_no_ssh(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a ProxyCommand or a remote shell that ran would leave its file here
    with pytest.raises(BadInput) as refused:
        open_device(url)  # check=True: a URL that parsed would be reached over ssh at once
    assert "\n" not in str(refused.value) and "\r" not in str(refused.value)
    assert list(tmp_path.iterdir()) == [], "something ran"


@pytest.mark.parametrize("url", ["ssh://user@host:2222", "ssh://pi.board-1_a@Board-7.local", "ssh://[::1]:22",
                                 "ssh://ci@[2001:db8::7]?python=/opt/venv/bin/python3.11&timeout=86400"])  # fmt: skip
def test_ordinary_device_urls_still_parse(url):
    device = parse_ssh_url(url)
    assert device.host in ("host", "board-7.local", "::1", "2001:db8::7")
    assert device.label.startswith("ssh://")


@pytest.mark.parametrize("timeout", ["inf", "-inf", "nan", "1e999", "0", "-3", "86401", "", "soon"])
def test_a_timeout_must_be_finite_and_at_most_a_day(timeout):
    with pytest.raises(BadInput, match=r"timeout must be .*86400") as refused:
        parse_ssh_url(f"ssh://host?timeout={timeout}")
    assert "\n" not in str(refused.value)
    with pytest.raises(BadInput, match="timeout"):
        SshDevice(host="board", timeout_s=float("inf"))
    assert parse_ssh_url("ssh://host?timeout=0.5").timeout_s == 0.5


# --- Against the local sshd -----------------------------------------------------------------------------------------


@needs_sshd
def test_ssh_and_scp_end_their_options_with_a_double_dash(server, tmp_path, monkeypatch):
    """Every ssh and scp the device starts (logged by a pass-through wrapper on PATH) has ``--`` before the
    destination and the files, so no host, user or path can ever be read as an option."""
    log, wrappers = tmp_path / "log", tmp_path / "bin"
    log.mkdir()
    wrappers.mkdir()
    for tool in ("ssh", "scp"):
        script = wrappers / tool
        script.write_text(f'#!/bin/sh\nprintf "%s\\0" "$0" "$@" > "{log}/$$"\nexec {shutil.which(tool)} "$@"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    inputs = np.array([[-1.0, 2.0, -3.0, 4.0]], dtype=np.float32)
    np.save(tmp_path / "in.npy", inputs)
    device = open_device(server.url())
    device.run_runner(["--runtime", "onnxruntime", "--model", str(_relu_model(tmp_path, "m.onnx")), "--shape", "1,4",
                       "--inputs", str(tmp_path / "in.npy"), "--outputs", str(tmp_path / "out.npy")])  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "out.npy"), np.maximum(inputs, 0))
    calls = [entry.read_bytes().decode().split("\0")[:-1] for entry in log.iterdir()]
    destination = f"{device.user}@{device.host}"
    tools = [Path(argv[0]).name for argv in calls]
    assert tools.count("ssh") >= 3 and tools.count("scp") >= 3  # connect, run, clean up; runner, model, download
    for argv in calls:
        assert "--" in argv, argv
        after = argv[argv.index("--") + 1 :]
        if Path(argv[0]).name == "ssh":
            assert after[0] == destination and destination not in argv[: argv.index("--")]
        else:  # every source and target: local paths are absolute, remote ones name the destination
            assert len(after) >= 2 and all(arg.startswith(("/", f"{destination}:")) for arg in after), argv


@needs_sshd
def test_a_timed_out_run_is_killed_on_the_device(server, tmp_path):
    marker = f"slow-{uuid.uuid4().hex}"
    model = _relu_model(tmp_path, f"{marker}.onnx")
    device = dataclasses.replace(parse_ssh_url(server.url()), timeout_s=4.0)
    seen: dict[int, str] = {}
    watching = threading.Event()

    def watch() -> None:  # proves the runner did start on the board before the timeout
        while not watching.is_set():
            seen.update(_runners(marker))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(DeviceError, match=r"step 'run' timed out after 4 s"):
            device.run_runner(["--runtime", "onnxruntime", "--model", str(model), *FOREVER])
    finally:
        watching.set()
        watcher.join()
    try:
        assert seen, "the runner never started on the board"
        assert _wait_for(lambda: not _runners(marker), 3.0), "the runner kept running on the board after its timeout"
        assert not any(Path(script).parent.exists() for script in seen.values()), "its folder was left behind"
    finally:
        _end(_runners(marker))


@needs_sshd
def test_the_next_connect_removes_what_a_killed_build_left_and_nothing_else(server, tmp_path):
    marker = f"killed-{uuid.uuid4().hex}"
    model = _relu_model(tmp_path, f"{marker}.onnx")
    code = ("import sys; from edgeprune.device import parse_ssh_url; "
            "parse_ssh_url(sys.argv[1]).run_runner(sys.argv[2:])")  # fmt: skip
    build = subprocess.Popen([sys.executable, "-c", code, server.url(), "--runtime", "onnxruntime",
                              "--model", str(model), *FOREVER], start_new_session=True)  # fmt: skip
    keep, note = None, None
    try:
        assert _wait_for(lambda: _runners(marker), 30.0), "the build's runner never started on the board"
        os.killpg(build.pid, signal.SIGKILL)  # the whole local job, ssh included, as CI cancels it
        build.wait()
        folder = Path(next(iter(_runners(marker).values()))).parent
        assert folder.is_dir() and folder.name.startswith("edgeprune."), "no folder was left to clean"
        # Beside it, names that edgeprune did not write: a folder without its marker, and a file.
        keep, note = folder.parent / f"edgeprune.keepme-{marker}", folder.parent / f"edgeprune.{marker}.txt"
        keep.mkdir()
        (keep / "data.txt").write_text("mine")
        note.write_text("mine too")
        open_device(server.url())  # the next build's connect
        assert _wait_for(lambda: not _runners(marker), 3.0), "the killed build's runner is still running"
        assert not folder.exists(), "the killed build's folder is still on the board"
        assert (keep / "data.txt").read_text() == "mine" and note.read_text() == "mine too"
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
        runners = _runners(marker)
        _end(runners)
        for script in runners.values():
            shutil.rmtree(Path(script).parent, ignore_errors=True)
        if keep:
            shutil.rmtree(keep, ignore_errors=True)
        if note:
            note.unlink(missing_ok=True)


@pytest.mark.slow
@needs_sshd
def test_folders_of_live_builds_and_other_hosts_are_kept_until_their_lease_runs_out(server, tmp_path):
    """A folder is stale when its owner ran on this host and is gone, or when its lease (the longest its build could
    still use it) has run out on the board's clock; a live owner's folder, and another host's within its lease, stay.
    A marker that is not edgeprune's own (malformed, or a symlink) keeps its folder too."""
    device = parse_ssh_url(server.url())
    live = Path(device.open_folder()[0])  # owned by this test's process, which is alive
    elsewhere, expired, garbled, linked = (live.parent / f"edgeprune.{name}-{uuid.uuid4().hex[:8]}"
                                           for name in ("elsewhere", "expired", "garbled", "linked"))  # fmt: skip
    record = json.loads((live / "edgeprune-owner.json").read_text())
    others = {elsewhere: dict(record, host="another-host"),
              expired: dict(record, host="another-host", clock=record["clock"] - 10 * record["lease"])}  # fmt: skip
    try:
        for folder, owner in others.items():
            folder.mkdir()
            (folder / "edgeprune-owner.json").write_text(json.dumps(owner))
        garbled.mkdir()
        (garbled / "edgeprune-owner.json").write_text("{not json")
        linked.mkdir()
        (linked / "edgeprune-owner.json").symlink_to(live / "edgeprune-owner.json")
        open_device(server.url())
        assert live.is_dir() and elsewhere.is_dir() and garbled.is_dir() and linked.is_dir()
        assert not expired.exists(), "a folder past its lease was kept"
    finally:
        for folder in (live, elsewhere, expired, garbled, linked):
            shutil.rmtree(folder, ignore_errors=True)
