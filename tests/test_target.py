"""Stage 1: every bundled target profile loads; every malformed profile is a one-line TargetError naming the key."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprune.errors import BadInput
from edgeprune.target import (
    BenchmarkSettings,
    Budget,
    Estimate,
    Target,
    TargetError,
    list_targets,
    load_target,
    targets_dir,
)

BUNDLED = sorted(p.stem for p in targets_dir().glob("*.toml"))

VALID = """\
name = "prof"
description = "a test profile"
backend = "onnx"
precision = "fp32"
channel_multiple = 8
threads = 2
[budget]
latency_ms = 5.0
[estimate]
peak_gflops = 100.0
memory_gbps = 20.0
[benchmark]
warmup = 5
iterations = 10
"""


def _write(tmp_path: Path, text: str, stem: str = "prof") -> Path:
    path = tmp_path / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message
    return message


def test_bundled_profiles_exist() -> None:
    assert {"x86-openvino", "jetson-orin", "jetson-orin-nano", "arm-tflite"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_loads_and_round_trips(name: str) -> None:
    target = load_target(name)
    assert target.name == name
    assert target.estimate is not None, "bundled profiles carry estimate figures"
    data = target.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Target.from_dict(data, path=target.path) == target
    # Loading by path gives the same profile as loading by name.
    assert load_target(target.path) == target


def test_list_targets_matches_files() -> None:
    assert [t.name for t in list_targets()] == BUNDLED


def test_bundled_figures() -> None:
    x86 = load_target("x86-openvino")
    assert (x86.backend, x86.precision, x86.threads, x86.budget.kind, x86.budget.value) == (
        "openvino",
        "fp32",
        2,
        "speedup",
        2.0,
    )
    nano = load_target("jetson-orin-nano")
    assert (nano.backend, nano.precision, nano.budget.kind, nano.budget.value) == (
        "tensorrt",
        "fp16",
        "latency_ms",
        5.0,
    )
    assert load_target("arm-tflite").channel_multiple == 4


def test_unknown_target_names_known_ones() -> None:
    with pytest.raises(TargetError) as info:
        load_target("no-such-board")
    message = str(info.value)
    assert "'no-such-board'" in message and "edgeprune targets" in message
    for name in BUNDLED:
        assert name in message
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2


def test_a_profiles_folder_adds_targets_and_replaces_bundled_ones(tmp_path: Path, monkeypatch) -> None:
    """$EDGEPRUNE_TARGETS: a team's own boards by name, and a bundled name given the team's settings."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    _write(folder, VALID.replace('"prof"', '"our-board"'), "our-board")
    bundled = (targets_dir() / "x86-openvino.toml").read_text()
    _write(folder, bundled.replace("[benchmark]\n", "[benchmark]\nwindows = 1\nmin_timed_s = 0.1\n"), "x86-openvino")
    monkeypatch.setenv("EDGEPRUNE_TARGETS", str(folder))
    assert load_target("our-board").budget == Budget(latency_ms=5.0)
    replaced = load_target("x86-openvino")
    assert replaced.path == str(folder / "x86-openvino.toml") and replaced.benchmark.windows == 1
    assert replaced.benchmark.min_timed_s == 0.1 and replaced.benchmark.min_warmup_s == 0.3  # unset: the default
    assert [t.name for t in list_targets()] == sorted({*BUNDLED, "our-board"})
    monkeypatch.setenv("EDGEPRUNE_TARGETS", str(tmp_path / "absent"))
    with pytest.raises(TargetError, match=r"^EDGEPRUNE_TARGETS='.*absent' is not a folder; point it at") as info:
        load_target("x86-openvino")
    assert len(str(info.value).splitlines()) == 1


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _error(tmp_path / "absent.toml")


def test_valid_temp_profile(tmp_path: Path) -> None:
    target = load_target(str(_write(tmp_path, VALID)))
    assert target.budget == Budget(latency_ms=5.0)
    assert target.estimate == Estimate(peak_gflops=100.0, memory_gbps=20.0)
    assert target.benchmark == BenchmarkSettings(warmup=5, iterations=10)


def test_device_and_defaults(tmp_path: Path) -> None:
    text = VALID.split("[estimate]")[0].replace("threads = 2", 'threads = 2\ndevice = "ssh://pi@board:22"')
    target = load_target(str(_write(tmp_path, text)))
    assert target.device == "ssh://pi@board:22"
    assert target.estimate is None
    assert target.benchmark == BenchmarkSettings()
    assert "estimate" not in target.to_dict() and target.to_dict()["device"] == target.device


