"""Closed-form least-squares compensation: pruned layers refitted to the unpruned model's outputs, no gradients."""

from __future__ import annotations

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
