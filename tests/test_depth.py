"""Depth pruning (``--drop-blocks``): residual blocks found by running their own code, chosen on the task's data,
removed by the plan, replayed from plan.json, and the search started from the model without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import R18, TINY_MODELS, run_build, tiny_model, write_digits
from test_search import SkewedTarget

from edgeprune.backends import get_backend
from edgeprune.errors import BadInput
from edgeprune.graph.plan import Plan
from edgeprune.loop import BAND_LOW, CUT_TRIES, GUARD, SearchContext, closest_within, search
from edgeprune.model import load_model
from edgeprune.rewrite.depth import Bypass, residual_blocks, with_dropped
from edgeprune.rewrite.prune import apply_plan
from edgeprune.rounds import measure_plan
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.costmodel import new_model
from edgeprune.score.importance import score_groups
from edgeprune.score.structure import read_structure
from edgeprune.search.depth import (
    AUTO,
    check_drop_blocks,
    choose_blocks,
    choose_count,
    choose_depth,
    fewest_within,
    without_blocks,
)
from edgeprune.target import load_target

EXAMPLE = torch.zeros(1, 3, 32, 32)


def _tiny_resnet() -> torch.nn.Module:
    model = tiny_model("resnet")
    with torch.no_grad():  # trained-looking statistics, so that every block does something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    return model


def test_residual_blocks_are_found_by_running_their_own_code():
    """The blocks whose input passes through them when their weights are zero: not the plain block that keeps the
    shape, not the downsampling block with a projection, and not the stage that holds two residual blocks (itself
    residual: only the innermost count)."""
    assert residual_blocks(_tiny_resnet(), EXAMPLE) == ["stage1.0", "stage1.1", "stage2.1"]
    resnet18 = load_model(R18, input_shape=(1, 3, 64, 64))
    # timm's resnet18: the second block of each stage, and the first of stage 1 (no downsampling there)
    assert residual_blocks(resnet18.module, resnet18.input.example()) == [
        "layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"
    ]  # fmt: skip


def test_the_block_that_changes_the_outputs_least_is_removed_first_and_too_many_is_bad_input():
    model = _tiny_resnet()
    with torch.no_grad():  # stage1.1 adds nothing to its input: removing it changes no output
        model.stage1[1].body[4].weight.zero_(), model.stage1[1].body[4].bias.zero_()
    batches = [(torch.randn(8, 3, 32, 32), None) for _ in range(2)]
    choice = choose_blocks(model, EXAMPLE, batches, 2)
    assert choice.dropped[0] == "stage1.1" and choice.distance[0] < 1e-9
    assert choice.distance[1] > 1e-4 and choice.residual == ("stage1.0", "stage1.1", "stage2.1")
    assert json.loads(json.dumps(choice.to_dict()))["dropped"] == list(choice.dropped)
    with pytest.raises(BadInput, match=r"--drop-blocks 4: this model has 3 residual blocks .* pass --drop-blocks 3"):
        choose_blocks(model, EXAMPLE, batches, 4)


@pytest.mark.slow
def test_named_blocks_are_removed_in_that_order_and_a_name_that_is_no_residual_block_is_bad_input():
    """vote's blocks (given_blocks, through choose_depth with a list): removed as named, each distance measured."""
    model = _tiny_resnet()
    batches = [(torch.randn(8, 3, 32, 32), None) for _ in range(2)]
    choice = choose_depth(model, EXAMPLE, batches, ["stage2.1", "stage1.0"])
    assert choice.dropped == ("stage2.1", "stage1.0") and choice.residual == ("stage1.0", "stage1.1", "stage2.1")
    alone = choose_blocks(model, EXAMPLE, batches, 3)
    judged = {n: d for n, d in zip(alone.dropped, alone.distance, strict=True)}
    if alone.dropped[0] == "stage2.1":  # the same removal, judged the same way, reads the same distance
        assert choice.distance[0] == pytest.approx(judged["stage2.1"])
    assert 0 < choice.distance[0] < choice.distance[1]
    assert choose_depth(model, EXAMPLE, batches, []).dropped == ()
    with pytest.raises(BadInput, match=r"not residual blocks of this model \(stage3.0\).*--drop-blocks auto"):
        choose_depth(model, EXAMPLE, batches, ["stage1.0", "stage3.0"])


