"""Global allocation's steepness: how much dearer a layer is to cut the emptier it is, and its choice on task data."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import R18  # noqa: F401
from torch import nn

from edgeprune.graph.plan import GroupPlan, Plan
from edgeprune.rewrite.compensate import compensate
from edgeprune.rewrite.prune import apply_plan
from edgeprune.score.allocate import UNIFORM_STEEPNESS, global_widths, plan_from_widths
from edgeprune.score.costmodel import new_model
from edgeprune.score.importance import score_groups
from edgeprune.score.structure import read_structure
from edgeprune.search.depth import choose_blocks, without_blocks
from edgeprune.search.steepness import IMPORTANCE, choose_steepness, output_distance
from edgeprune.target import load_target

TARGET = load_target("x86-openvino")


def _scores(r18_scored):
    """Taylor-like scores, comparable across groups, of about the same size in every group."""
    generator = torch.Generator().manual_seed(0)
    groups = []
    for g in r18_scored:
        if g.scores is not None:
            scores = torch.rand(g.channels, generator=generator) + 1.0
            g = replace(g, scores=scores, comparable=True)
        groups.append(g)
    return groups


def test_steepness_spares_a_layer_the_scores_would_empty(r18, r18_scored, example):
    """At steepness 0 a few groups, where a channel saves the most time, take the whole cut; the steeper the
    allocation, the more groups share it and the less any one group loses, while every allocation meets the goal."""
    scored = _scores(r18_scored)
    structure = read_structure(r18, example, [g.module for g in scored])
    model = new_model(structure, TARGET, "openvino 1.0")
    goal = 0.7 * model.predict(structure.full_widths())
    kept = {}
    for steepness in (0.0, 2.0, 8.0):
        widths = global_widths(scored, structure, model.predict, goal, 8, steepness)
        assert model.predict(widths) <= goal
        kept[steepness] = widths / structure.channels
    prunable = [i for i, g in enumerate(scored) if g.scores is not None and g.channels > 8]
    # Measured: at 0, two groups cut to about half and the rest whole; at 8, every group cut, none below 0.7.
    assert kept[0.0].min() < kept[2.0].min() < kept[8.0].min()
    assert sum(kept[0.0][prunable] < 1) < sum(kept[2.0][prunable] < 1) < sum(kept[8.0][prunable] < 1)
    assert np.ptp(kept[8.0][prunable]) < np.ptp(kept[0.0][prunable])


def test_a_classifiers_distance_is_its_logits_cosine_distance_bounded_per_sample():
    """The steepness choice judges a classifier by the mean cosine distance of its logits from the unpruned model's:
    a model whose logits point the opposite way on every sample is at 2, however confident (the KL divergence of
    the softmax, which the choice used before, grows without bound with that confidence)."""
    from edgeprune.rewrite.judge import Judge

    torch.manual_seed(0)
    reference = nn.Linear(8, 5).eval()
    batches = [(torch.randn(16, 8), None), (torch.randn(16, 8), None)]
    opposite, nearby = copy.deepcopy(reference), copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in opposite.parameters():
            parameter.mul_(-1000.0)
        nearby.weight.add_(0.1 * torch.randn_like(nearby.weight))
    judge = Judge(reference, batches)
    assert judge.distance(reference) < 1e-6
    assert judge.distance(opposite) == pytest.approx(2.0, abs=1e-5)
    x = torch.cat([b for b, _ in batches])
    expected = float((1 - F.cosine_similarity(nearby(x), reference(x), dim=-1)).mean())
    assert judge.distance(nearby) == pytest.approx(expected, rel=1e-5) and 0 < expected < 0.1


def test_output_distance_is_zero_for_the_same_model_and_grows_with_the_cut(r18, r18_scored, example):
    batches = [(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(1)), None)]
    assert output_distance(r18, r18, batches) < 1e-9
    from edgeprune.rewrite.prune import apply_plan
    from edgeprune.score.allocate import uniform_plan

    mild, deep = (apply_plan(r18, uniform_plan(r18_scored, r, 8, R18, tuple(example.shape), "m"), example)
                  for r in (0.25, 0.75))  # fmt: skip
    assert 0 < output_distance(mild, r18, batches) < output_distance(deep, r18, batches)


@pytest.mark.slow
def test_the_steepness_whose_plan_stays_closest_to_the_unpruned_model_is_chosen(r18, r18_scored, example):
    """choose_steepness prunes each steepness's plan, recalibrates batch norm and compares outputs: a plan that cuts
    nothing (steepness 2 here) stays closest and is chosen; plans that are the same are measured once."""
    batches = [(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(2)), None)]
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    full = structure.full_widths()
    halved = np.where(full > 8, np.maximum(8, full // 16 * 8), full)
    made = []

    def make_plan(steepness: float, channels: str) -> Plan:
        made.append(steepness)
        widths = full if steepness == 2.0 else halved
        return plan_from_widths(r18_scored, widths, R18, tuple(example.shape), "m")

    choice = choose_steepness(r18, example, batches, make_plan, (0.0, 1.0, 2.0, 4.0))
    assert made == [0.0, 1.0, 2.0, 4.0]
    # Recalibrated on these few random inputs, even the uncut plan moves a little; the halved one moves more.
    assert (
        choice.chosen == 2.0
        and 0 < choice.losses[2.0, IMPORTANCE] < choice.losses[0.0, IMPORTANCE] == choice.losses[1.0, IMPORTANCE]
    )
    assert choice.samples == 4 and "steepness 2 (output distance" in choice.describe()
    assert choice.to_dict()["distance"]["4"] == choice.losses[4.0, IMPORTANCE]


@pytest.mark.slow
def test_a_plan_that_fails_to_prune_is_not_chosen(r18, r18_scored, example):
    batches = [(torch.randn(2, *example.shape[1:]), None)]
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    good = plan_from_widths(r18_scored, structure.full_widths(), R18, tuple(example.shape), "m")
    broken = replace(good, groups=(GroupPlan(module="no.such.layer", channels=8, kept=(0,)),))

    choice = choose_steepness(r18, example, batches, lambda s, c: good if s == 1.0 else broken, (0.0, 1.0))
    assert choice.chosen == 1.0 and choice.losses[0.0, IMPORTANCE] is None and "0: failed" in choice.describe()


def _halved_plan(r18, r18_scored, example) -> Plan:
    """Every group wider than 8 cut to about half its channels (a multiple of 8)."""
    full = read_structure(r18, example, [g.module for g in r18_scored]).full_widths()
    widths = np.where(full > 8, np.maximum(8, full // 16 * 8), full)
    return plan_from_widths(r18_scored, widths, R18, tuple(example.shape), "m")


@pytest.mark.slow
def test_when_the_build_compensates_plans_are_judged_after_the_refit_on_samples_it_did_not_see(r18, r18_scored,
                                                                                          example):  # fmt: skip
    """With compensating, each plan is refitted by least squares on every other batch and judged on the rest: the
    refit brings the halved plan's outputs closer than batch-norm recalibration does, on samples it was not fitted
    on."""
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, *example.shape[1:], generator=generator), None) for _ in range(4)]
    halved = _halved_plan(r18, r18_scored, example)
    refit = choose_steepness(r18, example, batches, lambda s, c: halved, (0.0,), compensating=True)
    recalibrated = choose_steepness(r18, example, batches, lambda s, c: halved, (0.0,))
    assert refit.samples == 16 and recalibrated.samples == 32  # judged on the two batches it was not fitted on
    assert refit.losses[0.0, IMPORTANCE] < recalibrated.losses[0.0, IMPORTANCE]


@pytest.mark.slow
def test_a_compensating_build_judges_its_steepness_after_a_refit_on_its_unlabelled_images_too(r18, r18_scored,
                                                                                             example):  # fmt: skip
    """The build's final refit fits on the labelled and the unlabelled images; the steepness is judged after a refit
    on both as well (half of each to fit, the other half to judge). With two labelled batches and four unlabelled,
    the refit sees three batches and is judged on three."""
    generator = torch.Generator().manual_seed(4)
    labelled = [(torch.randn(4, *example.shape[1:], generator=generator), None) for _ in range(2)]
    unlabelled = [(torch.randn(4, *example.shape[1:], generator=generator), None) for _ in range(4)]
    halved = _halved_plan(r18, r18_scored, example)
    alone = choose_steepness(r18, example, labelled, lambda s, c: halved, (0.0,), compensating=True)
    both = choose_steepness(
        r18, example, labelled, lambda s, c: halved, (0.0,), compensating=True, unlabelled=unlabelled
    )
    assert alone.samples == 4 and both.samples == 12
    # Without compensating (batch-norm recalibration on the labelled batches only) the unlabelled ones are not used.
    assert choose_steepness(r18, example, labelled, lambda s, c: halved, (0.0,), unlabelled=unlabelled).samples == 8
    assert both.losses[0.0, IMPORTANCE] > 0


@pytest.mark.slow
def test_where_blocks_were_removed_the_refit_aims_at_the_whole_model_and_is_judged_against_it(r18, example):
    """As the build's final refit and its held-out judge do (rewrite/recover.py): the plan prunes the model without
    the removed blocks, the refit aims the layers after them at what the model with every block computes there, and
    the distance is measured to that model. Aimed at the model without the blocks, the refit leaves the plan further
    from the whole model."""
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, *example.shape[1:], generator=generator), None) for _ in range(4)]
    shallower = without_blocks(r18, choose_blocks(r18, example, batches[:1], 2))
    halved = _halved_plan(shallower, score_groups(shallower, example, "magnitude"), example)
    choice = choose_steepness(shallower, example, batches, lambda s, c: halved, (0.0,), compensating=True,
                              reference=r18)  # fmt: skip
    aimed_at = {}
    for name, original in (("whole", r18), ("shallower", shallower)):
        aimed_at[name] = apply_plan(shallower, halved, example)
        compensate(original, aimed_at[name], [x for x, _ in batches[::2]])
    to_whole = {name: output_distance(pruned, r18, batches[1::2]) for name, pruned in aimed_at.items()}
    assert choice.losses[0.0, IMPORTANCE] == pytest.approx(to_whole["whole"], rel=1e-4)
    assert to_whole["whole"] < to_whole["shallower"]


def test_a_choice_between_identical_plans_is_not_settled_and_is_made_again_at_the_next_plan(r18, r18_scored, example,
                                                                                           tmp_path):  # fmt: skip
    """At a goal deeper than the allocator's floor every steepness makes the same plan, the tie goes to 0, and the
    data said nothing: a build whose first goal fell there had carried steepness 0 through every later round. Such a
    choice is not settled; the next plan chooses again, and a choice between different plans holds."""
    from edgeprune.backends import get_backend
    from edgeprune.loop import SearchContext

    batches = [(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(5)), None)]
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    same = plan_from_widths(r18_scored, structure.full_widths(), R18, tuple(example.shape), "m")
    tie = choose_steepness(r18, example, batches, lambda s, c: same, (0.0, 1.0, 2.0))
    assert tie.chosen == 0.0 and tie.plans == 1 and not tie.settled and tie.to_dict()["settled"] is False
    assert "chosen again at the next" in tie.describe() and tie.samples == 0

    said = []
    ctx = SearchContext(r18, example, _scores(r18_scored), R18, "taylor", TARGET, get_backend("openvino"), None,
                        tmp_path, say=said.append)  # fmt: skip
    ctx.structure = structure
    ctx.latency_model = new_model(structure, TARGET, "openvino 1.0")
    ctx.steepness_batches = batches
    ctx.plan_for(0.0)  # below every floor: no plan reaches it; the cheapest (the uniform ratio's 10%) for now
    assert ctx.steepness is not None and not ctx.steepness.settled and ctx.steepness.chosen == UNIFORM_STEEPNESS
    assert ctx.steepness.plans == 0 and len(ctx.steepness.over_goal) == 5
    ctx.plan_for(0.7 * ctx.latency_model.predict(structure.full_widths()))
    assert ctx.steepness.settled and ctx.steepness.plans > 1
    assert len([m for m in said if m.startswith("global allocation: ")]) == 2
    ctx.plan_for(0.6 * ctx.latency_model.predict(structure.full_widths()))  # settled: not chosen a third time
    assert len([m for m in said if m.startswith("global allocation: ")]) == 2


def test_plans_over_the_goal_are_not_compared_and_the_uniform_ratio_is_a_candidate(r18, r18_scored, example):
    """A plan predicted over the goal keeps more of the model and would win by not doing what was asked: it is not
    measured. The uniform ratio (UNIFORM_STEEPNESS) is chosen where it stays closest, and the report can say so in
    JSON (which has no infinity)."""
    import json

    batches = [(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(6)), None)]
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    full = structure.full_widths()
    halved = np.where(full > 8, np.maximum(8, full // 16 * 8), full)
    plans = {0.0: full, 1.0: halved, UNIFORM_STEEPNESS: np.where(full > 8, full - 8, full)}
    make = lambda s, c: plan_from_widths(r18_scored, plans[s], R18, tuple(example.shape), "m")  # noqa: E731
    cost = lambda plan: float(sum(structure.widths_of(plan)))  # noqa: E731

    choice = choose_steepness(r18, example, batches, make, tuple(plans), cost=cost, goal=float(sum(full)) - 1)
    assert (
        choice.over_goal == ((0.0, IMPORTANCE),) and choice.losses[0.0, IMPORTANCE] is None
    )  # the uncut plan would have been closest
    assert (
        choice.chosen == UNIFORM_STEEPNESS
        and 0 < choice.losses[UNIFORM_STEEPNESS, IMPORTANCE] < choice.losses[1.0, IMPORTANCE]
    )
    assert choice.settled and choice.plans == 2
    assert "uniform ratio (output distance" in choice.describe() and "steepness 0: over the goal" in choice.describe()
    report = json.loads(json.dumps(choice.to_dict(), allow_nan=False))
    assert report["chosen"] == "uniform" and report["over_goal"] == ["0"] and report["distance"]["1"] > 0

    only_one = choose_steepness(r18, example, batches, make, tuple(plans), cost=cost, goal=float(sum(halved)))
    assert only_one.chosen == 1.0 and not only_one.settled and only_one.samples == 0


def test_a_cut_group_keeps_its_channels_by_magnitude_where_that_keeps_the_outputs_closer():
    """The second choice beside the steepness: which channels a cut group keeps, by the build's scores or by weight
    magnitude. Tiny's inverted-residual group has its odd channels dead (their weights zero) and scores that rank
    those first, as a noisy importance can: kept by the scores, the block is cut to nothing live; kept by magnitude,
    to its live half. The data says so, and the choice goes to magnitude; where both keep the same channels there
    is nothing to compare and the build's own scores stay."""
    from conftest import Tiny

    from edgeprune.rewrite.recover import recalibrate_batchnorm
    from edgeprune.score.allocate import rechoose_channels
    from edgeprune.score.importance import score_groups

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.pw.weight[1::2] = 0
        model.dw.weight[1::2] = 0
    example = torch.randn(1, 3, 16, 16)
    batches = [(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)), None)]
    recalibrate_batchnorm(model, batches)  # its statistics as on these inputs, as a trained model's would be
    magnitude = score_groups(model, example, "l2")
    odd_first = torch.arange(32) % 2 + torch.rand(32) * 0.1
    noisy = [replace(g, scores=odd_first, comparable=True) if g.module == "dw" else g for g in magnitude]
    structure = read_structure(model, example, [g.module for g in noisy])
    widths = np.where(np.array(structure.groups) == "dw", 16, structure.full_widths())
    plan = plan_from_widths(noisy, widths, "tiny", tuple(example.shape), "fisher")
    by_magnitude = rechoose_channels(plan, magnitude)
    kept = {
        name: dict((g.module, g.kept) for g in p.groups)["dw"]
        for name, p in (("scores", plan), ("magnitude", by_magnitude))
    }
    assert kept["scores"] == tuple(range(1, 32, 2)) and kept["magnitude"] == tuple(range(0, 32, 2))
    assert by_magnitude.ratio == plan.ratio and [g.width for g in by_magnitude.groups] == [g.width for g in plan.groups]

    make = lambda s, c: by_magnitude if c == "l2" else plan  # noqa: E731
    choice = choose_steepness(model, example, batches, make, (0.0,), channels=(IMPORTANCE, "l2"))
    assert choice.channels == "l2" and choice.settled
    assert choice.losses[0.0, "l2"] < 0.1 * choice.losses[0.0, IMPORTANCE]
    assert "steepness 0, channels by L2 magnitude (output distance" in choice.describe()
    assert choice.to_dict()["channels"] == "l2" and set(choice.to_dict()["distance"]) == {"0", "0 l2"}

    same = choose_steepness(model, example, batches, lambda s, c: by_magnitude, (0.0,), channels=(IMPORTANCE, "l2"))
    assert same.channels == IMPORTANCE and not same.settled


