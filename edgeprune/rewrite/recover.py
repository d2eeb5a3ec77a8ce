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


def recover(model: nn.Module, plan, example: torch.Tensor, score_set, eval_set, steps: int, compensating: bool,
            batch: int = 16) -> tuple[nn.Module, dict]:  # fmt: skip
    """Prune ``model`` by ``plan`` and, with real data, recover: batch-norm recalibration (or, ``compensating``, the
    closed-form least-squares refit, which aims every layer at the unpruned model's outputs so the original
    batch-norm statistics stay right), then ``steps`` of distillation. The recovered weights are kept only if they
    score better on ``eval_set`` than the pruned weights; the returned dict says what was done and measured."""
    from edgeprune.rewrite.compensate import compensate
    from edgeprune.rewrite.prune import apply_plan

    pruned = apply_plan(model, plan, example)
    metric, before = quality(pruned, model, eval_set.batches(batch))
    info = {"metric": metric, "baseline": quality(model, model, eval_set.batches(batch))[1], "pruned": before}
    info["evaluated_on"] = "synthetic inputs" if eval_set.synthetic else f"{len(eval_set)} held-out samples"
    if score_set.synthetic:
        info.update(result=before, recovery="skipped: no real data")
        return pruned, info
    recovered = apply_plan(model, plan, example)
    if compensating:
        refits = compensate(model, recovered, [x for x, _ in score_set.batches(batch)])
        info["compensated_layers"] = len(refits)
        done = f"least-squares compensation of {len(refits)} layers"
    else:
        recalibrate_batchnorm(recovered, score_set.batches(batch))
        done = "batch-norm recalibration"
    losses = distill(recovered, model, list(score_set.batches(batch)), steps)
    after = quality(recovered, model, eval_set.batches(batch))[1]
    kept = after >= before
    info.update(
        result=max(before, after), recovered=after, distill_steps=len(losses),
        recovery=done + (f" + {len(losses)} distillation steps" if losses else "")
        + ("" if kept else " (not kept: it scored lower held out)"),
    )  # fmt: skip
    return (recovered if kept else pruned), info