def test_auto_bounds_the_count_by_measured_latency_and_picks_the_closest_plan():
    """``--drop-blocks auto``: the fewest blocks that alone meet the budget, found by bisection on measured
    latencies, bound the counts; of the counts tried, the one whose plan to the budget keeps the outputs closest
    wins, counts whose channels cannot reach the budget are no candidates, and none reaching gives 0."""
    latencies = {n: 10.0 - n for n in range(10)}  # 9 blocks, each 1 ms
    for budget, expected in ((6.5, 4), (9.5, 1), (0.5, 9), (1.0, 9), (9.0, 1)):
        measured: list[int] = []
        assert fewest_within(budget, 9, lambda n: measured.append(n) or latencies[n]) == expected  # noqa: B023
        assert len(measured) <= 4 and 0 not in measured
    assert fewest_within(1.0, 0, lambda n: pytest.fail("nothing to measure")) == 0
    chosen, tried = choose_count(12, lambda n: (n - 6) ** 2)
    assert chosen == 6 and [n for n, _ in tried] == [0, 3, 4, 6, 8, 9, 12]  # 5 spread, then beside the best
    assert choose_count(12, lambda n: (n - 7) ** 2, tries=9)[0] == 7  # refined until adjacent
    assert choose_count(12, lambda n: None if n < 9 else float(n))[0] == 9
    assert choose_count(4, lambda n: None) == (0, ((0, None), (1, None), (2, None), (3, None), (4, None)))
    model = _tiny_resnet()
    batches = [(torch.randn(8, 3, 32, 32), None)]
    convs = lambda m, name: float(sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()))  # noqa: E731
    order = choose_blocks(model, EXAMPLE, batches, None)
    # 11 convs whole, 2 fewer per block: 2 blocks meet 8; channels cannot reach it without blocks here
    auto = choose_depth(model, EXAMPLE, batches, AUTO, convs, 8.0, lambda m, ms, n: None if ms > 10 else m, 11.0)
    judged = dict(auto.judged)
    assert judged[0] is None and 0 < judged[1] < judged[2] and auto.dropped == order.dropped[:1]
    assert auto.goal_ms == 8.0 and auto.probes == ((1, 9.0), (2, 7.0))
    assert auto.to_dict()["auto_judged"][1] == {"blocks": 1, "distance": judged[1]} and "auto" in auto.describe()
    for count, plan, counted, message in ((-1, None, False, "a count of 0 or more, or auto"),
                                          ("some", None, False, "got some"), (2, "plan.json", False, "not with --plan"),
                                          (AUTO, None, True, "it needs --speedup or --latency-ms")):  # fmt: skip
        with pytest.raises(BadInput, match=message):
            check_drop_blocks(count, plan, counted, synthetic=False)
    with pytest.raises(BadInput, match="chooses the blocks whose removal moves the outputs least on the task's data"):
        check_drop_blocks(1, None, False, synthetic=True)
    # Without a count: auto where it can judge (global allocation, a latency budget, task data, no plan), else 0
    assert check_drop_blocks(None, None, False, synthetic=False) == AUTO
    for plan, counted, synthetic, allocation in (
        (None, False, False, "uniform"),
        (None, True, False, "global"),
        (None, False, True, "global"),
        ("plan.json", False, False, "global"),
    ):
        assert check_drop_blocks(None, plan, counted, synthetic, allocation) == 0
    assert check_drop_blocks(3, None, False, synthetic=False) == 3


def test_the_cut_judged_is_the_least_cut_within_the_budget_else_the_fastest():
    """Of a count's measured channel cuts, the depth choice judges the one that removed least while within the
    budget; where none is, the one closest to it (the fastest)."""
    a, b, c = torch.nn.Identity(), torch.nn.ReLU(), torch.nn.Tanh()
    assert closest_within([(a, 1.3), (b, 0.95), (c, 0.8)], 1.0) == (b, 0.95)
    assert closest_within([(a, 1.3), (b, 1.1)], 1.0) == (b, 1.1)


def test_a_plan_that_removes_blocks_replays_on_the_original_model(tmp_path):
    """The channel plan is made on the model without the blocks; plan.json names the blocks, and apply_plan on the
    original model bypasses them first: the same weights, the same outputs, and no layer of theirs left."""
    model = _tiny_resnet()
    batches = [(torch.randn(8, 3, 32, 32), None)]
    shallower = without_blocks(model, choose_blocks(model, EXAMPLE, batches, 2))
    scored = score_groups(shallower, EXAMPLE, "magnitude")
    plan = uniform_plan(scored, 0.25, 8, "tiny", tuple(EXAMPLE.shape), "magnitude")
    dropped = [name for name, m in shallower.named_modules() if isinstance(m, Bypass)]
    plan = with_dropped(plan, dropped)
    plan.save(tmp_path / "plan.json")
    replayed = apply_plan(model, Plan.load(tmp_path / "plan.json"), EXAMPLE)
    direct = apply_plan(shallower, plan, EXAMPLE)  # its blocks are bypassed already: only the channels are cut
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(replayed(x), direct(x), atol=1e-6)
    convs = [n for n, m in replayed.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(dropped) == 2 and not any(n.startswith(tuple(d + "." for d in dropped)) for n in convs)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) - len(convs) == 4  # two convs a block
    with pytest.raises(BadInput, match="plan removes block 'stage9.0', which the model does not have"):
        apply_plan(model, with_dropped(plan, ["stage9.0"]), EXAMPLE)


