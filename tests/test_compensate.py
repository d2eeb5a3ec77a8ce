"""Closed-form least-squares compensation: pruned layers refitted to the unpruned model's outputs, no gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyDeeper
from torch import nn

from edgeprune.rewrite.compensate import compensate
from edgeprune.rewrite.prune import apply_plan
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups

SHAPE = (1, 3, 16, 16)


def _trained_looking(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _relative_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((a(x) - b(x)) ** 2).sum() / (b(x) ** 2).sum()) ** 0.5


def test_compensation_brings_the_pruned_outputs_back_and_keeps_the_structure():
    model = _trained_looking(TinyDeeper())
    example = torch.zeros(SHAPE)
    plan = uniform_plan(score_groups(model, example, "magnitude"), 0.5, 4, "tiny", SHAPE, "magnitude")
    pruned = apply_plan(model, plan, example)
    compensated = apply_plan(model, plan, example)
    # The record of kept channels matches the pruned shapes: pw2 keeps 8 of 16 inputs and 12 of 24 outputs.
    kept = compensated.edgeprune_kept
    assert len(kept["pw2"]["in"]) == compensated.pw2.in_channels and len(kept["pw2"]["out"]) == 12
    torch.manual_seed(1)
    calibration, held_out = torch.randn(64, *SHAPE[1:]), torch.randn(32, *SHAPE[1:])
    shapes = {k: v.shape for k, v in compensated.state_dict().items()}
    report = compensate(model, compensated, [calibration[i : i + 16] for i in range(0, 64, 16)])
    assert {"pw", "pwl", "head", "pw2", "pwl2"} <= set(report)  # every dense layer whose inputs were cut
    assert "dw" not in report  # depthwise: left as it is
    assert {k: v.shape for k, v in compensated.state_dict().items()} == shapes  # same parameters: plans replay
    before, after = _relative_error(pruned, model, held_out), _relative_error(compensated, model, held_out)
    assert after < 0.5 * before, (before, after)  # on images it was not fitted on


class SamePadConv(nn.Conv2d):
    """Pads inside forward, as EfficientNet's and timm's same-padding convs do: at 1×1 and stride 1 it pads nothing."""

    def forward(self, x):
        k = self.kernel_size[0] - 1
        return super().forward(nn.functional.pad(x, (k // 2, k - k // 2, k // 2, k - k // 2)))


class StandardisedConv(nn.Conv2d):
    """Normalises its weights in forward (weight standardisation): what it multiplies is not its weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pointwise = SamePadConv(16, 16, 1)
        self.spatial = SamePadConv(16, 16, 3)
        self.standardised = StandardisedConv(16, 16, 1)
        self.head = nn.Conv2d(48, 8, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([self.pointwise(x), self.spatial(x), self.standardised(x)], 1))


def test_a_conv_subclass_is_refitted_only_where_it_computes_a_plain_conv():
    torch.manual_seed(0)
    model = Subclassed().eval()
    example = torch.zeros(SHAPE)
    plan = uniform_plan(score_groups(model, example, "magnitude"), 0.5, 4, "sub", SHAPE, "magnitude")
    pruned = apply_plan(model, plan, example)
    assert all("in" in pruned.edgeprune_kept[n] for n in ("pointwise", "spatial", "standardised"))
    before = {n: getattr(pruned, n).weight.clone() for n in ("spatial", "standardised")}
    report = compensate(model, pruned, [torch.randn(16, *SHAPE[1:])])
    # The 1×1 same-padding conv is a plain conv on its input (EfficientNet-Lite0's are such a subclass): refitted.
    assert {"pointwise", "head"} <= set(report)
    # Padding inside forward (3×3) or standardised weights: the unfolded rows are not what it multiplies; kept as is.
    assert "spatial" not in report and "standardised" not in report
    assert all(torch.equal(getattr(pruned, n).weight, w) for n, w in before.items())


@pytest.mark.slow
def test_the_refit_also_fits_on_the_unlabelled_images_it_is_given():
    """A few labelled samples leave the refit few rows (here 4 images for a head of 8 inputs and a bias); the task's
    unlabelled --calib images need no labels and join the fit: the output error on other images drops."""
    from edgeprune.data import Dataset
    from edgeprune.rewrite.recover import recover

    model = _trained_looking(TinyDeeper())
    example = torch.zeros(SHAPE)
    plan = uniform_plan(score_groups(model, example, "magnitude"), 0.5, 4, "tiny", SHAPE, "magnitude")
    torch.manual_seed(2)
    few = Dataset(torch.randn(4, *SHAPE[1:]), torch.tensor([0, 1, 2, 3]), "few.npz", False)
    many = Dataset(torch.randn(96, *SHAPE[1:]), None, "calib.npz", False)
    held_out = torch.randn(64, *SHAPE[1:])
    judge = Dataset(held_out, None, "held-out", False)  # fidelity to the unpruned model decides what ships
    alone, info_alone = recover(model, plan, example, few, judge, 0, compensating=True)
    joined, info_joined = recover(model, plan, example, few, judge, 0, compensating=True, unlabelled=many)
    assert info_alone["compensated_on"] == "4 samples" and info_joined["compensated_on"] == "100 samples"
    for info in (info_alone, info_joined):  # both refits shipped: the comparison is refit against refit
        assert "least-squares" in info["recovery"] and info["result"] == info["recovered"] >= info["pruned"]
    assert _relative_error(joined, model, held_out) < 0.8 * _relative_error(alone, model, held_out)
