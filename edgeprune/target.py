"""Stage 1: hardware target profiles (targets/NAME.toml) loaded into frozen, validated dataclasses.

A profile says which backend and precision a target runs, the width multiple pruned channels are rounded to, the
default budget, and the figures a cost estimate uses when no device is reachable. Every problem with a profile is a
TargetError (a BadInput, exit code 2) whose message is one line naming the file, the key and what to do.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import BadInput

BACKENDS = ("onnx", "openvino", "tflite", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
BUDGET_KINDS = ("latency_ms", "speedup", "memory_mb", "macs_ratio", "params_ratio")
# Each budget's range, as (lowest, whether the lowest itself is allowed, highest, how a message says it): profiles,
# configs and flags all check a budget against this table.
BUDGET_RANGES = {
    "latency_ms": (0.0, False, 3_600_000.0, "must be positive and at most 3600000 (an hour)"),
    "speedup": (1.0, True, 1000.0, "must be at least 1 and at most 1000"),
    "memory_mb": (0.0, False, 1_000_000.0, "must be positive and at most 1000000 (a terabyte)"),
    "macs_ratio": (0.0, False, 1.0, "is a fraction of the unpruned model's MACs: give one in (0, 1]"),
    "params_ratio": (0.0, False, 1.0, "is a fraction of the unpruned model's parameters: give one in (0, 1]"),
}
# The most a profile's numbers may be: past these a figure is a typo, and would overflow or never finish.
MAX_THREADS = 1024
MAX_CHANNEL_MULTIPLE = 1024
MAX_RUNS = 100_000  # benchmark warm-up runs and timed runs per window
MAX_WINDOWS = 100
MAX_GFLOPS = 10_000_000.0  # 10 PFLOP/s
MAX_GBPS = 1_000_000.0  # 1 PB/s

_REQUIRED = ("name", "description", "backend", "precision", "channel_multiple", "threads", "budget")
_OPTIONAL = ("estimate", "benchmark", "device")
_SECTION_KEYS = {
    "budget": BUDGET_KINDS,
    "estimate": ("peak_gflops", "memory_gbps"),
    "benchmark": ("warmup", "iterations", "windows", "min_timed_s", "min_warmup_s"),
}
# What to write for a missing key, so the message says what to do, not only what is wrong.
_HINTS = {
    "name": "set it to the file name without .toml",
    "description": 'e.g. description = "Raspberry Pi 5, LiteRT fp32"',
    "backend": f"one of {', '.join(BACKENDS)}",
    "precision": f"one of {', '.join(PRECISIONS)}",
    "channel_multiple": "e.g. channel_multiple = 8",
    "threads": "e.g. threads = 4",
    "budget": f"add a [budget] table with one of {', '.join(BUDGET_KINDS)}",
}


class TargetError(BadInput):
    """A target profile, or a budget, is wrong; the message is one line that says what and what to do."""

    def __init__(self, message: str) -> None:
        # The CLI contract is one line on stderr; tomllib and user strings must not be able to break that.
        super().__init__(" ".join(str(message).splitlines()))


def show_value(value: Any) -> str:
    """A short, one-line rendering of a user's value for a message, in TOML's spelling where it differs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) > 10**30:
        return "a very large integer"  # repr() of an int past 4300 digits raises, and nobody wants to read it
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(where: str, value: Any, maximum: float) -> float:
    """Check a positive number up to ``maximum`` (int or float, never a TOML boolean) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TargetError(f"{where} must be a positive number, got {show_value(value)}")
    if not 0 < value <= maximum:  # NaN fails too; an int of any size compares exactly, with no float overflow
        raise TargetError(f"{where} must be a positive number at most {maximum:g}, got {show_value(value)}")
    return float(value)


def _seconds(where: str, value: Any) -> float:
    """Check a finite number of seconds >= 0 (int or float, never a TOML boolean) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < 3600):
        raise TargetError(f"{where} must be a number of seconds from 0 to 3600, got {show_value(value)}")
    return float(value)


