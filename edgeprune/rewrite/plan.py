"""The plan: which channels of every dependency group are kept. Plain data, saved as plan.json, replayable.

Indices are those of the unpruned model. Replaying the plan on the original model (rewrite.prune.apply_plan)
reproduces the pruned module weight for weight.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeprune.errors import BadInput

PLAN_VERSION = 1


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
        """Read a plan written by ``to_dict``; a malformed one is a BadInput."""
        if not isinstance(data, dict):
            raise BadInput(f"plan is malformed: expected a JSON object, got {type(data).__name__}")
        try:
            if data.get("version") != PLAN_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {PLAN_VERSION}")
            groups = tuple(
                GroupPlan(module=str(g["module"]), channels=int(g["channels"]), kept=tuple(int(i) for i in g["kept"]))
                for g in data["groups"]
            )
            for g in groups:
                if not g.kept or list(g.kept) != sorted(set(g.kept)) or g.kept[0] < 0 or g.kept[-1] >= g.channels:
                    raise ValueError(f"group {g.module}: kept indices must be sorted, unique and below {g.channels}")
            return cls(
                model=str(data["model"]),
                input_shape=tuple(int(d) for d in data["input_shape"]),
                method=str(data["method"]),
                ratio=float(data["ratio"]),
                groups=groups,
                notes=dict(data.get("notes", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
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
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInput(f"plan '{path}' cannot be read: {exc}") from None
