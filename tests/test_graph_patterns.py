"""Graph patterns torch-pruning follows wrongly or not at all, and the workarounds that make them prune right
(edgeprune/graph/tp_compat.py, rewrite/prune.sync_split_widths): channel splits, tied channels, grouped convs.

Where it can, each test zeroes the removed channels in the original model and requires the pruned model to compute
the same: a rewrite that feeds a layer the wrong channels runs and exports fine, and only this sees it."""

from __future__ import annotations

import copy

import torch
from conftest import randomise_norms
from torch import nn

from edgeprune.graph.plan import GroupPlan, Plan
from edgeprune.rewrite.prune import apply_plan
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups


def test_mixnet_mixed_kernels_prune_and_run():
    """timm's MixedConv2d splits its input by a list attribute torch-pruning cannot see; after pruning, the list is
    set from the pruned convs (every pruned MixNet block failed with "split_with_sizes expects ..." before)."""
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.layers import MixedConv2d

    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          MixedConv2d(32, 32, kernel_size=[3, 5], depthwise=True), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 8, 1), nn.Flatten(), nn.LazyLinear(10)).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    model(x)  # materialises the lazy layer
    randomise_norms(model)
    plan = uniform_plan(score_groups(model, x, "magnitude"), 0.5, 4, "m", tuple(x.shape), "magnitude")
    pruned = apply_plan(model, plan, x)
    mixed = pruned[3]
    assert mixed.splits == [conv.in_channels for conv in mixed.values()] and sum(mixed.splits) == 16
    assert mixed.in_channels == mixed.out_channels == 16 and pruned(x).shape == (1, 10)


def test_ghostnet_tied_channels_are_cut_in_pairs():
    """GhostNet concatenates a conv's output with a depthwise conv of it, so channels i and i + C of the
    concatenation both come from the conv's channel i and can only go together. The scorer finds those pairs in
    torch-pruning's search; a plan keeps or drops whole pairs, and the pruned model runs (every residual group of
    ghostnet_100 pruned the conv to 0 channels before)."""
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.models.ghostnet import GhostBottleneck

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          GhostBottleneck(16, 32, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()  # fmt: skip
    randomise_norms(model)
    x = torch.randn(1, 3, 8, 8)
    scored = score_groups(model, x, "magnitude")
    residual = next(g for g in scored if g.module == "0")  # the stem's group holds the ghost module's output
    assert residual.tied == tuple((i, i + 8) for i in range(8))
    assert residual.per_set == (1, 2) and residual.step(2) == 4 and residual.step(8) == 16
    plan = uniform_plan(scored, 0.5, 2, "m", tuple(x.shape), "magnitude")
    kept = next(g.kept for g in plan.groups if g.module == "0")
    assert len(kept) == 8 and all((i + 8 in kept) == (i in kept) for i in range(8))
    pruned = apply_plan(model, plan, x)
    assert pruned[0].out_channels == 8 and pruned[3].ghost2.primary_conv[0].out_channels == 4
    assert pruned(x).shape == (1, 10)
    inner = next(g for g in scored if g.module == "3.ghost1.cheap_operation.0")
    assert inner.tied == () and inner.scores is not None  # its halves feed one conv's inputs: nothing meets there


def test_channel_splits_route_the_kept_channels():
    """Two mixed pointwise convs in a row (MixNet): each splits its input into slices, one conv per slice. Pruned
    channels are zeroed in the original first, so a pruned model that routes every kept channel to the right conv
    computes exactly what the zeroed original does. torch-pruning 1.6 gave each slice the other slice's offsets
    (consumers listed in reverse) and kept a split's unpruned offsets after a first cut; both sent channels to the
    wrong conv, which ran, silently wrong, whenever the slices were equal (edgeprune/graph/tp_compat.py)."""
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.layers import MixedConv2d

    torch.manual_seed(0)
    # Untrained norms in eval mode keep a zero channel zero (torch-pruning reads a concatenation's width off them).
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
                          MixedConv2d(16, 16, kernel_size=[1, 1]), nn.BatchNorm2d(16), nn.ReLU(),
                          MixedConv2d(16, 16, kernel_size=[1, 1]), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10)).eval()  # fmt: skip
    x = torch.randn(1, 3, 6, 6)
    scored = score_groups(model, x, "magnitude")
    assert {g.module for g in scored} == {"0", "2.0", "2.1", "5.0", "5.1"}
    plan = uniform_plan(scored, 0.5, 1, "m", tuple(x.shape), "magnitude")
    zeroed = copy.deepcopy(model)
    modules = dict(zeroed.named_modules())
    for group in plan.groups:
        removed = [i for i in range(group.channels) if i not in group.kept]
        with torch.no_grad():
            modules[group.module].weight[removed] = 0
    pruned = apply_plan(model, plan, x)
    assert sum(pruned[2].splits) == 8 and pruned[5].splits == [4, 4]  # the stem keeps its best 8, in any slice
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)