def _integer(where: str, value: Any, minimum: int, maximum: int) -> int:
    """Check an integer from minimum to maximum; a boolean is refused, because TOML's true is not 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise TargetError(f"{where} must be an integer from {minimum} to {maximum}, got {show_value(value)}")
    return value


def budget_value(kind: str, value: Any, where: str) -> float:
    """Check a budget figure against BUDGET_RANGES (a number, never a TOML boolean) and return it as a float."""
    low, low_allowed, high, need = BUDGET_RANGES[kind]
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or not (low < value <= high or (low_allowed and value == low)):
        raise TargetError(f"{where} {need}, got {show_value(value)}")
    return float(value)


def _string(where: str, value: Any, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str) or (not empty_ok and not value):
        raise TargetError(f"{where} must be a{'' if empty_ok else ' non-empty'} string, got {show_value(value)}")
    return value


def _check_keys(where: str, keys: Any, known: tuple[str, ...]) -> None:
    """Refuse unknown keys, suggesting the nearest known one: a typo must not silently fall back to a default."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise TargetError(f"unknown key {show_value(key)}{where} ({hint}known: {', '.join(known)})")


@dataclass(frozen=True)
class Budget:
    """What the build must reach (exactly one): a latency in ms, a speedup over the baseline, a peak memory in MB, or
    a fraction of the unpruned model's MACs or parameters."""

    latency_ms: float | None = None
    speedup: float | None = None
    memory_mb: float | None = None
    macs_ratio: float | None = None  # of the unpruned model's MACs, counted exactly (no measurement decides it)
    params_ratio: float | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in BUDGET_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise TargetError(f"[budget] needs exactly one of {', '.join(BUDGET_KINDS)}, got {got}; keep one")
        # Normalise to float so Budget(latency_ms=2) == Budget(latency_ms=2.0), as TOML 2 and 2.0 should be.
        kind = given[0]
        object.__setattr__(self, kind, budget_value(kind, getattr(self, kind), f"[budget] {kind}"))

    @property
    def kind(self) -> str:
        """The budget's kind: "latency_ms", "speedup", "memory_mb", "macs_ratio" or "params_ratio"."""
        return next(kind for kind in BUDGET_KINDS if getattr(self, kind) is not None)

    @property
    def value(self) -> float:
        """The budget's figure, in the unit its kind names."""
        return float(getattr(self, self.kind))


@dataclass(frozen=True)
class Estimate:
    """Roofline figures for a cost estimate when no device is reachable: peak compute and memory bandwidth."""

    peak_gflops: float
    memory_gbps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_gflops", _number("[estimate] peak_gflops", self.peak_gflops, MAX_GFLOPS))
        object.__setattr__(self, "memory_gbps", _number("[estimate] memory_gbps", self.memory_gbps, MAX_GBPS))


@dataclass(frozen=True)
class BenchmarkSettings:
    """How latency is measured on the target: untimed warm-up runs (at least ``warmup`` and ``min_warmup_s``), then
    ``windows`` timed windows of at least ``iterations`` runs and ``min_timed_s`` seconds each, of which the runner
    reports the one with the lowest p50. Fewer or shorter windows measure sooner and wander more on a busy machine."""

    warmup: int = 50
    iterations: int = 200
    windows: int = 3
    min_timed_s: float = 0.5
    min_warmup_s: float = 0.3

    def __post_init__(self) -> None:
        _integer("[benchmark] warmup", self.warmup, 0, MAX_RUNS)
        _integer("[benchmark] iterations", self.iterations, 1, MAX_RUNS)
        _integer("[benchmark] windows", self.windows, 1, MAX_WINDOWS)
        object.__setattr__(self, "min_timed_s", _seconds("[benchmark] min_timed_s", self.min_timed_s))
        object.__setattr__(self, "min_warmup_s", _seconds("[benchmark] min_warmup_s", self.min_warmup_s))


