"""The plan: which channels of every dependency group are kept. Plain data, saved as plan.json, replayable.

Indices are those of the unpruned model. Replaying the plan on the original model (rewrite.prune.apply_plan)
reproduces the pruned module weight for weight. The bounded readers of JSON values (read_int, read_name, read_list,
short_repr) also check the mask bank's entries (score/vote.py).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgeprune.errors import BadInput

if TYPE_CHECKING:
    pass

PLAN_VERSION = 1
MAX_PLAN_BYTES = 64 << 20  # a large model's plan takes a few MB: a larger file is refused unread
MAX_COUNT = 1 << 20  # bounds every width, index, dimension and list length a plan holds: beyond any real model
MAX_TEXT = 4096  # bounds the model spec, the method and every module name
NOTES = ("dropped_blocks", "decomposed")  # what a replay does before cutting channels (rewrite/prune.apply_plan)


@dataclass(frozen=True)
class GroupPlan:
    """One group: the root module's name, its original channel count, and the sorted indices kept."""

    module: str
    channels: int
    kept: tuple[int, ...]

    @property
    def width(self) -> int:
        return len(self.kept)


@dataclass(frozen=True)
class Plan:
    """A replayable pruning plan for one model spec and input shape."""

    model: str
    input_shape: tuple[int, ...]
    method: str
    ratio: float
    groups: tuple[GroupPlan, ...]
    notes: dict = field(default_factory=dict)

    @property
    def pruned_channels(self) -> int:
        return sum(g.channels - g.width for g in self.groups)

    def widths(self) -> dict[str, tuple[int, int]]:
        """Per group root: (original width, kept width)."""
        return {g.module: (g.channels, g.width) for g in self.groups}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        data["groups"] = [{"module": g.module, "channels": g.channels, "kept": list(g.kept)} for g in self.groups]
        data["input_shape"] = list(self.input_shape)
        return data

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Read a plan written by ``to_dict``; a malformed one is a BadInput. Every value a replay uses is checked
        for its type and bounds here, and against the model by rewrite/plan.check_plan."""
        if not isinstance(data, dict):
            raise BadInput(f"plan is malformed: expected a JSON object, got {type(data).__name__}")
        try:
            if data.get("version") != PLAN_VERSION:
                raise ValueError(f"version {short_repr(data.get('version'))}, expected {PLAN_VERSION}")
            missing = [key for key in ("model", "input_shape", "method", "ratio", "groups") if key not in data]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            groups = tuple(_group(g, i) for i, g in enumerate(read_list(data["groups"], "groups", MAX_COUNT)))
            _unique([g.module for g in groups], "groups")
            shape = tuple(
                read_int(d, "input_shape", 1, MAX_COUNT) for d in read_list(data["input_shape"], "input_shape", 8)
            )
            ratio = data["ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
                raise ValueError(f"ratio must be a number in [0, 1], got {short_repr(ratio)}")
            return cls(model=read_name(data["model"], "model"), input_shape=shape,
                       method=read_name(data["method"], "method"), ratio=float(ratio), groups=groups,
                       notes=_notes(data.get("notes", {})))  # fmt: skip
        except ValueError as exc:
            raise BadInput(f"plan is malformed: {exc}") from None

    @classmethod
    def load_pinned(cls, path: str, input_shape: tuple[int, ...]) -> Plan:
        """``--plan PATH``: the plan, which must have been made for this input shape (else BadInput)."""
        plan = cls.load(Path(path))
        if tuple(plan.input_shape) != tuple(input_shape):
            shape = ",".join(map(str, plan.input_shape))
            raise BadInput(f"--plan {path} was made for input shape {shape}; pass --input-shape {shape}")
        return plan

    @classmethod
    def load(cls, path: Path) -> Plan:
        """The plan saved at ``path``; BadInput for a file that is not a plan, or larger than MAX_PLAN_BYTES."""
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
                raise ValueError("not a regular file")
            with Path(path).open("rb") as f:
                text = f.read(MAX_PLAN_BYTES + 1)
            if len(text) > MAX_PLAN_BYTES:
                raise ValueError(f"larger than {MAX_PLAN_BYTES >> 20} MiB")
            data = json.loads(text)
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, UTF-8, or a too-long integer
            raise BadInput(f"plan '{path}' cannot be read: {' '.join(str(exc).split())[:200]}") from None
        return cls.from_dict(data)


def _group(data: object, index: int) -> GroupPlan:
    if not isinstance(data, dict):
        raise ValueError(f"group {index} is not an object")
    module = read_name(data.get("module"), f"group {index}'s module")
    what = f"group {short_repr(module)}"
    channels = read_int(data.get("channels"), f"{what}'s channels", 1, MAX_COUNT)
    kept = tuple(
        read_int(i, f"{what}'s kept index", 0, channels - 1) for i in read_list(data.get("kept"), "kept", channels)
    )
    if not kept or any(a >= b for a, b in zip(kept, kept[1:], strict=False)):
        raise ValueError(f"{what}: kept indices must be sorted, unique and below {channels}")
    return GroupPlan(module, channels, kept)


def _notes(data: object) -> dict:
    # Only the notes a replay acts on, each a list of distinct module names.
    if not isinstance(data, dict):
        raise ValueError(f"notes must be an object, got {short_repr(data)}")
    unknown = [key for key in data if key not in NOTES]
    if unknown:
        raise ValueError(f"unknown note {short_repr(unknown[0])}; a plan's notes are {', '.join(NOTES)}")
    return {
        key: _unique([read_name(n, key) for n in read_list(value, key, MAX_COUNT)], key) for key, value in data.items()
    }


def read_int(value: object, what: str, low: int, high: int) -> int:
    """``value`` if it is an integer in [low, high] (not a bool), else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {short_repr(value)}")
    return value


def read_name(value: object, what: str) -> str:
    """``value`` if it is a printable string of 1 to MAX_TEXT characters, else a ValueError naming ``what``."""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT or not value.isprintable():
        raise ValueError(f"{what} must be a printable name of 1 to {MAX_TEXT} characters, got {short_repr(value)}")
    return value


def read_list(value: object, what: str, limit: int) -> list:
    """``value`` if it is a list of at most ``limit`` items, else a ValueError naming ``what``."""
    if not isinstance(value, list) or len(value) > limit:
        raise ValueError(f"{what} must be a list of at most {limit} items, got {short_repr(value)}")
    return value


def _unique(names: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} names {short_repr(name)} twice")
        seen.add(name)
    return names


def short_repr(value: object) -> str:
    """A short one-line rendering of a value read from a plan (which may be huge, or hold newlines)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, list | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