def test_torch_prunings_uniform_l1_plan_is_one_of_global_allocations_candidates(r18, r18_scored, example, tmp_path):
    """Among the channel choices a build judges are L2 and L1 magnitude and energy; at the uniform ratio, L1's plan is
    the one Torch-Pruning's uniform L1 makes for the same goal, so the baseline teams reach for is always compared. On
    ConvNeXt-atto a build that could only choose L2's channels kept 0.782 top-1 agreement where uniform L1, at the
    same widths, kept 0.834 (README)."""
    from edgeprune.backends import get_backend
    from edgeprune.loop import SearchContext
    from edgeprune.score.importance import score_groups
    from edgeprune.search.steepness import CHANNEL_CHOICES, SteepnessChoice

    target = load_target("x86-openvino")
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    contexts = {}
    for allocation, scored in (("global", r18_scored), ("uniform", score_groups(r18, example, "magnitude"))):
        ctx = SearchContext(r18, example, scored, "r18", "fisher", target, get_backend("openvino"), None, tmp_path,
                            say=lambda _: None, allocation=allocation)  # fmt: skip
        ctx.structure, ctx.latency_model = structure, new_model(structure, target, "estimate")
        contexts[allocation] = ctx
    ctx = contexts["global"]
    batches = [(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(3)), None)]
    ctx.channel_scores = {c: score_groups(r18, example, m, batches) for c, m in CHANNEL_CHOICES.items()}
    assert ctx.channel_choices() == (IMPORTANCE, "l2", "l1", "energy")
    goal = 0.5 * ctx.latency_model.predict(structure.full_widths())
    tp_plan, _, _ = contexts["uniform"].plan_for(goal)
    kept = {}
    for channels in ctx.channel_choices():
        ctx.steepness = SteepnessChoice(UNIFORM_STEEPNESS, {}, 0, channels=channels)
        plan, _, _ = ctx.plan_for(goal)
        kept[channels] = [g.kept for g in plan.groups]
        assert [g.width for g in plan.groups] == [g.width for g in tp_plan.groups]
    assert kept["l1"] == [g.kept for g in tp_plan.groups]
    assert kept["l2"] != kept["l1"]  # (the fixture's own scores are L1's too)
    assert kept["energy"] != kept["l1"]


