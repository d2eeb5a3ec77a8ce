"""The errors edgeprune reports to a user: each carries the exit code the CLI ends with (docs/cli.md, "Exit codes").

A message is one line that says what is wrong and what to do about it; the CLI prints it on stderr, without a
traceback, and exits with the code.
"""

from __future__ import annotations

import os
import signal


class EdgepruneError(Exception):
    """Base of the errors the CLI turns into a one-line message and an exit code."""

    exit_code = 2


class BadInput(EdgepruneError):
    """The user's input (a flag, a file, a profile, a model spec) is wrong: exit code 2."""

    exit_code = 2


class BudgetNotMet(EdgepruneError):
    """The budget or the validation was not met: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class DeviceError(EdgepruneError):
    """A benchmark or validation run failed on the device: exit code 2, with the step that failed."""

    exit_code = 2


class DeviceUnreachable(DeviceError):
    """The device itself failed (no connection, a step past its timeout), not the model run on it: a device pool
    sets such a device aside and gives its work to the others (farm/pool.py)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` runs: the build removes its partial output folder."""


# The stop signal received, if any. A handler's exception is raised wherever the main thread happens to be, and is
# lost there when that is a finaliser (``__del__``, a weakref callback: Python only prints "Exception ignored") or a
# library that catches everything; a build once ran to the end and exited 0 after a SIGTERM. So the signal is also
# remembered, and raise_if_stopped raises it again at the build's next step and before any output is published.
_stopped_by: type[KeyboardInterrupt] | None = None


_before_ours: dict[int, object] | None = None  # the handlers install_stop_handlers replaced, for forked children


def install_stop_handlers() -> None:
    """on_stop_signal for SIGTERM, and for SIGINT unless the shell had us ignore Ctrl-C.

    A process that a library forks from this one gets back the handlers that were there before ours. OpenVINO sends
    its usage report from a forked ``multiprocessing.Process``, and a fork taken while another thread held a lock
    can wait on that lock forever. Our handler is Python code, which such a child never runs again, so SIGTERM
    could not stop it, and multiprocessing's exit, which terminates and joins it, hung a finished build after
    "wrote out/" (the demo, 2026-12-05, 10 minutes, until the child was killed with SIGKILL)."""
    global _before_ours
    first = _before_ours is None
    before = dict(_before_ours or {})  # installed again, what came before ours is still what was there first
    before.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, on_stop_signal))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        before.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, on_stop_signal))
    _before_ours = before
    if first:
        os.register_at_fork(after_in_child=_restore_in_child)


def _restore_in_child() -> None:
    for signum, handler in (_before_ours or {}).items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def on_stop_signal(signum: int, frame: object) -> None:
    """Handler for SIGINT and SIGTERM: remember the signal and raise it as KeyboardInterrupt or Terminated."""
    global _stopped_by
    _stopped_by = KeyboardInterrupt if signum == signal.SIGINT else Terminated
    raise _stopped_by()


def raise_if_stopped() -> None:
    """Raise again a stop signal whose exception was swallowed on its way out."""
    if _stopped_by is not None:
        raise _stopped_by()