@pytest.mark.slow
def test_the_search_starts_from_the_model_without_the_blocks(r18, example, tmp_path):
    """The budget stays the unpruned model's; the model without the blocks is measured first (step 0) and the rounds
    start from it. Where it already fits, it is shipped as it is, with no round."""
    target = load_target("x86-openvino")
    skewed = SkewedTarget()  # latency falls with the square of the MACs kept, 12 ms unpruned
    baseline = skewed.measure(r18, example)
    shallower = without_blocks(r18, choose_blocks(r18, example, [(torch.randn(4, 3, 64, 64), None)], 2))
    scored = score_groups(shallower, example, "magnitude")
    for rounds in (True, False):
        ctx = SearchContext(shallower, example, scored, R18, "magnitude", target, get_backend("openvino"), None,
                            tmp_path, say=lambda _: None, executor=skewed)  # fmt: skip
        ctx.structure = read_structure(shallower, example, [g.module for g in scored])
        ctx.latency_model = new_model(ctx.structure, target, "simulated")
        start = measure_plan(ctx, ctx.plan_at(0.0)[0], baseline.p50, 0, 12.0)
        assert start.latency < 0.99 * baseline.p50  # two of resnet18's blocks removed: fewer MACs, same widths
        budget = start.latency / 1.3 if rounds else start.latency * 1.01
        chosen, candidates, unreachable = search(ctx, (baseline, None), budget, 4, start)
        assert candidates[0] is start and not unreachable
        if rounds:
            assert BAND_LOW * budget <= chosen.latency <= GUARD * budget and chosen.step >= 1
        else:
            assert chosen is start and candidates == [start]


@pytest.mark.slow
def test_a_compensating_depth_choice_refits_against_the_whole_model_and_judges_on_the_other_batches(
    tmp_path, monkeypatch
):
    """Each count's channel cut is refitted, as the build's final refit is, against the model with every block (the
    layers after a removed block are fitted to what the whole model computes there), on every other batch, and the
    counts are judged on the batches the refit was not fitted on."""
    import edgeprune.loop as loop
    import edgeprune.search.depth as depth

    model, target, skewed = _tiny_resnet(), load_target("x86-openvino"), SkewedTarget()
    baseline = skewed.measure(model, EXAMPLE).p50  # the unpruned model's MACs: the simulated latency's full width
    refitted_against, judged_on = [], []
    real_compensate, real_judge = loop.compensate, depth.Judge

    def compensate(original, pruned, batches):
        refitted_against.append(original)
        return real_compensate(original, pruned, batches)

    class Judge(real_judge):
        def __init__(self, reference, batches):
            judged_on.append(list(batches))
            super().__init__(reference, batches)

    class Simulated(SearchContext):  # timed by the simulated target (deterministic), nothing exported
        def measure(self, candidate, name):
            return skewed.measure(candidate, self.example), None

    monkeypatch.setattr(loop, "compensate", compensate)
    monkeypatch.setattr(depth, "Judge", Judge)
    score = lambda m: score_groups(m, EXAMPLE, "magnitude")  # noqa: E731
    ctx = Simulated(model, EXAMPLE, score(model), f"{TINY_MODELS}:resnet", "magnitude", target, get_backend("openvino"),
                    None, tmp_path, say=lambda _: None, compensating=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 32, 32, generator=generator), None) for _ in range(4)]
    choice, _ = loop.remove_blocks(ctx, AUTO, batches, baseline, baseline / 1.3, score, "simulated")
    assert len(choice.judged) >= 2 and any(d is not None for _, d in choice.judged)
    assert refitted_against and all(original is model for original in refitted_against)
    assert not any(isinstance(m, Bypass) for m in model.modules())  # the whole model, left whole
    assert [x for x, _ in judged_on[-1]] == [x for x, _ in batches[1::2]]
    # Where blocks went, the search's steepness choice aims its refit at the whole model too (SearchContext.unpruned).
    assert ctx.unpruned is (model if choice.dropped else None)


def _build(tmp_path: Path, name: str, *args: str):
    """A build of the tiny resnet into ``tmp_path / name``, with short adaptation and recovery."""
    return run_build("--model", f"{TINY_MODELS}:resnet", "--out", str(tmp_path / name), "--json", "--adapt-steps", "10",
                     "--recover-steps", "3", *args)  # fmt: skip