def test_below_the_floor_the_cheapest_plans_channel_choices_are_compared_and_the_steepness_stays_open(
    r18, r18_scored, example
):
    """Where no plan reaches the goal, the cheapest is taken; with channel choices there are several cheapest plans,
    one set of widths with each choice's channels, and they are compared (RegNetX-200MF's uniform floor kept 0.20
    cosine with fisher's channels, 0.39 with L1's). The steepness said nothing there: it is chosen again."""
    from edgeprune.score.allocate import rechoose_channels
    from edgeprune.score.importance import score_groups

    batches = [(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(8)), None)]
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    full = structure.full_widths()
    half = np.where(full > 8, np.maximum(8, full // 16 * 8), full)
    # The build's own scores rank the channels backwards: kept by them, the plan keeps the weakest half.
    backwards = [replace(g, scores=-g.scores) for g in r18_scored]
    widths = {0.0: full - 8 * (full > 8), UNIFORM_STEEPNESS: half}
    l2 = score_groups(r18, example, "l2")

    def make(steepness, channels):
        plan = plan_from_widths(backwards, widths[steepness], R18, tuple(example.shape), "m")
        return plan if channels == IMPORTANCE else rechoose_channels(plan, l2)

    cost = lambda plan: float(sum(structure.widths_of(plan)))  # noqa: E731
    choice = choose_steepness(r18, example, batches, make, tuple(widths), cost=cost, goal=1.0,
                              channels=(IMPORTANCE, "l2"))  # fmt: skip
    assert len(choice.over_goal) == 4 and choice.floor and choice.plans == 2
    assert (choice.chosen, choice.channels) == (UNIFORM_STEEPNESS, "l2")
    assert choice.losses[UNIFORM_STEEPNESS, "l2"] < choice.losses[UNIFORM_STEEPNESS, IMPORTANCE]
    assert choice.losses[0.0, IMPORTANCE] is None and choice.losses[0.0, "l2"] is None  # not the cheapest
    assert not choice.settled and "no plan reaches the goal" in choice.describe()
    assert "chosen again at the next" in choice.describe() and "steepness 0" not in choice.describe()
