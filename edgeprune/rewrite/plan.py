"""A plan checked against the model it is to replay on, before anything slow (a pinned ``--plan``)."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.graph.modules import copy_model
from edgeprune.graph.plan import Plan, short_repr
from edgeprune.rewrite.depth import drop_blocks, residual_blocks
from edgeprune.rewrite.lowrank import decomposable
from edgeprune.rewrite.prune import apply_plan


def check_plan(plan: Plan, model: nn.Module, example: torch.Tensor) -> None:
    """BadInput unless ``plan`` replays on ``model`` (input ``example``): the blocks it removes are residual
    blocks of the model (depth.residual_blocks), the layers it decomposes are decomposable ones of the model
    without those blocks, and its groups are exactly that model's prunable groups, with their widths. Run
    before anything slow: one trace of the model and one replay on a copy."""
    if tuple(plan.input_shape) != tuple(example.shape):
        shape = ",".join(map(str, plan.input_shape))
        raise BadInput(f"the plan was made for input shape {shape}; pass --input-shape {shape}")
    dropped = list(plan.notes.get("dropped_blocks", []))
    if dropped:
        residual = residual_blocks(model, example)
        wrong = [name for name in dropped if name not in residual]
        if wrong:
            raise BadInput(f"the plan removes {short_repr(wrong[0])}, which is not a residual block of this model"
                           f" ({len(residual)} blocks can be removed); the plan was made for another"
                           " model")  # fmt: skip
    decomposed = list(plan.notes.get("decomposed", []))
    if decomposed:
        layers = dict(drop_blocks(copy_model(model), dropped).named_modules())
        wrong = [name for name in decomposed if not decomposable(layers.get(name))]
        if wrong:
            raise BadInput(f"the plan decomposes {short_repr(wrong[0])}, which is not a conv or linear layer of this"
                           " model that can be decomposed; the plan was made for another model")  # fmt: skip
    apply_plan(model, plan, example)  # the groups and their widths, checked by the replay itself
