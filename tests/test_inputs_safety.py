"""Files from others read as an attacker may have written them: plans (checked whole against the model before a
replay), mask-bank entries (a bad one skipped with one warning line), and the bank and cost-model cache written by
builds running at once (never a crash, a torn file or a temporary file left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, tiny_model

from edgeprune.errors import BadInput
from edgeprune.graph.modules import copy_model
from edgeprune.graph.plan import Plan
from edgeprune.rewrite.depth import drop_blocks, residual_blocks, with_dropped
from edgeprune.rewrite.lowrank import decomposed_copy, with_decomposition
from edgeprune.rewrite.plan import check_plan
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import ScoredGroup, score_groups
from edgeprune.score.vote import load_entries, nearest, save_entry, vote_blocks, vote_scores

TESTS = Path(__file__).parent
EXAMPLE = torch.zeros(1, 3, 32, 32)


def _plan(model: torch.nn.Module, dropped: list[str]) -> Plan:
    """The plan a ``double`` build with ``dropped`` blocks removed writes: made by the build's own functions."""
    shallower = drop_blocks(copy_model(model), dropped)
    decomposed_model, decomposed = decomposed_copy(shallower, EXAMPLE)
    plan = uniform_plan(score_groups(decomposed_model, EXAMPLE, "magnitude"), 0.25, 8, "tiny", (1, 3, 32, 32), "double")
    return with_dropped(with_decomposition(plan, decomposed), dropped)


@pytest.fixture(scope="module")
def resnet_and_plan() -> tuple[torch.nn.Module, dict]:
    model = tiny_model("resnet")
    return model, _plan(model, ["stage1.0", "stage1.1"]).to_dict()


def _bad_plan(path: Path, model: torch.nn.Module) -> str:
    """Load and check the plan at ``path`` as a replay would: BadInput (exit 2) with a short one-line message."""
    started = time.perf_counter()
    with pytest.raises(BadInput) as info:
        check_plan(Plan.load(path), model, EXAMPLE)
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message and len(message) < 400, message
    assert time.perf_counter() - started < 10
    return message


@pytest.mark.slow
def test_a_real_plan_passes_the_check_and_replays(resnet_and_plan, tmp_path):
    model, data = resnet_and_plan
    (tmp_path / "plan.json").write_text(json.dumps(data))
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.notes["dropped_blocks"] == ["stage1.0", "stage1.1"] and "stem.0" in plan.notes["decomposed"]
    check_plan(plan, model, EXAMPLE)  # a replay on a copy: the model itself is untouched
    assert len(residual_blocks(model, EXAMPLE)) == 3


def _set_note(key: str, value: object):
    return lambda d: d["notes"].update({key: value})


@pytest.mark.parametrize(
    "change, words",
    [
        (_set_note("decomposed", ["stem.0", "no.such.layer"]), "decomposes 'no.such.layer'"),
        (_set_note("decomposed", ["stem.1"]), "decomposes 'stem.1', which is not a conv or linear layer"),  # a norm
        (_set_note("decomposed", ["stage1.0.body.0"]), "decomposes 'stage1.0.body.0'"),  # inside a removed block
        (_set_note("dropped_blocks", [""]), "dropped_blocks must be a printable name"),
        (_set_note("dropped_blocks", ["stage1.0", "stage1.0"]), "names 'stage1.0' twice"),
        (_set_note("dropped_blocks", "stage1.0"), "dropped_blocks must be a list"),
        (_set_note("dropped_blocks", ["stem"]), "removes 'stem', which is not a residual block"),
        (_set_note("run", ["os.system"]), "unknown note 'run'"),
        (lambda d: d["groups"][0].update(module="stem.0.0\nsecond line"), "must be a printable name"),
        (lambda d: d["groups"][0].update(channels=10**4000), "an integer of 13288 bits"),
        (lambda d: d["groups"][0].update(kept=[True]), "kept index must be an integer"),
        (lambda d: d["groups"].append(d["groups"][0]), "names 'stage2.0.shortcut.1' twice"),
        (lambda d: d.update(ratio=10**4000), "ratio must be a number in [0, 1]"),
        (lambda d: d.update(ratio=float("nan")), "ratio must be a number in [0, 1]"),
        (lambda d: d.update(input_shape=[1, 3, 32, 2**40]), "input_shape must be an integer in"),
    ],
)
def test_every_malformed_plan_is_one_line_of_bad_input(resnet_and_plan, tmp_path, change, words):
    """A real plan.json with one value changed as an attacker would: each is refused with exit 2 and one line
    before anything is replayed (a missing layer, a norm to decompose, an empty block name and huge integers ended
    in tracebacks)."""
    model, data = resnet_and_plan
    changed = json.loads(json.dumps(data))
    change(changed)
    (tmp_path / "plan.json").write_text(json.dumps(changed))
    assert words in _bad_plan(tmp_path / "plan.json", model)


