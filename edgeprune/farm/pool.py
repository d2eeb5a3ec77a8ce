"""A pool of devices that share one build's benchmarks: one benchmark per device at a time, and a device that fails
is set aside while its work goes to the others.

``DevicePool`` answers the same ``run_runner(args)`` as a single device, so every backend, the search and the final
measurement use a pool without knowing it. In one process the pool serialises benchmarks per device with a lock;
on Ray (farm/executor.py) the same pool object lives in an actor, and each device in an actor of its own.

Only ``DeviceUnreachable`` (no connection, a step past its timeout) sets a device aside: a runner that fails on a
model (an artifact the runtime cannot load) would fail on every board, and is the caller's error, raised at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from edgeprune.errors import DeviceError, DeviceUnreachable


@dataclass
class DeviceState:
    label: str
    busy: bool = False
    failure: str | None = None  # why it was set aside; None while healthy
    runs: int = 0  # benchmarks and validations it answered


class DevicePool:
    """Several devices; ``run_runner`` waits for a healthy idle one, runs there, and retries elsewhere when that
    device fails."""

    def __init__(self, devices: list) -> None:
        if not devices:
            raise ValueError("a device pool needs at least one device")
        self.devices = list(devices)
        self.states = [DeviceState(d.label) for d in self.devices]
        self._free = threading.Condition()

    @property
    def label(self) -> str:
        return f"pool of {len(self.devices)} ({', '.join(s.label for s in self.states)})"

    def status(self) -> list[dict]:
        """Per device: label, runs answered and, when it was set aside, why (the report's ``device_pool``)."""
        with self._free:
            return [{"device": s.label, "runs": s.runs, "failed": s.failure} for s in self.states]

    def _acquire(self) -> int:
        with self._free:
            while True:
                healthy = [i for i, s in enumerate(self.states) if s.failure is None]
                if not healthy:
                    reasons = "; ".join(f"{s.label}: {s.failure}" for s in self.states)
                    raise DeviceError(f"every device of the pool failed ({reasons[:400]}); check the boards")
                idle = [i for i in healthy if not self.states[i].busy]
                if idle:  # the least used first, so that work spreads over the pool
                    index = min(idle, key=lambda i: self.states[i].runs)
                    self.states[index].busy = True
                    return index
                self._free.wait()

    def _release(self, index: int, failure: str | None) -> None:
        with self._free:
            state = self.states[index]
            state.busy = False
            if failure is None:
                state.runs += 1
            else:
                state.failure = failure
            self._free.notify_all()

    def run_runner(self, args: list[str]) -> dict:
        """Run the runner on a healthy idle device; on a device that fails, set it aside and run on another."""
        while True:
            index = self._acquire()
            try:
                result = self.devices[index].run_runner(args)
            except DeviceUnreachable as exc:
                self._release(index, str(exc))
                continue
            except BaseException:
                self._release(index, None)
                raise
            self._release(index, None)
            return result


def pool_status(device) -> list[dict] | None:
    """The pool's per-device status for the report, or None for a single device."""
    status = getattr(device, "status", None)
    return status() if callable(status) else None
