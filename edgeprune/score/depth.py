"""Stage 2, for depth: which residual blocks to remove, chosen on the task's data (``--drop-blocks N``).

A block's worth is how far the model's outputs move on the task's samples without it (the Judge's distance: the
logits' cosine for a classifier). Blocks are removed one at a time, each time the one whose removal, on top of
those already removed, moves the outputs least: blocks of one stage stand in for each other, and the second of two
similar blocks costs more once the first is gone than it did alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.rewrite.depth import drop_blocks, residual_blocks
from edgeprune.rewrite.prune import copy_model
from edgeprune.rewrite.recover import Judge


@dataclass(frozen=True)
class DepthChoice:
    """The blocks removed, in the order chosen, with the Judge's distance after each removal, and the residual
    blocks the model has."""

    dropped: tuple[str, ...]
    distance: tuple[float, ...]
    residual: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"dropped": list(self.dropped), "distance_after_each": [round(d, 6) for d in self.distance],
                "residual_blocks": list(self.residual)}  # fmt: skip


def choose_blocks(model: nn.Module, example: torch.Tensor, batches: list, count: int) -> DepthChoice:
    """Greedily choose ``count`` residual blocks of ``model`` to remove, judged on ``batches`` (task samples)."""
    residual = residual_blocks(model, example)
    if count > len(residual):
        raise BadInput(
            f"--drop-blocks {count}: this model has {len(residual)} residual blocks that can be removed;"
            f" pass --drop-blocks {len(residual)} or fewer"
        )
    judge = Judge(model, batches)
    dropped: list[str] = []
    distances: list[float] = []
    with torch.no_grad():
        for _ in range(count):
            tried = {name: judge.distance(drop_blocks(copy_model(model), [*dropped, name]))
                     for name in residual if name not in dropped}  # fmt: skip
            best = min(tried, key=tried.get)
            dropped.append(best)
            distances.append(tried[best])
    return DepthChoice(tuple(dropped), tuple(distances), tuple(residual))


def without_blocks(model: nn.Module, choice: DepthChoice) -> nn.Module:
    """A copy of ``model`` with the chosen blocks bypassed."""
    return drop_blocks(copy_model(model), list(choice.dropped))