@dataclass(frozen=True)
class Target:
    """One hardware target profile; `path` is the file it was loaded from ("" when built in code)."""

    name: str
    description: str
    backend: str
    precision: str
    channel_multiple: int
    threads: int
    budget: Budget
    estimate: Estimate | None
    benchmark: BenchmarkSettings
    device: str | None = None
    path: str = ""

    def __post_init__(self) -> None:
        # Validated here too, not only in the loader, so a Target built in code or by dataclasses.replace is sound.
        _string("name", self.name, empty_ok=False)
        _string("description", self.description)
        for key, allowed in (("backend", BACKENDS), ("precision", PRECISIONS)):
            if getattr(self, key) not in allowed:
                raise TargetError(f"{key} must be one of {', '.join(allowed)}, got {show_value(getattr(self, key))}")
        _integer("channel_multiple", self.channel_multiple, 1, MAX_CHANNEL_MULTIPLE)
        _integer("threads", self.threads, 1, MAX_THREADS)
        for key, kind in (("budget", Budget), ("benchmark", BenchmarkSettings)):
            if not isinstance(getattr(self, key), kind):
                raise TargetError(f"{key} must be a {kind.__name__}, got {show_value(getattr(self, key))}")
        if self.estimate is not None and not isinstance(self.estimate, Estimate):
            raise TargetError(f"estimate must be an Estimate or None, got {show_value(self.estimate)}")
        if self.device is not None:
            _string("device (e.g. 'ssh://user@host:22')", self.device, empty_ok=False)
        _string("path", self.path)

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-able data in the TOML file's layout (unset estimate and device left out, path not
        included, as it is not part of the profile's content); `from_dict` reads it back to an equal Target."""
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "backend": self.backend,
            "precision": self.precision,
            "channel_multiple": self.channel_multiple,
            "threads": self.threads,
            "budget": {self.budget.kind: self.budget.value},
        }
        if self.estimate is not None:
            data["estimate"] = {"peak_gflops": self.estimate.peak_gflops, "memory_gbps": self.estimate.memory_gbps}
        data["benchmark"] = asdict(self.benchmark)
        if self.device is not None:
            data["device"] = self.device
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "") -> Target:
        """Build a Target from a profile's parsed data (a TOML document or `to_dict` output), checking every key:
        unknown or missing keys, wrong types and bad values raise a one-line TargetError naming the key (without the
        file name, which `load_target` adds)."""
        if not isinstance(data, Mapping):
            raise TargetError(f"a profile must be a table of keys, got {show_value(data)}")
        _check_keys("", data.keys(), _REQUIRED + _OPTIONAL)
        for key in _REQUIRED:
            if key not in data:
                raise TargetError(f"missing required key '{key}' ({_HINTS[key]})")
        sections: dict[str, dict[str, Any]] = {}
        for section, known in _SECTION_KEYS.items():
            if section not in data:
                continue
            table = data[section]
            if not isinstance(table, Mapping):
                raise TargetError(
                    f"'{section}' must be a table ([{section}] with keys {', '.join(known)}), got {show_value(table)}"
                )
            _check_keys(f" in [{section}]", table.keys(), known)
            sections[section] = dict(table)
        estimate = sections.get("estimate")
        if estimate is not None:
            for key in _SECTION_KEYS["estimate"]:
                if key not in estimate:
                    raise TargetError(
                        f"[estimate] is missing '{key}' (give both peak_gflops and memory_gbps, "
                        "or leave [estimate] out)"
                    )
        return cls(
            name=data["name"],
            description=data["description"],
            backend=data["backend"],
            precision=data["precision"],
            channel_multiple=data["channel_multiple"],
            threads=data["threads"],
            budget=Budget(**sections["budget"]),
            estimate=Estimate(**estimate) if estimate is not None else None,
            benchmark=BenchmarkSettings(**sections.get("benchmark", {})),
            device=data.get("device"),
            path=path,
        )