def test_a_plan_cannot_bypass_a_layer_that_is_not_a_residual_block(resnet_and_plan, tmp_path):
    """A plan made consistently for the model without its plain conv block ("plain" keeps the shape, so a Bypass
    stands in for it without an error) replayed silently on the whole model; only residual blocks may go."""
    model, _ = resnet_and_plan
    assert "plain" not in residual_blocks(model, EXAMPLE)
    _plan(model, ["stage1.0", "plain"]).save(tmp_path / "plan.json")
    assert "removes 'plain', which is not a residual block" in _bad_plan(tmp_path / "plan.json", model)


@pytest.mark.slow
def test_a_build_refuses_a_bypassing_plan_before_it_measures_anything(resnet_and_plan, tmp_path):
    model, _ = resnet_and_plan
    _plan(model, ["stage1.0", "plain"]).save(tmp_path / "plan.json")
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--model", f"{TINY_MODELS}:resnet",
               "--input-shape", "1,3,32,32", "--plan", str(plan), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert len(errors) == 1 and "removes 'plain', which is not a residual block" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "baseline p50" not in done.stderr and "measuring" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        (b'{"version": 1, "groups": [{"module": "stem.0.0", "channels": ' + b"9" * 5000 + b"}]}", "cannot be read"),
        (b'{"version": 1, "groups": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "cannot be read"),
        (b'{"version": 1, "model": "\xff\xfe"}', "cannot be read"),
    ],
)
def test_a_plan_file_that_json_cannot_hold_is_bad_input(resnet_and_plan, tmp_path, text, words):
    (tmp_path / "plan.json").write_bytes(text)
    assert words in _bad_plan(tmp_path / "plan.json", resnet_and_plan[0])


def test_a_huge_or_endless_plan_file_is_refused_unread(resnet_and_plan, tmp_path):
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MiB that take no disk
    tracemalloc.start()
    try:
        assert "larger than 64 MiB" in _bad_plan(huge, resnet_and_plan[0])
        assert tracemalloc.get_traced_memory()[1] < 80 << 20
    finally:
        tracemalloc.stop()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    assert "not a regular file" in _bad_plan(fifo, resnet_and_plan[0])


# ------------------------------------------------------------------------------------------------------ bank entries

SHAPE = (1, 3, 16, 16)
GOOD_PLAN = {"groups": [{"module": "pw", "channels": 8, "kept": [0, 1, 2, 3]}], "notes": {"dropped_blocks": ["b1"]}}


def _entry(**changes: object) -> str:
    entry = {"model": "m", "input_shape": list(SHAPE), "embedding": [1.0, 0.0], "kept": {"pw": [0, 1]},
             "channels": {"pw": 8}, "dropped": ["b1"], "info": {"task": "bad"}}  # fmt: skip
    return json.dumps(entry | changes)


@pytest.mark.parametrize(
    "write, words",
    [
        (lambda p: p.write_text("[1, 2, 3]"), "not a JSON object"),
        (lambda p: p.write_text(_entry(input_shape=5)), "names no model and input shape"),
        (lambda p: p.write_text(_entry(embedding=[1.0, 0.0, 0.0])), "embedding has 3 values, this model's has 2"),
        (lambda p: p.write_text(_entry(embedding=["a", "b"])), "embedding is not a list of numbers"),
        (lambda p: p.write_text(_entry(embedding=[10**400, 0])), "embedding is not a list of numbers"),
        (lambda p: p.write_text(_entry().replace("1.0, 0.0", "NaN, 1.0")), "NaN is not a number"),
        (lambda p: p.write_text(_entry().replace("1.0, 0.0", "1e999, 1.0")), "out of range"),
        (lambda p: p.write_text(_entry(kept={"pw": [0, 99]})), "kept index of 'pw' must be an integer in [0, 7]"),
        (lambda p: p.write_text(_entry(kept={"pw": [-1]})), "kept index of 'pw'"),
        (lambda p: p.write_text(_entry(kept={"pw": [0]}, channels={})), "kept and channels"),
        (lambda p: p.write_text(_entry(dropped=["stem"])), "removes 'stem', which is not a residual block"),
        (lambda p: p.write_text(_entry(info=[1])), "info is not an object"),
        (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "skipped"),
        (lambda p: (p.write_bytes(b""), os.truncate(p, 100 << 20)), "at most 16 MiB"),  # sparse
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.symlink_to(p.parent.parent / "outside.json"), "a link to a file outside the bank"),
    ],
)
def test_a_malformed_bank_entry_is_skipped_with_one_warning_line(tmp_path, write, words):
    """Each bad entry is skipped with one line naming it, and the bank's good entries still vote (a non-object,
    a wrong-length embedding or an index out of range ended the build in a traceback, a FIFO hung it, and a link
    read a file outside the bank)."""
    bank = tmp_path / "bank"
    good = save_entry(bank, "m", SHAPE, torch.tensor([1.0, 0.0]), GOOD_PLAN, {"task": "good"})
    (tmp_path / "outside.json").write_text(_entry())  # a well-formed entry, but not the bank's
    write(bank / "bad.json")
    warnings: list[str] = []
    tracemalloc.start()
    try:
        entries = load_entries(bank, "m", SHAPE, warn=warnings.append, embedding_size=2, blocks=["b1", "b2"])
        assert tracemalloc.get_traced_memory()[1] < 8 << 20  # the large file was not read
    finally:
        tracemalloc.stop()
    assert [e["info"]["task"] for e in entries] == ["good"] and good.exists()
    assert len(warnings) == 1 and "bad.json" in warnings[0] and words in warnings[0] and "\n" not in warnings[0]
    own = [ScoredGroup("pw", 8, torch.arange(8, dtype=torch.float32))]
    voted, used = vote_scores(own, entries, torch.tensor([1.0, 0.0]))
    assert set(voted[0].scores.topk(4).indices.tolist()) == {0, 1, 2, 3} and used[0]["task"] == "good"
    assert vote_blocks(entries, torch.tensor([1.0, 0.0])) == ["b1"]


