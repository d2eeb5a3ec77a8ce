"""Stage 3, after the structure is fixed: recover accuracy once, with the task's data, without changing the shape.

Two steps, both cheap: recalibrate batch-norm statistics to the pruned network's activations (pruning shifts them,
and a forward pass fixes that), then a few steps of distillation from the unpruned model's outputs. The loop keeps
the recovered weights only if they score better on held-out data than the pruned weights did.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Batches) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches``; return the number of BN layers.

    Statistics are reset and averaged over all batches (momentum None), so the result does not depend on order.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    model.eval()
    return len(norms)


def distill(
    student: nn.Module, teacher: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], steps: int,
    lr: float = 1e-4, temperature: float = 2.0,
) -> list[float]:  # fmt: skip
    """Fine-tune ``student`` for ``steps`` steps to match ``teacher``'s softened outputs; return the losses.

    Batch-norm layers stay in eval mode: with a few small batches, updating their statistics adds noise. The loss is
    KL divergence on logits for classifiers and mean squared error for other outputs.
    """
    if steps <= 0 or not batches:
        return []
    teacher.eval()
    student.eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, _ = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(x)
        output = student(x)
        if output.dim() == 2:
            soft_target = F.softmax(target / temperature, dim=1)
            loss = F.kl_div(F.log_softmax(output / temperature, dim=1), soft_target, reduction="batchmean")
            loss = loss * temperature**2  # keeps gradient size independent of the temperature (Hinton et al.)
        else:
            loss = F.mse_loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    student.eval()
    return losses


@torch.no_grad()
def quality(model: nn.Module, reference: nn.Module, batches: Batches) -> tuple[str, float]:
    """Accuracy when the batches have labels, else fidelity: top-1 agreement with ``reference`` (1.0 = same)."""
    correct = agree = total = 0
    labelled = True
    for x, y in batches:
        predicted = model(x).argmax(dim=1)
        agree += int((predicted == reference(x).argmax(dim=1)).sum())
        if y is None:
            labelled = False
        else:
            correct += int((predicted == y).sum())
        total += len(x)
    if total == 0:
        return "fidelity", float("nan")
    return ("accuracy", correct / total) if labelled else ("fidelity", agree / total)
