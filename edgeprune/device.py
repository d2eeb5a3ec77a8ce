"""Where a benchmark runs. This machine for now: the backend's runner script in a fresh subprocess.

A subprocess rather than in-process keeps torch's threads and memory out of the measurement, and it is the same
script and arguments that a remote device will run, so local and remote figures mean the same thing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import BadInput, EdgepruneError

RUNNER = Path(__file__).parent / "backends" / "runner.py"


class DeviceError(EdgepruneError):
    """A benchmark or validation run failed on the device: exit code 2, with the step that failed."""

    exit_code = 2


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
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {}
        if done.returncode != 0 or not lines:
            reason = result.get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"runner failed on {self.label}: {reason}")
        return result


def open_device(url: str | None) -> LocalDevice:
    """The device a URL names; None or 'local' is this machine."""
    if url in (None, "", "local"):
        return LocalDevice()
    raise BadInput(f"device '{url}' is not supported yet: only this machine ('local') is; SSH devices come later")
