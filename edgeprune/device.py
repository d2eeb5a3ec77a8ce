"""Where a benchmark runs: this machine, or a board reached over SSH. Either way, the backend's runner script.

A subprocess rather than in-process keeps torch's threads and memory out of the measurement, and it is the same
script and arguments that a remote device runs, so local and remote figures mean the same thing.

An SSH device is the OpenSSH client driven with argument lists (never a local shell), ``--`` before the
destination, from a URL parsed strictly (no host, user or Python that could read as an option or a shell word):
each step (connect, upload, run, download, clean up) has its own timeout and, when it fails, a one-line DeviceError
that names it. Host keys are checked (StrictHostKeyChecking=yes): an unknown board is refused, not trusted.

Each run has a temporary folder ``edgeprune.*`` on the board, marked with its owner (this machine, this process, a
lease). Clean-up kills the runner's process group if it still runs (a run past its timeout), then removes the
folder; each connect also removes folders whose owner ended on this machine or whose lease ran out. Only the SSH
user's real folders holding the marker are removed, and only a process running that folder's runner.py is killed.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edgeprune.board import BOARD, LAUNCH
from edgeprune.errors import BadInput, DeviceError, DeviceUnreachable
from edgeprune.farm.pool import DevicePool

RUNNER = Path(__file__).parent / "backends" / "runner.py"
# Runner flags whose value is a file the runner reads (uploaded to the device) or writes (brought back).
READS, WRITES = ("--model", "--reference", "--inputs"), ("--outputs",)
# Files a model file needs beside it: OpenVINO's IR keeps its weights in model.bin next to model.xml.
COMPANIONS = {".xml": (".bin",)}
# Files of the artifact's folder the board's runtime reads beside the model: TensorRT's int8 calibration table.
SIBLINGS = ("calibration.cache",)
SSH_QUERY_KEYS = ("identity", "known_hosts", "python", "timeout")
MAX_TIMEOUT_S = 86400.0  # a day: far above any benchmark, and a number every clock and timer can hold
HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
USERNAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,254}")
PYTHON = re.compile(r"/[A-Za-z0-9._+/-]{0,4095}|[A-Za-z0-9._+][A-Za-z0-9._+-]{0,254}")
FOLDER = re.compile(r"/(?:[A-Za-z0-9._-]+/)*edgeprune\.[A-Za-z0-9_]+")
# ssh splits an -o value at spaces, quotes and backslashes, and expands '%' in key and known_hosts paths.
LOCAL_FILE_BAD = re.compile(r"[\s\"'\\%\x00-\x1f\x7f]")


def _parse_result(done: subprocess.CompletedProcess, where: str) -> dict:
    """The runner's JSON line from its stdout; a failed run is a DeviceError with the runner's own reason."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or not lines:
        reason = result.get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"runner failed on {where}: {reason}")
    return result


@dataclass(frozen=True)
class LocalDevice:
    """This machine: runs the runner with the current Python interpreter."""

    timeout_s: float = 600.0

    @property
    def label(self) -> str:
        return "local"

    def run_runner(self, args: list[str]) -> dict:
        """Run ``runner.py`` with ``args`` and return its JSON result; a failure is a one-line DeviceError."""
        command = [sys.executable, str(RUNNER), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"runner timed out after {self.timeout_s:.0f} s on {self.label}") from None
        return _parse_result(done, self.label)