@pytest.mark.slow
def test_build_drops_blocks_then_cuts_channels_and_the_plan_replays(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits")
    write_digits(tmp_path / "task.npz", per_class=12)
    done = _build(tmp_path, "a", "--train", str(tmp_path / "task.npz"), "--drop-blocks", "2", "--macs-ratio", "0.5")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert len(report["depth"]["dropped"]) == 2 and report["met_budget"]
    assert set(report["depth"]["dropped"]) <= {"stage1.0", "stage1.1", "stage2.1"}
    assert "Residual blocks removed (2 of 3)" in (tmp_path / "a" / "report.html").read_text()
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["notes"]["dropped_blocks"] == report["depth"]["dropped"]
    replay = _build(tmp_path, "b", "--train", str(tmp_path / "task.npz"), "--plan", str(tmp_path / "a" / "plan.json"),
                    "--macs-ratio", "0.5")  # fmt: skip
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert json.loads(replay.stdout)["result"]["macs"] == report["result"]["macs"]
    # bad input: one line, exit 2, nothing written
    # (checked before the model loads, and after: the other messages are check_drop_blocks's, tested above)
    for args, message in ((["--drop-blocks", "-1"], "--drop-blocks takes a count of 0 or more"),
                          (["--drop-blocks", "5", "--train", str(tmp_path / "task.npz")],
                           "this model has 3 residual blocks")):  # fmt: skip
        failed = _build(tmp_path, "bad", "--macs-ratio", "0.5", *args)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_build_with_auto_judges_counts_of_blocks_on_the_task_and_ships_the_closest(tmp_path):
    """A build with task data and a speedup budget (``--drop-blocks auto`` by default): each count it tried is in
    the report with its plan's distance, the count it shipped is the closest of those that reached the budget, and
    the plan names its blocks."""
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits")
    write_digits(tmp_path / "task.npz", per_class=12)
    done = _build(tmp_path, "a", "--train", str(tmp_path / "task.npz"), "--speedup", "1.5", "--method", "taylor")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    depth = report["depth"]
    judged = {j["blocks"]: j["distance"] for j in depth["auto_judged"]}
    assert 0 in judged and len(judged) >= 2 and depth["auto_goal_ms"] > 0
    reached = {n: d for n, d in judged.items() if d is not None}
    assert len(depth["dropped"]) == min(reached, key=lambda n: (reached[n], n))
    # Each count cut by channels was judged as measured, not as priced: re-aimed from where it landed, at most
    # CUT_TRIES times, and the cut judged is the least cut within the budget where one is.
    cuts = {c["blocks"]: c for c in depth["auto_cuts_measured"]}
    assert 0 in cuts and set(cuts) <= set(reached)
    assert all(1 <= c["measurements"] <= CUT_TRIES and c["p50_ms"] > 0 for c in cuts.values())
    if depth["dropped"]:  # the search's round 0 is the depth choice's measurement of the model without them
        probes = {m["blocks"]: m["p50_ms"] for m in depth["auto_measured"]}
        start = [i["comparable_p50"] for i in report["iterations"] if i["step"] == 0]
        assert start == [pytest.approx(probes[len(depth["dropped"])])]
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["notes"].get("dropped_blocks", []) == depth["dropped"]
    assert "each count's plan to" in (tmp_path / "a" / "report.html").read_text()


@pytest.mark.slow
def test_a_vote_build_removes_the_blocks_its_bank_removed_instead_of_judging_counts(tmp_path):
    """With the count left to edgeprune, ``--method vote`` removes the blocks that the nearest earlier tasks in the
    bank removed (here one task: all of its blocks), instead of judging counts on its own few samples; the bank
    entry records the blocks, the plan and the report name them."""
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits")
    write_digits(tmp_path / "task.npz", per_class=12)
    bank = str(tmp_path / "bank")
    task = ["--train", str(tmp_path / "task.npz"), "--speedup", "1.5", "--bank", bank]
    done = _build(tmp_path, "a", *task, "--method", "taylor", "--drop-blocks", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    first = json.loads(done.stdout)
    assert json.loads(Path(first["bank_entry"]).read_text())["dropped"] == first["depth"]["dropped"]
    done = _build(tmp_path, "b", *task, "--method", "vote")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert len(first["depth"]["dropped"]) == 2 and report["vote"]["blocks"] == sorted(first["depth"]["dropped"])
    assert report["depth"]["dropped"] == report["vote"]["blocks"] and "auto_judged" not in report["depth"]
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["notes"]["dropped_blocks"] == report["vote"]["blocks"]
    assert "as the bank voted" in done.stderr + done.stdout
    assert "nearest earlier tasks in the bank removed" in (tmp_path / "b" / "report.html").read_text()
