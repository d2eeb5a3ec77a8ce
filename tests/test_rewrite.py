"""Stage 3: the plan, the physical rewrite with torch-pruning, MAC counting and recovery (batch-norm
recalibration, distillation, quality)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import MBV3, R18, SHAPE, Tiny, TinyDeeper, assert_same_state, load_seeded, randomise_norms, snapshot, tiny  # noqa: F401
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.graph.groups import build_graph, prunable_groups
from edgeprune.graph.plan import PLAN_VERSION, GroupPlan, Plan
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.rewrite.recover import IterateAverage, distill, recalibrate_batchnorm
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups

# ---------------------------------------------------------------------------------------------------- apply_plan


@pytest.mark.slow
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
    model = tiny()
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
    model = tiny()
    before = snapshot(model)
    x = torch.randn(1, 3, 16, 16)
    scored = score_groups(model, x, "magnitude")
    plan = uniform_plan(scored, 0.5, 8, "tiny", (1, 3, 16, 16), "magnitude")
    pruned = apply_plan(model, plan, x)
    assert pruned is not model
    assert_same_state(before, model.state_dict())
    assert model.pw.out_channels == 32 and pruned.pw.out_channels == 16
    same = apply_plan(model, plan, x, inplace=True)
    assert same is model and model.pw.out_channels == 16
    assert_same_state(pruned.state_dict(), model.state_dict())


def test_plan_replays_from_json_weight_for_weight(r18_plan, r18_pruned, example, tmp_path):
    text = json.dumps(r18_plan.to_dict())
    replayed_plan = Plan.from_dict(json.loads(text))
    assert replayed_plan == r18_plan
    r18_plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == r18_plan
    fresh = load_seeded(R18)  # a fresh load of the original, as a replay would do
    replayed = apply_plan(fresh, replayed_plan, example)
    assert_same_state(snapshot(r18_pruned), snapshot(replayed))
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
        apply_plan(tiny(), partial, torch.zeros(1, 3, 16, 16))
    # Every group named, but one with another width: the plan was made for another model.
    x = torch.zeros(1, 3, 16, 16)
    full = uniform_plan(score_groups(tiny(), x, "magnitude"), 0.5, 8, "tiny", (1, 3, 16, 16), "magnitude")
    first = full.groups[0]
    wider = GroupPlan(first.module, first.channels * 4, first.kept)
    altered = Plan(full.model, full.input_shape, full.method, full.ratio, (wider, *full.groups[1:]))
    with pytest.raises(BadInput) as info:
        apply_plan(tiny(), altered, x)
    message = str(info.value)
    assert "\n" not in message and f"{first.channels * 4} channels" in message and f"'{first.module}'" in message


def test_plan_for_a_deeper_model_with_the_same_names_is_bad_input():
    x = torch.zeros(1, 3, 16, 16)
    plan = uniform_plan(score_groups(tiny(), x, "magnitude"), 0.5, 8, "tiny", (1, 3, 16, 16), "magnitude")
    torch.manual_seed(0)
    deeper = randomise_norms(TinyDeeper())
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
    teacher = tiny(seed=0)
    student = tiny(seed=1)
    teacher_state = snapshot(teacher)
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), None) for _ in range(2)]
    runs = []
    hook = teacher.register_forward_hook(lambda module, args, out: runs.append(1))
    losses = distill(student, teacher, batches, steps=30, lr=1e-2)
    hook.remove()
    assert len(runs) == 2  # the teacher's outputs on each batch, once for all 15 passes (8 px: no shifted copies)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert losses[0] > 0
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert not student.training and not teacher.training
    assert_same_state(teacher_state, teacher.state_dict())
    assert distill(student, teacher, batches, steps=0) == []
    assert distill(student, teacher, [], steps=5) == []


def test_distill_that_never_beats_its_start_gives_back_the_start():
    # A student that already matches its teacher (as a least-squares refit can leave it) and steps large enough to
    # undo it: held-out fidelity never beats the start, so the starting weights must come back, not the last ones.
    teacher = tiny(seed=0)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(7)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 4, (4,), generator=generator))]
    held_out = [(torch.randn(8, 3, 8, 8, generator=generator), None)]
    losses = distill(student, teacher, batches, steps=20, lr=1.0, held_out=held_out, patience=2)
    assert 0 < len(losses) < 20  # it stopped early
    assert_same_state(teacher.state_dict(), student.state_dict())


def test_iterate_average_is_the_mean_of_the_start_and_every_step():
    teacher, student = tiny(seed=0), tiny(seed=1)
    generator = torch.Generator().manual_seed(9)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), None) for _ in range(2)]
    seen = [snapshot(student)]

    class Recording(IterateAverage):
        def add(self, model):
            seen.append(snapshot(model))
            super().add(model)

    average = Recording(student)
    distill(student, teacher, batches, steps=5, lr=1e-2, average=average)
    assert average.count == 6 and len(seen) == 6
    averaged = average.applied_to(student)
    for name, p in averaged.named_parameters():
        expected = torch.stack([state[name] for state in seen]).mean(0)
        torch.testing.assert_close(p.detach(), expected)
        assert not torch.equal(p, dict(student.named_parameters())[name])  # the student keeps its last weights
    for name, buffer in averaged.named_buffers():  # batch-norm statistics are copied, not averaged
        assert torch.equal(buffer, dict(student.named_buffers())[name])


def test_models_that_cache_tensors_derived_from_parameters_copy():
    """timm's LeViT attention (as EfficientFormer's and TinyViT's) caches, in eval mode, its attention biases gathered
    from a parameter: a tensor with a grad history, which deepcopy refuses. Every group of levit_128s,
    efficientformer_l1 and tiny_vit_5m_224 failed to prune for it in the sweep. The copy drops the cache, and the
    copy's forward fills its own again with the same result."""
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()  # before timm is imported: it imports torchvision
    from timm.models.levit import Attention

    from edgeprune.graph.modules import copy_model

    attention = Attention(dim=16, key_dim=4, num_heads=2, resolution=3)
    attention.eval()  # (its train() returns None)
    x = torch.randn(1, 9, 16)
    expected = attention(x)  # in eval mode this fills attention.attention_bias_cache
    assert attention.attention_bias_cache, "timm no longer caches: this test no longer tests anything"
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(attention)
    copied = copy_model(attention)
    assert torch.allclose(copied(x), expected) and copied.attention_bias_cache
    assert copied.attention_biases is not attention.attention_biases


def test_an_averaged_copy_does_not_run_on_the_last_weights_cached_biases():
    """LeViT-style attention caches its biases in eval mode; filled under no_grad they copy fine, so the mean of a
    recovery's weights must not run on the biases the last weights left in that cache."""
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.models.levit import Attention

    attention = Attention(dim=16, key_dim=4, num_heads=2, resolution=3)
    attention.eval()
    average = IterateAverage(attention)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in attention.parameters():  # not by a constant: a softmax does not see one added to every bias
            p.add_(torch.randn(p.shape, generator=generator))
    average.add(attention)
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        attention(x)  # the cache now holds the last weights' biases
    assert attention.attention_bias_cache, "timm no longer caches: this test no longer tests anything"
    averaged = average.applied_to(attention)
    expected = Attention(dim=16, key_dim=4, num_heads=2, resolution=3)
    expected.load_state_dict({name: average.mean.get(name, value) for name, value in attention.state_dict().items()})
    expected.eval()
    with torch.no_grad():
        assert torch.allclose(averaged(x), expected(x), atol=1e-6)
        assert not torch.allclose(averaged(x), attention(x), atol=1e-3)