@dataclass(frozen=True)
class SshDevice:
    """A board reached with ``ssh://[user@]host[:port][?identity=KEY&known_hosts=FILE&python=PATH&timeout=S]``.

    The board needs Python 3 with numpy and the target's runtime (openvino, onnxruntime or ai-edge-litert); the
    runner is copied for each run into a fresh temporary folder there, which is removed afterwards.
    """

    host: str
    user: str | None = None
    port: int = 22
    identity: str | None = None
    known_hosts: str | None = None
    python: str = "python3"
    timeout_s: float = 600.0  # the run step; every other step gets STEP_TIMEOUT_S
    connect_timeout_s: int = 10

    STEP_TIMEOUT_S = 120.0

    def __post_init__(self) -> None:
        problem = _problem(self.host, self.user, self.port, self.python, self.timeout_s)
        if problem:
            raise BadInput(f"device {self.label!r}: {problem}")

    @property
    def label(self) -> str:
        return f"ssh://{self._at(bracket=True)}:{self.port}"

    def _at(self, bracket: bool) -> str:
        host = f"[{self.host}]" if bracket and ":" in self.host else self.host  # URLs' and scp's form of IPv6
        return f"{self.user}@{host}" if self.user else host

    def _remote_path(self, path: str) -> str:
        return f"{self._at(bracket=True)}:{path}"

    @property
    def _lease_s(self) -> float:  # the longest a run can use its folder: the run step and every step around it
        return self.timeout_s + 8 * self.STEP_TIMEOUT_S

    def _options(self) -> list[str]:
        options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        options += ["-o", f"ConnectTimeout={self.connect_timeout_s}"]
        if self.identity:
            options += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return options

    def _step(self, step: str, command: list[str], timeout: float, stdin: str = "") -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DeviceUnreachable(f"{self.label}: step '{step}' timed out after {timeout:.0f} s") from None
        except OSError as exc:
            reason = f"{self.label}: step '{step}' could not start {command[0]}: {exc.strerror}"
            raise DeviceUnreachable(reason) from None
        # ssh exits 255 for its own failures (connection, authentication, host key); anything else is the remote
        # command's exit code, which the run step reads from the runner's JSON instead.
        if done.returncode == 255 or (done.returncode != 0 and step != "run"):
            raise DeviceUnreachable(f"{self.label}: step '{step}' failed: {self._reason(done.stderr)}")
        return done

    def _reason(self, stderr: str) -> str:
        lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("Warning:")]
        reason = lines[-1] if lines else "no message"
        if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr:
            reason += (" (the board's host key is not in known_hosts: check its fingerprint, then add it with"
                       f" ssh-keyscan -p {self.port} {self.host} >> ~/.ssh/known_hosts)")  # fmt: skip
        return reason

    def remote(self, step: str, argv: list[str], timeout: float | None = None, stdin: str = ""):
        """Run ``argv`` on the device. ssh hands the remote shell one string, so every argument is quoted."""
        command = ["ssh", *self._options(), "-p", str(self.port), "--", self._at(bracket=False), shlex.join(argv)]
        return self._step(step, command, timeout or self.STEP_TIMEOUT_S, stdin)

    def _copy(self, step: str, sources: list[str], target: str) -> None:
        # scp (SFTP protocol in OpenSSH 9) takes the remote path literally: no remote shell sees it. Local paths are
        # absolute, so that a ':' in one never reads as a host.
        command = ["scp", "-q", *self._options(), "-P", str(self.port), "--", *sources, target]
        self._step(step, command, self.STEP_TIMEOUT_S)

    def _board(self, step: str, request: dict) -> dict:
        """Run BOARD on the device with ``request``; its answer, or a DeviceUnreachable that names the step."""
        done = self.remote(step, [self.python, "-c", BOARD], stdin=json.dumps(request))
        try:
            answer = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        except (IndexError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            raise DeviceUnreachable(f"{self.label}: step '{step}' failed: the board's Python gave no answer")
        return answer

    def _stale(self, answer: dict) -> list[str]:
        """The folders of ``answer`` that no build can still use: lease run out, or owner ended on this machine."""
        me, stale = _host_id(), []
        for other in answer.get("others", []) if isinstance(answer.get("others"), list) else []:
            if not isinstance(other, dict) or not isinstance(other.get("folder"), str):
                continue
            if other.get("expired") is True or (me is not None and other.get("host") == me and _gone(other.get("pid"))):
                stale.append(other["folder"])
        return stale

    def _remove(self, folders: list[str]) -> None:
        if folders:
            try:
                self._board("clean up", {"do": "remove", "folders": folders})
            except DeviceError:
                pass  # a board that went away mid-run already failed the step that matters

    def check(self) -> None:
        """Reach the device and its Python, so a build fails before its slow steps; remove what killed builds left."""
        self._remove(self._stale(self._board("connect", {"do": "scan", "numpy": True})))

    def open_folder(self) -> tuple[str, list[str]]:
        """A fresh temporary folder on the device, marked as this process's, and the stale folders beside it."""
        owner = {"host": _host_id(), "pid": os.getpid(), "lease": self._lease_s}
        answer = self._board("connect", {"do": "open", "subfolders": [f.strip("-") for f in READS], "owner": owner})
        folder = answer.get("folder")
        if not isinstance(folder, str) or not FOLDER.fullmatch(folder):
            raise DeviceUnreachable(f"{self.label}: step 'connect' failed: the board gave no usable temporary folder")
        return folder, self._stale(answer)

    def run_runner(self, args: list[str]) -> dict:
        """Copy the runner and the files ``args`` name to a temporary folder on the device, run it there, bring
        back the files it writes, and remove the folder; the JSON result is the runner's, as on this machine."""
        folder, stale = self.open_folder()
        try:
            remote_args, downloads = [], []
            self._copy("upload", [str(RUNNER.absolute())], self._remote_path(f"{folder}/runner.py"))
            for flag, value in zip(["", *args], args, strict=False):
                local = Path(value).absolute()
                if flag in READS:
                    # One sub-folder per flag: the model and the reference are both called model.xml.
                    sub = f"{folder}/{flag.strip('-')}"
                    files = [local, *(local.with_suffix(s) for s in COMPANIONS.get(local.suffix, ()))]
                    files += [local.parent / name for name in SIBLINGS]
                    self._copy("upload", [str(f) for f in files if f.exists()], self._remote_path(f"{sub}/"))
                    value = f"{sub}/{local.name}"
                elif flag in WRITES:
                    value = f"{folder}/{flag.strip('-')}-{local.name}"
                    downloads.append((value, local))
                remote_args.append(value)
            launch = [self.python, "-c", LAUNCH, f"{folder}/runner.py", *remote_args]
            result = _parse_result(self.remote("run", launch, self.timeout_s), self.label)
            for remote_path, local in downloads:
                self._copy("download", [self._remote_path(remote_path)], str(local))
            return result
        finally:
            # Kills the runner where it still runs (the run step timed out), then removes the folder.
            self._remove([folder, *stale])


def _host_id() -> str | None:
    """This machine's pid namespace in this boot: only where it matches is a recorded pid this machine's process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _gone(pid: object) -> bool:
    """Whether a process of this machine has ended; anything but a plain pid counts as running (its folder stays)."""
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        pass
    return False


def _problem(host: str, user: str | None, port: int, python: str, timeout_s: float) -> str | None:
    """What is wrong with a device's fields, or None: nothing in them may read as an option or a shell word."""
    try:
        ipv6 = ":" in host and "%" not in host and bool(ipaddress.IPv6Address(host))  # zones: ssh and scp differ
    except ValueError:
        ipv6 = False
    if not ipv6 and not HOSTNAME.fullmatch(host):
        return (f"host {host!r} is not a hostname (letters, digits, '.', '-', '_'; not '-' first) nor an IPv6"
                " address in brackets (without a zone)")  # fmt: skip
    if user is not None and not USERNAME.fullmatch(user):
        return f"user {user!r} may hold only letters, digits, '.', '_' and '-' (not '-' first)"
    if type(port) is not int or not 0 < port < 65536:
        return f"port {port!r} must be 1 to 65535"
    if not PYTHON.fullmatch(python):
        return (f"python {python!r} must be an absolute path or a command name (letters, digits, '.', '_', '+', '-';"
                " no spaces, not '-' first)")  # fmt: skip
    if not isinstance(timeout_s, int | float) or not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        return f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f} (a day)"
    return None


