"""Stages 2 and 3: importance scores per dependency group, widths under the channel multiple, the plan, the physical
rewrite with torch-pruning, MAC counting and recovery (batch-norm recalibration, distillation, quality)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.errors import BadInput
from edgeprune.model import load_model
from edgeprune.rewrite.plan import PLAN_VERSION, GroupPlan, Plan
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.rewrite.recover import distill, quality, recalibrate_batchnorm
from edgeprune.score.allocate import MAX_RATIO, kept_width, uniform_plan
from edgeprune.score.importance import build_graph, output_layers, prunable_groups, score_groups

SHAPE = (1, 3, 64, 64)
R18 = "timm:resnet18"
MBV3 = "timm:mobilenetv3_small_100"


class Tiny(nn.Module):
    """A stem, an inverted-residual block (pointwise, depthwise, pointwise) with a residual add, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pwl = nn.Conv2d(32, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.pw(x)))
        y = F.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.pwl(y))
        return self.head(x.mean((2, 3)))


class TinyDeeper(Tiny):
    """Tiny with a second inverted-residual block: the same module names as Tiny, and one more group."""

    def __init__(self) -> None:
        super().__init__()
        self.pw2 = nn.Conv2d(16, 24, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(24)
        self.dw2 = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn5 = nn.BatchNorm2d(24)
        self.pwl2 = nn.Conv2d(24, 16, 1, bias=False)
        self.bn6 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.pw(x)))
        x = x + self.bn3(self.pwl(F.relu(self.bn2(self.dw(y)))))
        y = F.relu(self.bn4(self.pw2(x)))
        x = x + self.bn6(self.pwl2(F.relu(self.bn5(self.dw2(y)))))
        return self.head(x.mean((2, 3)))


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and statistics, as a trained model has them, and eval mode.

    timm initialises the last BN of every residual block with weight 0, which makes every gradient inside the block,
    and so its Taylor scores, zero; trained weights never look like that.
    """
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return _randomise_norms(Tiny())


def _load(spec: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # timm builds with random weights: a seed makes two loads of one spec the same model
    return _randomise_norms(load_model(spec, input_shape=SHAPE).module)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    return _load(R18)


@pytest.fixture(scope="module")
def mbv3() -> nn.Module:
    return _load(MBV3)


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def r18_scored(r18, example):
    return score_groups(r18, example, "magnitude")


@pytest.fixture(scope="module")
def mbv3_scored(mbv3, example):
    return score_groups(mbv3, example, "magnitude")


@pytest.fixture(scope="module")
def r18_plan(r18_scored) -> Plan:
    return uniform_plan(r18_scored, 0.5, 8, R18, SHAPE, "magnitude")


@pytest.fixture(scope="module")
def r18_pruned(r18, r18_plan, example) -> nn.Module:
    return apply_plan(r18, r18_plan, example)


# ---------------------------------------------------------------------------------------------------- score_groups


@pytest.mark.parametrize("spec", [R18, MBV3])
def test_magnitude_scores_one_group_per_prunable_group(spec, r18, mbv3, r18_scored, mbv3_scored, example):
    model, scored = (r18, r18_scored) if spec == R18 else (mbv3, mbv3_scored)
    groups = prunable_groups(model, build_graph(model, example))
    assert len(scored) == len(groups) > 0
    assert [s.module for s in scored] == [name for name, _ in groups]
    assert len({s.module for s in scored}) == len(scored)  # every group once
    modules = dict(model.named_modules())
    for s in scored:
        assert s.scores.shape == (s.channels,)
        assert torch.isfinite(s.scores).all()
        assert (s.scores >= 0).all() and s.scores.sum() > 0
        root = modules[s.module]
        assert s.channels == (root.out_channels if isinstance(root, nn.Conv2d) else root.out_features)
    assert [s.module for s in score_groups(_tiny(), torch.zeros(1, 3, 16, 16), "magnitude")] == ["pwl", "dw"]


def test_output_layer_is_never_a_group(r18, mbv3, r18_scored, mbv3_scored, example):
    for model, scored, head in ((r18, r18_scored, "fc"), (mbv3, mbv3_scored, "classifier")):
        graph = build_graph(model, example)
        names = {m: n for n, m in model.named_modules()}
        assert [names[m] for m in output_layers(graph)] == [head]
        assert head not in {s.module for s in scored}
        # The head's input layer is prunable, its output is not: the pruned model keeps the logits' shape.
        pruned = apply_plan(model, uniform_plan(scored, MAX_RATIO, 8, "m", SHAPE, "magnitude"), example)
        assert getattr(pruned, head).out_features == 1000
        assert getattr(pruned, head).in_features < getattr(model, head).in_features
        with torch.no_grad():
            assert pruned(example).shape == (1, 1000)


def test_taylor_with_and_without_labels(r18, example):
    before = _snapshot(r18)
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    with_labels = score_groups(r18, example, "taylor", [(x, torch.tensor([3, 7]))])
    without = score_groups(r18, example, "taylor", [(x, None)])
    magnitude = score_groups(r18, example, "magnitude")
    assert [s.module for s in with_labels] == [s.module for s in without] == [s.module for s in magnitude]
    for a, b in zip(with_labels, without, strict=True):
        assert a.scores.shape == b.scores.shape == (a.channels,)
        assert torch.isfinite(a.scores).all() and torch.isfinite(b.scores).all()
        assert a.scores.abs().sum() > 0 and b.scores.abs().sum() > 0  # a gradient reached every group
    # Labels and pseudo-labels are different losses, and both differ from the weight-only magnitude.
    assert any(not torch.allclose(a.scores, b.scores) for a, b in zip(with_labels, without, strict=True))
    assert any(not torch.allclose(a.scores, m.scores) for a, m in zip(with_labels, magnitude, strict=True))
    assert all(p.grad is None for p in r18.parameters())  # gradients cleared
    _assert_same_state(before, r18.state_dict())


def test_score_groups_rejects_bad_method_and_taylor_without_data():
    model, x = _tiny(), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown importance method"):
        score_groups(model, x, "random")
    with pytest.raises(ValueError, match="at least one batch"):
        score_groups(model, x, "taylor", [])


def test_magnitude_ranks_a_heavy_channel_first():
    model, x = _tiny(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model.pw.weight[5] *= 1000.0  # channel 5 of the pointwise/depthwise group
        model.stem.weight[11] *= 1000.0  # channel 11 of the residual group
    scored = {s.module: s for s in score_groups(model, x, "magnitude")}
    assert {name: s.channels for name, s in scored.items()} == {"pwl": 16, "dw": 32}
    assert int(scored["dw"].scores.argmax()) == 5
    assert int(scored["pwl"].scores.argmax()) == 11


# ---------------------------------------------------------------------------------------------------- kept_width


@pytest.mark.parametrize(
    ("channels", "ratio", "multiple", "expected"),
    [
        (64, 0.5, 8, 32),
        (64, 0.0, 8, 64),
        (100, 0.5, 8, 48),  # 50 rounds to the nearest multiple, 48
        (96, 0.3, 16, 64),  # 67.2 -> 64
        (512, 0.9, 8, 56),  # 51.2 rounds to 48, under the 10% floor 51.2 -> 56
        (1000, 0.9, 8, 104),  # floor: 10% (100) rounded up to a multiple
        (64, 0.9, 8, 8),  # floor: one multiple
        (64, 0.95, 8, 8),
        (12, 0.5, 8, 8),
        (12, 0.0, 8, 12),  # 12 rounds to 16, capped at the original
        (8, 0.9, 8, 8),  # not wider than one multiple: kept whole
        (6, 0.5, 8, 6),
        (100, 0.9, 1, 10),
        (10, 0.9, 1, 1),
    ],
)
def test_kept_width_exact_values(channels, ratio, multiple, expected):
    assert kept_width(channels, ratio, multiple) == expected


def test_kept_width_invariants():
    for multiple in (1, 4, 8, 16):
        for channels in range(1, 200):
            widths = [kept_width(channels, r / 20, multiple) for r in range(0, 19)]  # ratios 0 .. 0.9
            for ratio, width in zip((r / 20 for r in range(19)), widths, strict=True):
                where = (channels, ratio, multiple)
                assert 1 <= width <= channels, where
                if channels <= multiple:
                    assert width == channels, where
                    continue
                assert width % multiple == 0 or width == channels, where
                assert width >= multiple, where
                assert width >= math.ceil(channels * 0.1 - 1e-9), where
                wanted = channels * (1 - ratio)
                # within half a multiple of the wanted width, unless the floor or the cap moved it
                floor = max(multiple, math.ceil(channels * (1 - MAX_RATIO) / multiple) * multiple)
                assert abs(width - wanted) <= multiple / 2 + 1e-9 or width in (floor, channels), where
            assert widths == sorted(widths, reverse=True), (channels, multiple)  # more pruning never keeps more


def test_ratio_zero_keeps_every_channel():
    assert kept_width(100, 0.0, 8) == 100
    assert kept_width(130, 0.0, 8) == 130
    scored = [_scored("a", [float(i) for i in range(100)])]
    assert uniform_plan(scored, 0.0, 8, "m", SHAPE, "magnitude").pruned_channels == 0


# ---------------------------------------------------------------------------------------------------- uniform_plan


def _scored(name: str, scores: list[float]):
    from edgeprune.score.importance import ScoredGroup

    return ScoredGroup(module=name, channels=len(scores), scores=torch.tensor(scores))


def test_uniform_plan_keeps_the_top_scores_sorted():
    a = _scored("a", [0.5, 9.0, 0.1, 7.0, 3.0, 8.0, 0.2, 6.0, 0.3, 5.0, 0.4, 4.0, 0.0, 2.0, 1.0, 0.6])
    b = _scored("b", [float(v) for v in range(32, 0, -1)])  # descending: the first channels are the best
    c = _scored("c", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # narrower than the multiple: kept whole
    plan = uniform_plan([a, b, c], 0.5, 8, "spec", SHAPE, "taylor")
    assert (plan.model, plan.input_shape, plan.method, plan.ratio) == ("spec", SHAPE, "taylor", 0.5)
    kept = {g.module: g for g in plan.groups}
    assert kept["a"].kept == (1, 3, 4, 5, 7, 9, 11, 13)  # the scores 9, 7, 3, 8, 6, 5, 4, 2
    assert kept["b"].kept == tuple(range(16))
    assert kept["c"].kept == tuple(range(6))
    for group, scored in zip(plan.groups, (a, b, c), strict=True):
        assert group.channels == scored.channels
        assert group.width == kept_width(scored.channels, 0.5, 8)
        assert list(group.kept) == sorted(group.kept)
        dropped = [i for i in range(scored.channels) if i not in group.kept]
        if dropped:
            assert scored.scores[list(group.kept)].min() >= scored.scores[dropped].max()
    assert plan.pruned_channels == 8 + 16 + 0
    assert plan.widths() == {"a": (16, 8), "b": (32, 16), "c": (6, 6)}


def test_uniform_plan_ties_keep_the_lower_index_and_ratio_is_checked():
    tied = _scored("t", [1.0] * 16)
    plan = uniform_plan([tied], 0.5, 8, "m", SHAPE, "magnitude")
    assert plan.groups[0].kept == tuple(range(8))
    for bad in (-0.1, MAX_RATIO + 0.01, 1.0):
        with pytest.raises(ValueError, match="ratio"):
            uniform_plan([tied], bad, 8, "m", SHAPE, "magnitude")


# ---------------------------------------------------------------------------------------------------- apply_plan


def test_apply_plan_makes_a_physically_smaller_model(r18, r18_plan, r18_pruned, example):
    _, params = count_macs_params(r18, example)
    _, pruned_params = count_macs_params(r18_pruned, example)
    assert pruned_params < 0.5 * params
    assert sum(p.numel() for p in r18_pruned.parameters()) == pruned_params
    modules = dict(r18_pruned.named_modules())
    for group in r18_plan.groups:
        assert group.width < group.channels
        assert modules[group.module].weight.shape[0] == group.width
        assert modules[group.module].out_channels == group.width
    for name, module in modules.items():  # every BN follows its conv
        if isinstance(module, nn.BatchNorm2d):
            conv = modules[name.replace("bn", "conv")] if "bn" in name else modules[name[:-1] + "0"]
            assert module.num_features == conv.out_channels == module.running_mean.shape[0], name
    with torch.no_grad():
        assert r18_pruned(example).shape == (1, 1000)


def test_apply_plan_slices_weights_by_the_kept_indices(r18, r18_plan, r18_pruned):
    kept = {g.module: list(g.kept) for g in r18_plan.groups}
    # conv1 roots the residual stream of layer1; its input is the image, so its weight is sliced on outputs only.
    assert torch.equal(r18_pruned.conv1.weight, r18.conv1.weight[kept["conv1"]])
    for buffer in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(r18_pruned.bn1, buffer), getattr(r18.bn1, buffer)[kept["conv1"]])
    # The classifier reads layer4's residual stream (rooted at layer4.0.downsample.0): its inputs are cut to match.
    assert torch.equal(r18_pruned.fc.weight, r18.fc.weight[:, kept["layer4.0.downsample.0"]])
    assert torch.equal(r18_pruned.fc.bias, r18.fc.bias)
    # A conv inside a block: outputs by its own group, inputs by the residual stream that feeds it.
    expected = r18.layer2[1].conv1.weight[kept["layer2.1.conv1"]][:, kept["layer2.0.downsample.0"]]
    assert torch.equal(r18_pruned.layer2[1].conv1.weight, expected)


def test_apply_plan_indices_reach_coupled_layers_mobilenet(mbv3, mbv3_scored, example):
    plan = uniform_plan(mbv3_scored, 0.5, 8, MBV3, SHAPE, "magnitude")
    pruned = apply_plan(mbv3, plan, example)
    # conv_stem is coupled (through a depthwise conv and an SE multiply) to a group rooted elsewhere: find that group
    # in torch-pruning's graph, and check that its kept indices were applied to conv_stem too.
    graph = build_graph(mbv3, example)
    holding = [name for name, group in prunable_groups(mbv3, graph) if any(d.target.module is mbv3.conv_stem
               for d, _ in group)]  # fmt: skip
    assert len(holding) == 1 and holding[0] != "conv_stem"
    kept = {g.module: list(g.kept) for g in plan.groups}[holding[0]]
    assert pruned.conv_stem.out_channels == len(kept) < mbv3.conv_stem.out_channels
    assert torch.equal(pruned.conv_stem.weight, mbv3.conv_stem.weight[kept])
    assert torch.equal(pruned.bn1.running_var, mbv3.bn1.running_var[kept])
    dw = pruned.blocks[0][0].conv_dw
    assert dw.groups == dw.in_channels == dw.out_channels == len(kept)
    assert torch.equal(dw.weight, mbv3.blocks[0][0].conv_dw.weight[kept])
    with torch.no_grad():
        assert pruned(example).shape == (1, 1000)
    assert count_macs_params(pruned, example)[1] < count_macs_params(mbv3, example)[1]


@pytest.mark.parametrize("reverse", [False, True])
def test_pruning_dead_channels_keeps_the_function(reverse):
    """Channels whose every BN is zeroed contribute nothing: removing them must not change the output at all.

    Checks that the kept indices land on the same channels in every coupled layer (residual add, depthwise conv,
    the next layer's inputs, the classifier), whichever order the groups are applied in.
    """
    model = _tiny()
    kept_res = [0, 2, 3, 5, 8, 9, 12, 15]
    kept_dw = [1, 2, 4, 7, 10, 11, 13, 16, 17, 20, 21, 25, 26, 28, 30, 31]
    with torch.no_grad():
        for c in set(range(16)) - set(kept_res):
            for bn in (model.bn0, model.bn3):
                bn.weight[c] = 0.0
                bn.bias[c] = 0.0
        for c in set(range(32)) - set(kept_dw):
            for bn in (model.bn1, model.bn2):
                bn.weight[c] = 0.0
                bn.bias[c] = 0.0
    groups = [GroupPlan("pwl", 16, tuple(kept_res)), GroupPlan("dw", 32, tuple(kept_dw))]
    plan = Plan("tiny", (1, 3, 16, 16), "magnitude", 0.5, tuple(reversed(groups) if reverse else groups))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    pruned = apply_plan(model, plan, x[:1])
    assert (pruned.stem.out_channels, pruned.pw.in_channels, pruned.head.in_features) == (8, 8, 8)
    assert (pruned.pw.out_channels, pruned.dw.groups, pruned.pwl.in_channels) == (16, 16, 16)
    with torch.no_grad():
        reference = model(x)
        assert reference.abs().max() > 0.1
        torch.testing.assert_close(pruned(x), reference, rtol=1e-5, atol=1e-5)


def test_apply_plan_copies_and_inplace_does_not(example):
    model = _tiny()
    before = _snapshot(model)
    x = torch.randn(1, 3, 16, 16)
    scored = score_groups(model, x, "magnitude")
    plan = uniform_plan(scored, 0.5, 8, "tiny", (1, 3, 16, 16), "magnitude")
    pruned = apply_plan(model, plan, x)
    assert pruned is not model
    _assert_same_state(before, model.state_dict())
    assert model.pw.out_channels == 32 and pruned.pw.out_channels == 16
    same = apply_plan(model, plan, x, inplace=True)
    assert same is model and model.pw.out_channels == 16
    _assert_same_state(pruned.state_dict(), model.state_dict())


def test_plan_replays_from_json_weight_for_weight(r18_plan, r18_pruned, example, tmp_path):
    text = json.dumps(r18_plan.to_dict())
    replayed_plan = Plan.from_dict(json.loads(text))
    assert replayed_plan == r18_plan
    r18_plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == r18_plan
    fresh = _load(R18)  # a fresh load of the original, as a replay would do
    replayed = apply_plan(fresh, replayed_plan, example)
    _assert_same_state(_snapshot(r18_pruned), _snapshot(replayed))
    with torch.no_grad():
        assert torch.equal(replayed(example), r18_pruned(example))


def test_plan_for_another_model_is_bad_input(r18_plan, mbv3, example):
    with pytest.raises(BadInput) as info:
        apply_plan(mbv3, r18_plan, example)
    message = str(info.value)
    assert "\n" not in message and "does not fit this model" in message and "another model" in message
    # A plan that names only some of the model's groups is refused too: it would prune the model in part.
    partial = Plan("tiny", (1, 3, 16, 16), "magnitude", 0.5, (GroupPlan("stem", 8, tuple(range(4))),))
    with pytest.raises(BadInput, match="not in the plan"):
        apply_plan(_tiny(), partial, torch.zeros(1, 3, 16, 16))
    # Every group named, but one with another width: the plan was made for another model.
    x = torch.zeros(1, 3, 16, 16)
    full = uniform_plan(score_groups(_tiny(), x, "magnitude"), 0.5, 8, "tiny", (1, 3, 16, 16), "magnitude")
    first = full.groups[0]
    wider = GroupPlan(first.module, first.channels * 4, first.kept)
    altered = Plan(full.model, full.input_shape, full.method, full.ratio, (wider, *full.groups[1:]))
    with pytest.raises(BadInput) as info:
        apply_plan(_tiny(), altered, x)
    message = str(info.value)
    assert "\n" not in message and f"{first.channels * 4} channels" in message and f"'{first.module}'" in message


def test_plan_for_a_deeper_model_with_the_same_names_is_bad_input():
    x = torch.zeros(1, 3, 16, 16)
    plan = uniform_plan(score_groups(_tiny(), x, "magnitude"), 0.5, 8, "tiny", (1, 3, 16, 16), "magnitude")
    torch.manual_seed(0)
    deeper = _randomise_norms(TinyDeeper())
    assert len(score_groups(deeper, x, "magnitude")) == 3 > len(plan.groups) == 2  # dw2's group is not in the plan
    with pytest.raises(BadInput):
        apply_plan(deeper, plan, x)


def _good_plan_dict() -> dict:
    return Plan("m", (1, 3, 8, 8), "magnitude", 0.5, (GroupPlan("conv", 8, (0, 2, 5)),)).to_dict()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["groups"][0].update(kept=[2, 0, 5]),  # unsorted
        lambda d: d["groups"][0].update(kept=[0, 2, 2]),  # duplicated
        lambda d: d["groups"][0].update(kept=[0, 2, 8]),  # out of range
        lambda d: d["groups"][0].update(kept=[-1, 2]),  # negative
        lambda d: d["groups"][0].update(kept=[]),  # empty
        lambda d: d.update(version=PLAN_VERSION + 1),
        lambda d: d.pop("version"),
        lambda d: d.pop("groups"),
        lambda d: d.update(groups=None),
        lambda d: d["groups"][0].pop("module"),
        lambda d: d.update(input_shape="1,3,8,8"),
        lambda d: d.update(ratio="half"),
    ],
)
def test_plan_from_dict_rejects_malformed_plans(change):
    data = _good_plan_dict()
    assert Plan.from_dict(copy.deepcopy(data)).groups[0].kept == (0, 2, 5)
    change(data)
    with pytest.raises(BadInput) as info:
        Plan.from_dict(data)
    assert "\n" not in str(info.value) and str(info.value).startswith("plan is malformed")


def test_plan_load_unreadable_file_is_bad_input(tmp_path):
    for name, text in (("missing.json", None), ("broken.json", "{not json")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(BadInput) as info:
            Plan.load(path)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_plan_load_of_a_json_list_is_bad_input(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("[1, 2, 3]\n")
    with pytest.raises(BadInput):
        Plan.load(path)


# ---------------------------------------------------------------------------------------------------- count_macs_params


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 8x16x16 outputs x 27 MACs each
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # 8x16x16 outputs x 9 MACs each
        self.fc = nn.Linear(8, 10)  # 10 outputs x 8 MACs each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(self.conv(x)).mean((2, 3)))


def test_count_macs_params_exact_on_a_tiny_model():
    model = ConvLinear().eval()
    macs, params = count_macs_params(model, torch.zeros(1, 3, 16, 16))
    assert macs == 8 * 16 * 16 * 27 + 8 * 16 * 16 * 9 + 10 * 8 == 73808
    assert params == (8 * 27 + 8) + 8 * 9 + (8 * 10 + 10) == 386
    assert count_macs_params(model, torch.zeros(4, 3, 16, 16)) == (macs, params)  # per sample
    assert count_macs_params(model, torch.zeros(1, 3, 8, 8))[0] == 8 * 8 * 8 * 36 + 80
    assert not model._forward_hooks and not model.conv._forward_hooks  # hooks removed


def test_macs_of_a_pruned_model_drop(r18, r18_pruned, example):
    macs, params = count_macs_params(r18, example)
    pruned_macs, pruned_params = count_macs_params(r18_pruned, example)
    assert 0 < pruned_macs < 0.5 * macs
    assert 0 < pruned_params < params
    assert params == sum(p.numel() for p in r18.parameters())
    # resnet18 at 64x64: 1.82 GMACs at 224x224 scale by (64/224)^2, give or take the stem's rounding
    assert 140e6 < macs < 160e6


# ---------------------------------------------------------------------------------------------------- recovery


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_recalibrate_batchnorm_sets_the_datas_statistics():
    model = ConvBN()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1))
        model.conv.bias.copy_(torch.tensor([0.5, 0.0]))
        model.bn.running_mean.fill_(100.0)  # stale statistics that must be replaced, not averaged with
        model.bn.running_var.fill_(50.0)
    model.eval()
    generator = torch.Generator().manual_seed(4)
    batches = [(3.0 + torch.randn(8, 1, 8, 8, generator=generator), None) for _ in range(5)]
    assert recalibrate_batchnorm(model, batches) == 1
    assert not model.training
    with torch.no_grad():
        outputs = [model.conv(x) for x, _ in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).reshape(2, -1).var(1, unbiased=True) for o in outputs]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, variances, rtol=1e-4, atol=1e-4)
    # and they are the conv's output statistics: mean 2*3+0.5 and -3, variance 4 and 1
    torch.testing.assert_close(model.bn.running_mean, torch.tensor([6.5, -3.0]), rtol=0, atol=0.1)
    torch.testing.assert_close(model.bn.running_var, torch.tensor([4.0, 1.0]), rtol=0.1, atol=0)
    # In eval mode the recalibrated BN now normalises this data to about zero mean and unit variance.
    with torch.no_grad():
        out = torch.cat([model(x) for x, _ in batches])
    assert out.mean((0, 2, 3)).abs().max() < 0.05
    assert (out.var((0, 2, 3)) - 1).abs().max() < 0.05
    assert recalibrate_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1)), batches) == 0


def test_distill_reduces_the_loss():
    teacher = _tiny(seed=0)
    student = _tiny(seed=1)
    teacher_state = _snapshot(teacher)
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), None) for _ in range(2)]
    losses = distill(student, teacher, batches, steps=30, lr=1e-2)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert losses[0] > 0
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert not student.training and not teacher.training
    _assert_same_state(teacher_state, teacher.state_dict())
    assert distill(student, teacher, batches, steps=0) == []
    assert distill(student, teacher, [], steps=5) == []


def test_quality_accuracy_with_labels_fidelity_without():
    model, other = _tiny(seed=0), _tiny(seed=2)
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        predicted, reference = model(x).argmax(1), other(x).argmax(1)
    labels = predicted.clone()
    labels[:3] = (labels[:3] + 1) % 10  # 9 of 12 right
    metric, value = quality(model, other, [(x[:6], labels[:6]), (x[6:], labels[6:])])
    assert (metric, value) == ("accuracy", 9 / 12)
    metric, value = quality(model, other, [(x[:6], None), (x[6:], None)])
    assert metric == "fidelity"
    assert value == pytest.approx(float((predicted == reference).float().mean()))
    assert quality(model, model, [(x, None)]) == ("fidelity", 1.0)
    metric, value = quality(model, other, [])
    assert metric == "fidelity" and math.isnan(value)
