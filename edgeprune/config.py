"""The project config: `edgeprune.toml` (or `[tool.edgeprune]` in pyproject.toml) names the model, data, method and
one or more targets with their budgets, so that `edgeprune build` with no flags builds them all. Flags override it.

    model = "timm:resnet18"
    input_shape = [1, 3, 224, 224]
    calib = "calibration/sample"
    out = "build"                      # one folder per target: build/x86-openvino, ...
    [[targets]]
    name = "x86-openvino"
    speedup = 2.0
    [[targets]]
    name = "targets/my-board.toml"
    latency_ms = 5.0

Every setting has a type and a range (SCHEMA), which the flags of `edgeprune build` obey too: a value of the wrong
type or out of range (a string where a boolean belongs, 10**9 rounds) is a one-line error naming the file and key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import BadInput
from edgeprune.target import Budget, TargetError, parse_toml, show_value


@dataclass(frozen=True)
class Setting:
    """What one setting holds, in the config and on the command line alike: its kind, and for numbers their range.

    Kinds: "string" (non-empty, one line), "boolean" (a real TOML boolean: the string "false" is true in Python),
    "integer" (low to high), "count" (an integer from low to high, or "auto"), "shape" (2 to 8 dimensions of at most
    ``high``), "devices" (a URL, or a list of them)."""

    kind: str
    low: int = 0
    high: int = 0


# Every setting a config may hold, and what it must be. The flags of `edgeprune build` are checked against the same
# table (jobs.plan_jobs): a bound is stated once.
SCHEMA = {
    "model": Setting("string"), "weights": Setting("string"), "input_shape": Setting("shape", 1, 65536),
    "calib": Setting("string"), "method": Setting("string"), "allocation": Setting("string"),
    "out": Setting("string"), "seed": Setting("integer", 0, 2**32 - 1), "max_rounds": Setting("integer", 1, 100),
    "recover_steps": Setting("integer", 0, 100_000), "device": Setting("devices"), "plan": Setting("string"),
    "strict": Setting("boolean"), "trust_pickle": Setting("boolean"), "compensate": Setting("boolean"),
    "bank": Setting("string"), "train": Setting("string"), "aux": Setting("string"),
    "adapt_steps": Setting("integer", 0, 100_000), "structures": Setting("string"), "executor": Setting("string"),
    "in_flight": Setting("integer", 1, 64), "calib_limit": Setting("integer", 1, 1_000_000),
    "drop_blocks": Setting("count", 0, 1000), "key_file": Setting("string"),
}  # fmt: skip
SETTINGS = tuple(SCHEMA)
TARGET_KEYS = ("name", "latency_ms", "speedup", "memory_mb", "macs_ratio", "params_ratio")
MAX_INPUT_VALUES = 2**28  # one input batch of at most 1 GiB of float32: the model runs on it before anything else


def check_setting(key: str, value: Any, where: str) -> Any:
    """``value`` if it is what SCHEMA says setting ``key`` holds (a list of devices joined with commas), else a
    one-line BadInput naming ``where`` (the config file and key, or the flag) and what was expected."""
    rule = SCHEMA[key]
    integer = isinstance(value, int) and not isinstance(value, bool)  # TOML's true is not 1
    if rule.kind == "boolean" and not isinstance(value, bool):
        raise BadInput(f"{where} must be true or false (a TOML boolean, not a string), got {show_value(value)}")
    if rule.kind == "string" and not _one_line_string(value):
        raise BadInput(f"{where} must be a non-empty string on one line, got {show_value(value)}")
    if rule.kind == "integer":
        if not integer:
            raise BadInput(f"{where} must be an integer from {rule.low} to {rule.high}, got {show_value(value)}")
        if not rule.low <= value <= rule.high:
            raise BadInput(f"{where} must be at least {rule.low} and at most {rule.high}, got {show_value(value)}")
    if rule.kind == "count" and value != "auto" and not (integer and rule.low <= value <= rule.high):
        raise BadInput(f"{where} takes a count of 0 or more (at most {rule.high}), or auto; got {show_value(value)}")
    if rule.kind == "shape":
        return _shape(rule, value, where)
    if rule.kind == "devices":
        return _devices(value, where)
    return value


def _one_line_string(value: Any) -> bool:
    return isinstance(value, str) and value != "" and not any(ord(c) < 32 or ord(c) == 127 for c in value)


def _shape(rule: Setting, value: Any, where: str) -> tuple[int, ...]:
    dims = list(value) if isinstance(value, list | tuple) else []
    fits = all(isinstance(d, int) and not isinstance(d, bool) and rule.low <= d <= rule.high for d in dims)
    if not (2 <= len(dims) <= 8 and fits):
        raise BadInput(f"{where} must be a list of 2 to 8 integers from {rule.low} to {rule.high}, e.g."
                       f" [1, 3, 224, 224], got {show_value(value)}")  # fmt: skip
    if math.prod(dims) > MAX_INPUT_VALUES:
        raise BadInput(f"{where} holds {math.prod(dims)} values in all; at most {MAX_INPUT_VALUES} (1 GiB of float32)")
    return tuple(dims)


def _devices(value: Any, where: str) -> str:
    urls = value if isinstance(value, list) else [value]  # a list: a pool of boards that share the benchmarks
    commas = isinstance(value, list) and any("," in str(url) for url in urls)
    if not urls or commas or not all(_one_line_string(url) for url in urls):
        raise BadInput(f"{where} must be a URL or a non-empty list of URLs, e.g. ['ssh://a', 'ssh://b'],"
                       f" got {show_value(value)}")  # fmt: skip
    return ",".join(urls)


@dataclass(frozen=True)
class TargetJob:
    """One target of the project and its budget (None: the profile's default)."""

    target: str
    budget: Budget | None


@dataclass(frozen=True)
class ProjectConfig:
    """The settings shared by every target, the targets, and the file they came from."""

    settings: dict
    targets: tuple[TargetJob, ...]
    path: str


def find_config(cwd: Path = Path(".")) -> Path | None:
    """edgeprune.toml in ``cwd``, else a pyproject.toml there that has a [tool.edgeprune] table, else None."""
    if (cwd / "edgeprune.toml").is_file():
        return cwd / "edgeprune.toml"
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        try:
            tool = tomllib.loads(pyproject.read_text()).get("tool", {})
        except (ValueError, RecursionError, OSError):  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            return None
        if isinstance(tool, dict) and "edgeprune" in tool:
            return pyproject
    return None


def load_config(path: Path) -> ProjectConfig:
    """Read and check a project config; every problem is a one-line BadInput naming the file and the key."""
    data = _read(Path(path))
    unknown = sorted(set(data) - set(SETTINGS) - {"targets"})
    if unknown:
        raise BadInput(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(SETTINGS)}, targets)")
    settings = {key: check_setting(key, value, f"{path}: {key}") for key, value in data.items() if key != "targets"}
    targets = data.get("targets", [])
    if not isinstance(targets, list) or not targets or not all(isinstance(t, dict) for t in targets):
        raise BadInput(f"{path}: needs at least one [[targets]] table with a name")
    jobs = []
    for index, entry in enumerate(targets, start=1):
        where = f"{path}: target {index}"
        extra = sorted(set(entry) - set(TARGET_KEYS))
        if extra or not _one_line_string(entry.get("name")):
            raise BadInput(f"{where}: needs a string 'name' and at most one budget ({', '.join(TARGET_KEYS[1:])})")
        budgets = {k: v for k, v in entry.items() if k != "name"}
        try:
            budget = Budget(**budgets) if budgets else None
        except TargetError as exc:
            raise BadInput(f"{where}: {exc}") from None
        jobs.append(TargetJob(entry["name"], budget))
    names = [job.target for job in jobs]
    if len(set(names)) != len(names):
        raise BadInput(f"{path}: a target is listed twice; each target builds into its own folder")
    return ProjectConfig(settings=settings, targets=tuple(jobs), path=str(path))


def _read(path: Path) -> dict:
    """The config's table: the whole file, or pyproject.toml's [tool.edgeprune]."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot be read: {' '.join(str(exc).split())}") from None
    data = parse_toml(text, str(path))
    if path.name == "pyproject.toml":
        tool = data.get("tool", {})
        data = tool.get("edgeprune", {}) if isinstance(tool, dict) else None
        if not isinstance(data, dict):
            raise BadInput(f"{path}: [tool.edgeprune] must be a table of settings, got {show_value(data)}")
    return data