def parse_ssh_url(url: str) -> SshDevice:
    """An SshDevice from its URL; anything malformed is a one-line BadInput that shows the expected form."""
    form = "ssh://[user@]host[:port][?identity=KEY&known_hosts=FILE&python=PATH&timeout=S]"
    if any(c.isspace() or not c.isprintable() for c in url):
        raise BadInput(f"device {url!r} holds spaces or control characters; expected {form}")
    try:
        parts = urlsplit(url)
        port = 22 if parts.port is None else parts.port
    except ValueError:
        raise BadInput(f"device '{url}' has a bad port or address; expected {form}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.password is not None or parts.fragment:
        raise BadInput(f"device '{url}' is not an SSH URL edgeprune can use; expected {form} (no password)")
    query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(SSH_QUERY_KEYS))
    if unknown:
        raise BadInput(f"device '{url}': unknown option(s) {', '.join(unknown)}; known: {', '.join(SSH_QUERY_KEYS)}")
    for key in ("identity", "known_hosts"):
        if key in query and LOCAL_FILE_BAD.search(query[key]):
            raise BadInput(f"device '{url}': {key} {query[key]!r} must be a path without spaces, quotes, '\\' or '%'")
        if key in query and not Path(query[key]).expanduser().is_file():
            raise BadInput(f"device '{url}': {key} file {query[key]} does not exist")
    try:
        timeout = float(query.get("timeout", 600))
    except ValueError:
        timeout = math.nan
    python = query.get("python") or "python3"
    problem = _problem(parts.hostname, parts.username, port, python, timeout)
    if problem:
        raise BadInput(f"device '{url}': {problem}")
    return SshDevice(
        host=parts.hostname, user=parts.username, port=port, python=python, timeout_s=timeout,
        identity=str(Path(query["identity"]).expanduser().absolute()) if "identity" in query else None,
        known_hosts=str(Path(query["known_hosts"]).expanduser().absolute()) if "known_hosts" in query else None,
    )  # fmt: skip


Device = LocalDevice | SshDevice


def open_device(url: str | None, check: bool = True) -> Device:
    """The device a URL names: None or 'local' is this machine, ``ssh://…`` a board (reached once to check), and
    several URLs separated by commas a pool of boards that share a build's benchmarks (farm/pool.py)."""
    if url and "," in url:
        return DevicePool([open_device(part.strip(), check) for part in url.split(",") if part.strip()])
    if url in (None, "", "local"):
        return LocalDevice()
    if url.startswith("ssh://"):
        device = parse_ssh_url(url)
        if check:
            device.check()
        return device
    raise BadInput(f"device '{url}' is not supported: use 'local' or ssh://[user@]host[:port]")