MALFORMED = [
    # (description, edit to VALID, a word the message must contain)
    ("invalid TOML", lambda t: t.replace("threads = 2", "threads = "), "not valid TOML"),
    ("unknown top key", lambda t: t.replace("threads = 2", "threads = 2\nthredas = 3"), "thredas"),
    ("unknown budget key", lambda t: t.replace("latency_ms = 5.0", "latency = 5.0"), "latency"),
    ("unknown estimate key", lambda t: t.replace("memory_gbps", "mem_gbps"), "mem_gbps"),
    ("threads is a string", lambda t: t.replace("threads = 2", 'threads = "two"'), "threads"),
    ("bool for int", lambda t: t.replace("channel_multiple = 8", "channel_multiple = true"), "channel_multiple"),
    ("bool for float", lambda t: t.replace("peak_gflops = 100.0", "peak_gflops = true"), "peak_gflops"),
    ("float for int", lambda t: t.replace("iterations = 10", "iterations = 10.0"), "iterations"),
    ("negative latency", lambda t: t.replace("latency_ms = 5.0", "latency_ms = -1"), "latency_ms"),
    ("zero threads", lambda t: t.replace("threads = 2", "threads = 0"), "threads"),
    ("negative warmup", lambda t: t.replace("warmup = 5", "warmup = -1"), "warmup"),
    ("nan figure", lambda t: t.replace("memory_gbps = 20.0", "memory_gbps = nan"), "memory_gbps"),
    ("inf budget", lambda t: t.replace("latency_ms = 5.0", "latency_ms = inf"), "latency_ms"),
    ("huge int figure", lambda t: t.replace("peak_gflops = 100.0", "peak_gflops = " + "9" * 400), "peak_gflops"),
    ("two budgets", lambda t: t.replace("latency_ms = 5.0", "latency_ms = 5.0\nspeedup = 2.0"), "speedup"),
    ("empty budget", lambda t: t.replace("latency_ms = 5.0", ""), "budget"),
    ("budget not a table", lambda t: t.replace("[budget]\nlatency_ms = 5.0", "budget = 5.0"), "budget"),
    ("unknown backend", lambda t: t.replace('"onnx"', '"coreml"'), "backend"),
    ("unknown precision", lambda t: t.replace('"fp32"', '"bf16"'), "precision"),
    ("name not file stem", lambda t: t.replace('name = "prof"', 'name = "other"'), "name"),
    ("missing backend", lambda t: t.replace('backend = "onnx"\n', ""), "backend"),
    ("missing budget", lambda t: t.replace("[budget]\nlatency_ms = 5.0\n", ""), "budget"),
    ("half an estimate", lambda t: t.replace("memory_gbps = 20.0\n", ""), "memory_gbps"),
    ("device not a string", lambda t: t.replace("threads = 2", "threads = 2\ndevice = 22"), "device"),
    ("zero windows", lambda t: t.replace("iterations = 10", "iterations = 10\nwindows = 0"), "windows"),
    ("negative seconds", lambda t: t.replace("iterations = 10", "iterations = 10\nmin_timed_s = -0.5"), "min_timed_s"),
    ("bool for seconds", lambda t: t.replace("warmup = 5", "warmup = 5\nmin_warmup_s = true"), "min_warmup_s"),
    ("nan seconds", lambda t: t.replace("iterations = 10", "iterations = 10\nmin_timed_s = nan"), "min_timed_s"),
    ("multi-line value", lambda t: t.replace("threads = 2", 'threads = """two\nthree"""'), "threads"),
    # Upper bounds: past them a figure is a typo, and would overflow or never finish.
    ("huge threads", lambda t: t.replace("threads = 2", "threads = " + str(10**38)), "from 1 to 1024"),
    ("too many threads", lambda t: t.replace("threads = 2", "threads = 1025"), "threads"),
    ("huge multiple", lambda t: t.replace("channel_multiple = 8", "channel_multiple = 4096"), "channel_multiple"),
    ("huge iterations", lambda t: t.replace("iterations = 10", f"iterations = {2**63 - 1}"), "from 1 to 100000"),
    ("huge warmup", lambda t: t.replace("warmup = 5", "warmup = 100001"), "from 0 to 100000"),
    ("huge windows", lambda t: t.replace("iterations = 10", "iterations = 10\nwindows = 1000"), "from 1 to 100"),
    ("huge peak", lambda t: t.replace("peak_gflops = 100.0", "peak_gflops = 1e300"), "at most 1e+07"),
    ("huge bandwidth", lambda t: t.replace("memory_gbps = 20.0", "memory_gbps = 1e300"), "at most 1e+06"),
    ("huge latency", lambda t: t.replace("latency_ms = 5.0", "latency_ms = 1e300"), "at most 3600000"),
    ("huge speedup", lambda t: t.replace("latency_ms = 5.0", "speedup = 1e9"), "at most 1000"),
    ("slowdown", lambda t: t.replace("latency_ms = 5.0", "speedup = 0.5"), "at least 1"),
    ("huge memory", lambda t: t.replace("latency_ms = 5.0", "memory_mb = 1e300"), "at most 1000000"),
]