def test_an_embedding_of_another_length_is_never_a_neighbour():
    """Without the size given to load_entries, nearest still compares only embeddings as long as the task's."""
    entries = [{"embedding": [1.0, 0.0, 0.0]}, {"embedding": [0.0, 1.0]}]
    assert nearest(entries, torch.tensor([0.0, 1.0])) == {1: 1.0}
    with pytest.raises(BadInput, match="no earlier build"):
        nearest(entries[:1], torch.tensor([0.0, 1.0]))


# -------------------------------------------------------------------------------------------------- concurrent writes

_WRITER = """
import json, sys, time
from pathlib import Path
import torch
from conftest import Tiny
from edgeprune.score.costmodel import LatencyModel
from edgeprune.score.importance import score_groups
from edgeprune.score.structure import read_structure
from edgeprune.score.vote import save_entry
from edgeprune.target import load_target

folder, me = Path(sys.argv[1]), sys.argv[2]
example = torch.zeros(1, 3, 16, 16)
model = Tiny().eval()
structure = read_structure(model, example, [g.module for g in score_groups(model, example, "magnitude")])
widths = [float(w) for w in structure.full_widths()]
latency = LatencyModel(structure, load_target("x86-openvino"), samples=[(widths, 1.0 + int(me))])
plan = {"groups": [{"module": "pw", "channels": 32, "kept": [0, 1]}]}
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
errors, saves, end = [], 0, time.monotonic() + 1.5
while time.monotonic() < end:
    for info in ({"task": "shared"}, {"task": me}):  # one entry every writer saves, one of its own
        try:
            save_entry(folder / "bank", "m", (1, 3, 16, 16), torch.tensor([1.0, 0.0]), plan, info)
            latency.save(folder / "cache" / "profile.json", "runtime")
        except Exception as exc:
            errors.append(repr(exc))
        saves += 1
print(json.dumps({"errors": errors[:3], "failed": len(errors), "saves": saves}))
"""


@pytest.mark.slow  # three Python processes start and import torch: 10 to 20 s on two busy cores
def test_builds_saving_at_once_never_crash_tear_or_leave_temporary_files(tmp_path):
    """Three processes save the same bank entry, one of their own, and the same cost-model cache, as fast as they
    can for 1.5 s: no save fails, every file left is whole JSON (the cache: one writer's samples), and no temporary
    file is left (through one fixed temporary name, two writers crashed 109 times in 6,000 saves)."""
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(i)], cwd=TESTS, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        assert all(w.poll() is None for w in writers), [w.communicate() for w in writers]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["failed"] == 0 for r in results), results
    assert all(r["saves"] > 50 for r in results), results
    bank, cache = tmp_path / "bank", tmp_path / "cache"
    assert sorted(p.name for p in bank.iterdir()) == sorted(p.name for p in bank.glob("*.json"))
    assert [p.name for p in cache.iterdir()] == ["profile.json"]
    warnings: list[str] = []
    entries = load_entries(bank, "m", (1, 3, 16, 16), warn=warnings.append, embedding_size=2)
    assert sorted(e["info"]["task"] for e in entries) == ["0", "1", "2", "shared"] and not warnings
    assert json.loads((cache / "profile.json").read_text())["samples"][0][1] in (1.0, 2.0, 3.0)