def test_equal_slices_are_not_silently_swapped():
    """The same split bug with equal slices ran without error: the stem loses 4 channels in each half, at other
    places in each, and torch-pruning's swapped offsets cut the first conv's inputs where the second half's were
    removed. The pruned model then differed from the zeroed original by 0.11 (torch-pruning 1.6 unpatched)."""
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.layers import MixedConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
                          MixedConv2d(16, 16, kernel_size=[1, 1]), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10)).eval()  # fmt: skip
    x = torch.randn(1, 3, 6, 6)
    kept = {"0": tuple(range(4, 12))}  # removes 0-3 of the first slice and 12-15 of the second
    groups = [GroupPlan(g.module, g.channels, kept.get(g.module, tuple(range(g.channels))))
              for g in score_groups(model, x, "magnitude")]  # fmt: skip
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed[0].weight[[0, 1, 2, 3, 12, 13, 14, 15]] = 0
    pruned = apply_plan(model, Plan("m", tuple(x.shape), "manual", 0.0, tuple(groups)), x)
    assert pruned[2].splits == [4, 4]
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)


def test_grouped_convolutions_lose_the_same_positions_in_every_group():
    """A grouped, not depthwise, convolution (ResNeXt, RegNet) is cut safely when each of its groups loses the
    same positions: torch-pruning slices its inputs by the first group's kept positions. Channels at one position
    of every group are tied, so a plan keeps or drops them together; the pruned model computes what the original
    does with the removed channels zeroed (such groups were kept whole before: 26 of regnetx_002's 31)."""

    def unit(cin: int, cout: int, groups: int = 1, kernel: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]  # fmt: skip

    torch.manual_seed(0)
    model = nn.Sequential(*unit(3, 16, kernel=3), *unit(16, 16), *unit(16, 16, groups=4, kernel=3), *unit(16, 16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()  # fmt: skip
    x = torch.randn(1, 3, 6, 6)
    scored = {g.module: g for g in score_groups(model, x, "magnitude")}
    assert scored["3"].tied == tuple((j, j + 4, j + 8, j + 12) for j in range(4))  # into the grouped conv
    assert scored["6"].tied == scored["3"].tied and scored["0"].tied == ()  # out of it; the stem is untied
    assert scored["3"].step(8) == 8  # 2 positions of each of its 4 groups
    plan = uniform_plan(list(scored.values()), 0.5, 1, "m", tuple(x.shape), "magnitude")
    zeroed = copy.deepcopy(model)
    modules = dict(zeroed.named_modules())
    for group in plan.groups:
        with torch.no_grad():
            modules[group.module].weight[[i for i in range(group.channels) if i not in group.kept]] = 0
    pruned = apply_plan(model, plan, x)
    assert pruned[6].groups == 4 and tuple(pruned[6].weight.shape) == (8, 2, 3, 3)
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)