@pytest.mark.parametrize(("edit", "word"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_profile(tmp_path: Path, edit: Any, word: str) -> None:
    text = edit(VALID)
    assert text != VALID
    assert word in _error(_write(tmp_path, text))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "prof.toml"
    path.write_bytes(b'name = "\xff"\n')
    assert "UTF-8" in _error(path)


def test_pathological_toml(tmp_path: Path) -> None:
    # tomllib raises a bare ValueError past int()'s digit limit and RecursionError on deep nesting.
    _error(_write(tmp_path, "threads = " + "9" * 5000))
    _error(_write(tmp_path, "threads = " + "[" * 5000 + "]" * 5000))


def test_budget_dataclass() -> None:
    assert (Budget(speedup=2).kind, Budget(speedup=2).value) == ("speedup", 2.0)
    assert Budget(memory_mb=64).value == 64.0
    for kwargs in ({}, {"latency_ms": 1.0, "memory_mb": 2.0}, {"latency_ms": 0}, {"speedup": True}):
        with pytest.raises(TargetError):
            Budget(**kwargs)


def test_target_validates_when_built_in_code() -> None:
    target = load_target(BUNDLED[0])
    with pytest.raises(TargetError, match="threads"):
        dataclasses.replace(target, threads=0)
    with pytest.raises(TargetError, match="backend"):
        dataclasses.replace(target, backend="tvm")
    with pytest.raises(TargetError, match="threads must be an integer from 1 to 1024"):
        dataclasses.replace(target, threads=10**38)
    with pytest.raises(TargetError, match="iterations must be an integer from 1 to 100000"):
        dataclasses.replace(target.benchmark, iterations=2**63 - 1)


# --- property test: whatever is in the file, the only failure is a TargetError ---

_SCALARS = (
    st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=12)
    | st.sampled_from(["onnx", "openvino", "tflite", "tensorrt", "fp32", "fp16", "int8", "prof", "ssh://a@b:22"])
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
_TOP_KEYS = ["name", "description", "backend", "precision", "channel_multiple", "threads", "device"]
_SECTION_KEYS = {
    "budget": ["latency_ms", "speedup", "memory_mb"],
    "estimate": ["peak_gflops", "memory_gbps"],
    "benchmark": ["warmup", "iterations"],
}
_PLACES = [(None, key) for key in [*_TOP_KEYS, *_SECTION_KEYS]] + [
    (section, key) for section, keys in _SECTION_KEYS.items() for key in keys
]
_ANY_KEYS = st.sampled_from(_TOP_KEYS + sum(_SECTION_KEYS.values(), ["extra"])) | st.text(min_size=1, max_size=8)
_TABLES = st.dictionaries(_ANY_KEYS, _VALUES, max_size=4)
_NEW_VALUES = st.none() | _VALUES | _TABLES
# An edit: (table or None for the top level, key, new value or None to delete). Mostly a key in its right place, so
# most examples get past the unknown-key check into the value checks; sometimes any key anywhere.
_EDIT = st.one_of(
    st.tuples(st.sampled_from(_PLACES), _NEW_VALUES).map(lambda e: (*e[0], e[1])),
    st.tuples(st.sampled_from(_PLACES), _NEW_VALUES).map(lambda e: (*e[0], e[1])),
    st.tuples(st.sampled_from([None, *_SECTION_KEYS]), _ANY_KEYS, _NEW_VALUES),
)
_EDITS = st.lists(_EDIT, max_size=3)


def _toml_str(text: str) -> str:
    # Without ensure_ascii=False, json.dumps writes astral characters as surrogate pairs, which TOML refuses.
    return json.dumps(text, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return _toml_str(value)  # TOML may still refuse some characters: that must be a TargetError too
    return repr(value)


def _toml(doc: dict[str, Any]) -> str:
    """A small TOML writer for the test (no TOML writer is a dependency): scalars first, then one [table] per dict."""
    lines = [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_str(section)}]")
            lines += [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _edited_profile(edits: list[tuple[str | None, str, Any]]) -> str:
    doc = Target.from_dict(tomllib.loads(VALID)).to_dict()
    for section, key, value in edits:
        table = doc[section] if section is not None and isinstance(doc.get(section), dict) else doc
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return _toml(doc)


_TEXTS = (
    st.builds(_edited_profile, _EDITS)
    | st.text(max_size=200)
    | st.builds(lambda extra: VALID + extra, st.text(max_size=40))
)


def test_toml_writer_round_trips() -> None:
    assert tomllib.loads(_edited_profile([])) == Target.from_dict(tomllib.loads(VALID)).to_dict()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXTS)
def test_any_file_loads_or_raises_target_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "prof.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        target = load_target(str(path))
    except TargetError as exc:
        assert len(str(exc).splitlines()) == 1
    else:
        assert isinstance(target, Target) and target.name == "prof"
        assert Target.from_dict(target.to_dict(), path=target.path) == target


def test_path_object_and_non_string(tmp_path: Path) -> None:
    assert load_target(_write(tmp_path, VALID)).name == "prof"
    with pytest.raises(TargetError):
        load_target(None)  # type: ignore[arg-type]
