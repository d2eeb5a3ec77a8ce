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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import BadInput
from edgeprune.target import Budget, TargetError

SETTINGS = ("model", "weights", "input_shape", "calib", "method", "allocation", "out", "seed", "max_rounds",
            "recover_steps", "device", "plan", "strict", "trust_pickle", "compensate", "bank", "train", "aux",
            "adapt_steps", "structures", "executor", "in_flight", "calib_limit", "drop_blocks")  # fmt: skip
TARGET_KEYS = ("name", "latency_ms", "speedup", "memory_mb", "macs_ratio", "params_ratio")


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
            if "edgeprune" in tomllib.loads(pyproject.read_text()).get("tool", {}):
                return pyproject
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
            return None
    return None


def load_config(path: Path) -> ProjectConfig:
    """Read and check a project config; every problem is a one-line BadInput naming the file and the key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path} is not valid TOML: {' '.join(str(exc).split())}") from None
    if Path(path).name == "pyproject.toml":
        data = data.get("tool", {}).get("edgeprune", {})
    unknown = sorted(set(data) - set(SETTINGS) - {"targets"})
    if unknown:
        raise BadInput(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(SETTINGS)}, targets)")
    if "input_shape" in data and not (
        isinstance(data["input_shape"], list) and all(isinstance(d, int) and d > 0 for d in data["input_shape"])
    ):
        raise BadInput(f"{path}: input_shape must be a list of positive integers, e.g. [1, 3, 224, 224]")
    device = data.get("device")
    if isinstance(device, list):  # a pool of boards that share the builds' benchmarks
        if not device or not all(isinstance(url, str) and url and "," not in url for url in device):
            raise BadInput(f"{path}: device must be a URL or a non-empty list of URLs, e.g. ['ssh://a', 'ssh://b']")
        data["device"] = ",".join(device)
    targets = data.get("targets", [])
    if not isinstance(targets, list) or not targets or not all(isinstance(t, dict) for t in targets):
        raise BadInput(f"{path}: needs at least one [[targets]] table with a name")
    jobs = []
    for index, entry in enumerate(targets, start=1):
        where = f"{path}: target {index}"
        extra = sorted(set(entry) - set(TARGET_KEYS))
        if extra or not isinstance(entry.get("name"), str):
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
    settings = {k: v for k, v in data.items() if k != "targets"}
    return ProjectConfig(settings=settings, targets=tuple(jobs), path=str(path))