def targets_dir() -> Path:
    """The folder of bundled profiles: inside the package when installed from a wheel, else the repo's targets/."""
    packaged = Path(__file__).parent / "targets"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "targets"


# A folder of the team's own profiles, looked up by name before the bundled ones (a profile there of a bundled name
# replaces it: the same target with a team's budget or benchmark settings, without editing the package).
PROFILES_ENV = "EDGEPRUNE_TARGETS"


def _named_profiles() -> dict[str, Path]:
    """Every profile a name can ask for, by name: the bundled ones, then those of $EDGEPRUNE_TARGETS over them."""
    folders = [targets_dir()]
    extra = os.environ.get(PROFILES_ENV)
    if extra:
        if not Path(extra).is_dir():
            raise TargetError(f"{PROFILES_ENV}={extra!r} is not a folder; point it at a folder of .toml profiles")
        folders.append(Path(extra))
    found = {p.stem: p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.toml"))}
    return dict(sorted(found.items()))


def _display(path: Path) -> str:
    """How a profile's path appears in messages: 'targets/NAME.toml' for bundled ones, else as the user gave it."""
    try:
        return str(Path("targets") / path.relative_to(targets_dir()))
    except ValueError:
        return str(path)


def parse_toml(text: str, shown: str) -> dict:
    """The TOML document ``text`` (the file ``shown``); anything tomllib refuses is one line of TargetError."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{shown} is not valid TOML: {' '.join(str(exc).split())}") from None
    except ValueError as exc:  # tomllib lets int()'s digit limit through as a bare ValueError
        raise TargetError(f"{shown} is not a usable TOML file: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise TargetError(f"{shown} is not a usable TOML file: arrays or tables are nested too deeply") from None


def _load_file(path: Path, shown: str) -> Target:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        hint = "give an existing .toml file or a name from 'edgeprune targets'"
        raise TargetError(f"{shown}: no such file; {hint}") from None
    except UnicodeDecodeError:
        raise TargetError(f"{shown} is not UTF-8 text; save the profile as UTF-8 TOML") from None
    except (OSError, ValueError) as exc:  # a directory, no permission, a NUL in the path, ...
        raise TargetError(f"{shown}: cannot read the file ({exc.__class__.__name__}: {exc})") from None
    data = parse_toml(text, shown)
    try:
        target = Target.from_dict(data, path=str(path))
    except TargetError as exc:
        raise TargetError(f"{shown}: {exc}") from None
    # The file name is how a profile is asked for; a mismatched name would make 'targets show' and reports lie.
    if target.name != path.stem:
        raise TargetError(
            f"{shown}: name {show_value(target.name)} does not match the file name; "
            f'set name = "{path.stem}" or rename the file'
        )
    return target


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """Load a target profile by name (e.g. "jetson-orin") or from a .toml file path, fully validated: an argument
    ending in .toml or containing a path separator is a file, anything else is looked up among the bundled profiles
    in `targets_dir()` and those of $EDGEPRUNE_TARGETS. Every failure, whatever the input, is a TargetError with a
    one-line message."""
    text = os.fspath(name_or_path) if isinstance(name_or_path, str | os.PathLike) else name_or_path
    if not isinstance(text, str):
        raise TargetError(f"a target is a name or a .toml path, got {show_value(text)}")
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or any(sep in text for sep in separators):
        path = Path(text)
        return _load_file(path, _display(path))
    known = _named_profiles()
    # Checked against the list, not the file system, so odd names (NUL, '..') can only ever mean "unknown".
    if text not in known:
        listing = ", ".join(known) if known else f"none (no profiles in {targets_dir()})"
        raise TargetError(f"unknown target {show_value(text)}: known targets are {listing}; see 'edgeprune targets'")
    return _load_file(known[text], _display(known[text]))


def list_targets() -> list[Target]:
    """All target profiles a name can ask for (bundled, and $EDGEPRUNE_TARGETS'), loaded and validated, sorted by
    name; a broken one raises TargetError."""
    return [load_target(name) for name in _named_profiles()]
