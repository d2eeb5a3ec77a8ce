"""Where units of work run: in this process (the default), or on Ray (``--executor ray[://address]``).

An executor does three things: ``share`` an object every task needs (sent once: ``ray.put`` on Ray), ``devices``
turn the build's device into one the tasks can use, and ``map`` a plain function over items, in order. On Ray the
device is a ``DevicePool`` in an actor, each device of it in an actor of its own: a device then answers one
benchmark at a time whichever worker asks, and a device that fails is set aside for every worker at once.

Ray is imported only here and only when asked for, so edgeprune without the ``[ray]`` extra runs as before.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from edgeprune.errors import BadInput, DeviceUnreachable
from edgeprune.farm.pool import DevicePool

EXECUTORS_HELP = "local (this process, the default), ray (a local Ray instance), ray:auto or ray://HOST:PORT"


class LocalExecutor:
    """Everything in this process, one task after another: the same results as Ray, in the same order."""

    name = "local"

    def share(self, value: Any) -> Any:
        return value

    def devices(self, device):
        return device

    def map(self, function: Callable, shared: Any, items: Sequence, num_cpus: float = 1) -> list:
        return [function(shared, item) for item in items]

    def close(self) -> None:
        pass


class RayExecutor:
    """Tasks on a Ray cluster: a local instance started here, or an existing cluster by address."""

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise BadInput("--executor ray needs Ray: pip install 'edgeprune[ray]'") from None
        self.ray = ray
        self.name = f"ray ({address})" if address else "ray (local instance)"
        self._started = not ray.is_initialized()
        if self._started:
            _check_reachable(address)
            options = {"address": address} if address else {"include_dashboard": False}
            try:
                ray.init(**options, log_to_driver=False, logging_level=logging.ERROR)
            except Exception as exc:  # ConnectionError and Ray's own: the address is wrong or the cluster down
                raise BadInput(f"--executor: cannot reach Ray at {address or 'a new local instance'}: "
                               f"{' '.join(str(exc).split())[:200]}") from None  # fmt: skip
        self._remote: dict[tuple[Callable, float], Any] = {}

    def share(self, value: Any) -> Any:
        return self.ray.put(value)

    def devices(self, device):
        """The build's device (one, or a pool) as a pool on Ray: each device held by an actor of its own."""
        members = device.devices if isinstance(device, DevicePool) else [device]
        # Actors hold no CPU: a device actor mostly waits on its board, and on a 2-core machine two actors that
        # each held a CPU would leave no worker to prune and export.
        holder = self.ray.remote(num_cpus=0)(DeviceActor)
        actors = [holder.remote(member) for member in members]
        pool = self.ray.remote(num_cpus=0, max_concurrency=64)(DevicePool).remote(
            [ActorDevice(actor, member.label) for actor, member in zip(actors, members, strict=True)]
        )
        return RayPool(pool, device.label)

    def map(self, function: Callable, shared: Any, items: Sequence, num_cpus: float = 1) -> list:
        """``function(shared, item)`` for every item, as Ray tasks of ``num_cpus`` each; results in order."""
        if (function, num_cpus) not in self._remote:
            self._remote[function, num_cpus] = self.ray.remote(num_cpus=num_cpus, max_retries=0)(function)
        return _get([self._remote[function, num_cpus].remote(shared, item) for item in items])

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()


class DeviceActor:
    """Holds one device; Ray runs an actor's calls one at a time, so the device never runs two benchmarks."""

    def __init__(self, device) -> None:
        self.device = device

    def run_runner(self, args: list[str]) -> dict:
        return self.device.run_runner(args)


class ActorDevice:
    """A device actor as the pool inside the pool actor sees it: a device with a label and run_runner."""

    def __init__(self, actor, label: str) -> None:
        self.actor, self.label = actor, label

    def run_runner(self, args: list[str]) -> dict:
        import ray

        try:
            return _get(self.actor.run_runner.remote(args))  # DeviceUnreachable and DeviceError, as raised there
        except ray.exceptions.RayActorError as exc:  # the actor's process died: as good as an unreachable board
            raise DeviceUnreachable(f"{self.label}: its Ray actor died ({type(exc).__name__})") from None


class RayPool:
    """The pool actor as workers and the driver see it: a picklable device that forwards to the actor."""

    def __init__(self, pool, label: str) -> None:
        self.pool, self.label = pool, label

    def run_runner(self, args: list[str]) -> dict:
        return _get(self.pool.run_runner.remote(args))

    def status(self) -> list[dict]:
        return _get(self.pool.status.remote())


def _get(refs):
    """``ray.get``, raising a failed task's own exception (a one-line EdgepruneError), not Ray's wrapper of it, whose
    text carries the worker's traceback."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise (cause if isinstance(cause, BaseException) else exc) from None


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) that accepts no connection, in seconds: ray.init itself retries a
    dead address for minutes, printing C++ warnings all along. 'auto' and a new local instance need no check."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--executor ray:{address}: expected HOST:PORT, e.g. ray://head:10001 or ray:head:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise BadInput(f"--executor: nothing answers at {address} ({exc.strerror or exc}); is the Ray cluster up?"
                       " Check the head's address and port (ray status on the head)") from None  # fmt: skip


def make_executor(spec: str | None):
    """The executor ``spec`` names: None or 'local', 'ray' (a local instance), 'ray:auto' (the cluster this
    machine belongs to) or 'ray://HOST:PORT' (a cluster through Ray Client)."""
    if spec in (None, "", "local"):
        return LocalExecutor()
    if spec == "ray":
        return RayExecutor(None)
    if spec.startswith("ray://"):
        return RayExecutor(spec)
    if spec.startswith("ray:"):
        return RayExecutor(spec.removeprefix("ray:"))
    raise BadInput(f"unknown --executor '{spec}'; use {EXECUTORS_HELP}")
