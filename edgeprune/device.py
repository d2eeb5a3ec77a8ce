"""Where a benchmark runs: this machine, or a board reached over SSH. Either way, the backend's runner script.

A subprocess rather than in-process keeps torch's threads and memory out of the measurement, and it is the same
script and arguments that a remote device runs, so local and remote figures mean the same thing.

An SSH device is the OpenSSH client driven with argument lists (never a local shell): each step (connect, upload,
run, download, clean up) has its own timeout and, when it fails, a one-line DeviceError that names it. Host keys
are checked (StrictHostKeyChecking=yes): an unknown board is refused rather than trusted on first use.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edgeprune.errors import BadInput, EdgepruneError

RUNNER = Path(__file__).parent / "backends" / "runner.py"
# Runner flags whose value is a file the runner reads (uploaded to the device) or writes (brought back).
READS, WRITES = ("--model", "--reference", "--inputs"), ("--outputs",)
# Files a model file needs beside it: OpenVINO's IR keeps its weights in model.bin next to model.xml.
COMPANIONS = {".xml": (".bin",)}
# Files of the artifact's folder the board's runtime reads beside the model: TensorRT's int8 calibration table.
SIBLINGS = ("calibration.cache",)
SSH_QUERY_KEYS = ("identity", "known_hosts", "python", "timeout")


class DeviceError(EdgepruneError):
    """A benchmark or validation run failed on the device: exit code 2, with the step that failed."""

    exit_code = 2


class DeviceUnreachable(DeviceError):
    """The device itself failed (no connection, a step past its timeout), not the model run on it: a device pool
    sets such a device aside and gives its work to the others (farm/pool.py)."""


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

    @property
    def label(self) -> str:
        return f"ssh://{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    @property
    def _destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _options(self) -> list[str]:
        options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        options += ["-o", f"ConnectTimeout={self.connect_timeout_s}"]
        if self.identity:
            options += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return options

    def _step(self, step: str, command: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
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

    def remote(self, step: str, argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on the device. ssh hands the remote shell one string, so every argument is quoted."""
        command = ["ssh", *self._options(), "-p", str(self.port), self._destination, "--", shlex.join(argv)]
        return self._step(step, command, timeout or self.STEP_TIMEOUT_S)

    def _copy(self, step: str, sources: list[str], target: str) -> None:
        # scp (SFTP protocol in OpenSSH 9) takes the remote path literally: no remote shell sees it.
        command = ["scp", "-q", *self._options(), "-P", str(self.port), *sources, target]
        self._step(step, command, self.STEP_TIMEOUT_S)

    def check(self) -> None:
        """Reach the device and its Python once, so a build fails before its slow steps, not after them."""
        self.remote("connect", [self.python, "-c", "import numpy"])

    def run_runner(self, args: list[str]) -> dict:
        """Copy the runner and the files ``args`` name to a temporary folder on the device, run it there, bring
        back the files it writes, and remove the folder; the JSON result is the runner's, as on this machine."""
        folder = self.remote("connect", ["mktemp", "-d", "-t", "edgeprune.XXXXXXXX"]).stdout.strip()
        if not folder.startswith("/"):
            raise DeviceUnreachable(f"{self.label}: step 'connect' failed: mktemp gave no folder ({folder[:80]!r})")
        try:
            remote_args, downloads = [], []
            self.remote("upload", ["mkdir", *(f"{folder}/{flag.strip('-')}" for flag in READS)])
            self._copy("upload", [str(RUNNER)], f"{self._destination}:{folder}/runner.py")
            for flag, value in zip(["", *args], args, strict=False):
                local = Path(value)
                if flag in READS:
                    # One sub-folder per flag: the model and the reference are both called model.xml.
                    sub = f"{folder}/{flag.strip('-')}"
                    files = [local, *(local.with_suffix(s) for s in COMPANIONS.get(local.suffix, ()))]
                    files += [local.parent / name for name in SIBLINGS]
                    self._copy("upload", [str(f) for f in files if f.exists()], f"{self._destination}:{sub}/")
                    value = f"{sub}/{local.name}"
                elif flag in WRITES:
                    value = f"{folder}/{flag.strip('-')}-{local.name}"
                    downloads.append((value, local))
                remote_args.append(value)
            done = self.remote("run", [self.python, f"{folder}/runner.py", *remote_args], self.timeout_s)
            result = _parse_result(done, self.label)
            for remote_path, local in downloads:
                self._copy("download", [f"{self._destination}:{remote_path}"], str(local))
            return result
        finally:
            try:
                self.remote("clean up", ["rm", "-rf", "--", folder])
            except DeviceError:
                pass  # a board that went away mid-run already failed the step that matters


def parse_ssh_url(url: str) -> SshDevice:
    """An SshDevice from its URL; anything malformed is a one-line BadInput that shows the expected form."""
    form = "ssh://[user@]host[:port][?identity=KEY&known_hosts=FILE&python=PATH&timeout=S]"
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        raise BadInput(f"device '{url}' has a bad port; expected {form}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.password:
        raise BadInput(f"device '{url}' is not an SSH URL edgeprune can use; expected {form} (no password)")
    query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(SSH_QUERY_KEYS))
    if unknown:
        raise BadInput(f"device '{url}': unknown option(s) {', '.join(unknown)}; known: {', '.join(SSH_QUERY_KEYS)}")
    for key in ("identity", "known_hosts"):
        if key in query and not Path(query[key]).expanduser().is_file():
            raise BadInput(f"device '{url}': {key} file {query[key]} does not exist")
    try:
        timeout = float(query.get("timeout", 600))
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise BadInput(f"device '{url}': timeout must be a positive number of seconds")
    return SshDevice(
        host=parts.hostname, user=parts.username, port=port, python=query.get("python") or "python3",
        identity=str(Path(query["identity"]).expanduser()) if "identity" in query else None,
        known_hosts=str(Path(query["known_hosts"]).expanduser()) if "known_hosts" in query else None,
        timeout_s=timeout,
    )  # fmt: skip


Device = LocalDevice | SshDevice


def open_device(url: str | None, check: bool = True) -> Device:
    """The device a URL names: None or 'local' is this machine, ``ssh://…`` a board (reached once to check), and
    several URLs separated by commas a pool of boards that share a build's benchmarks (farm/pool.py)."""
    if url and "," in url:
        from edgeprune.farm.pool import DevicePool

        return DevicePool.open([part.strip() for part in url.split(",") if part.strip()], check)
    if url in (None, "", "local"):
        return LocalDevice()
    if url.startswith("ssh://"):
        device = parse_ssh_url(url)
        if check:
            device.check()
        return device
    raise BadInput(f"device '{url}' is not supported: use 'local' or ssh://[user@]host[:port]")
