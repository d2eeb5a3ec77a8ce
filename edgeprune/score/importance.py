"""Stage 2: how much each removable structure is worth: a score per channel of every torch-pruning dependency group
(graph/groups.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from edgeprune.graph.groups import (
    ROOT_TYPES,
    GainConvPruner,
    build_graph,
    output_layers,  # noqa: F401  (adapt.py imports it from here)
    prunable_groups,
)
from edgeprune.graph.heads import head_of, head_scores
from edgeprune.score.energy import energy_scores
from edgeprune.text import is_embedding, similarity_loss, trim_padding

# magnitude: group L1 of the weights; l2: group squared L2, which for an SVD basis vector (√s·v, u·√s) is exactly
# its singular value s, so lowrank and double rank basis vectors by singular value; taylor: |w·∂L/∂w|; fisher: the
# same product taken for each sample and squared, summed (the loss curvature a channel's removal meets); energy: what
# a channel feeds the layers that read it (score/energy.py), a choice of channels within a group.
METHODS = ("magnitude", "l2", "taylor", "fisher", "energy")
FISHER_SEED = 0  # the labels fisher draws from the model's own predictions: the same scores build after build


@dataclass(frozen=True)
class ScoredGroup:
    """One dependency group: its root module's name, its channel count, and a score per channel (higher = keep).

    ``scores`` is None for a group the importance cannot score; it is kept whole, and ``reason`` says why when
    torch-pruning failed on it (empty when the group simply has no weights of a scored kind). ``unit`` is how many
    channels go together: one attention head's channels for a group of attention projections (graph/heads.py),
    else 0, and the target's channel multiple applies. ``comparable`` says the scores are in the same units in every
    group (taylor's: an estimate of the loss a channel's removal costs), so global allocation compares them as
    they are; magnitudes are not (a layer's weight scale says little of its usefulness) and are compared after
    dividing by their group's mean. ``tied`` partitions the channels into sets that are removed together, all of
    one size (GhostNet's channels i and i + C, both computed from one conv channel), or is empty.
    """

    module: str
    channels: int
    scores: torch.Tensor | None
    reason: str = ""
    unit: int = 0
    comparable: bool = False
    tied: tuple[tuple[int, ...], ...] = ()
    per_set: tuple[int, ...] = ()  # with ``tied``: the channels one tied set holds in each layer of the group

    def step(self, multiple: int) -> int:
        """Channels cut at a time: one attention head; for tied channels, the fewest whole sets that cut every
        layer of the group by a ``multiple`` (a GhostNet conv holds one channel of each pair: ``multiple`` pairs; a
        grouped conv of 3 groups holds all 3 of a set: 8 sets for a multiple of 8); else the target's ``multiple``."""
        if self.unit:
            return self.unit
        if not self.tied:
            return multiple
        sets = math.lcm(*(multiple // math.gcd(multiple, count) for count in self.per_set or (1,)))
        return len(self.tied[0]) * sets

    def channel_scores(self) -> torch.Tensor:
        """The scores, each tied set's channels given the set's mean (a set goes as one)."""
        if not self.tied:
            return self.scores
        sets = torch.tensor(self.tied)
        means = self.scores[sets].mean(dim=1, keepdim=True).expand_as(sets)
        return torch.empty_like(self.scores).index_put_((sets.flatten(),), means.flatten())

    def best(self, width: int) -> tuple[int, ...]:
        """The ``width`` best-scoring channels in their original order, ties broken by index (reproducible); whole
        tied sets when the channels are tied (``width`` rounded down to a whole number of sets)."""
        if not self.tied:
            return tuple(sorted(torch.argsort(self.scores, descending=True, stable=True)[:width].tolist()))
        sets = torch.tensor(self.tied)
        chosen = torch.argsort(self.scores[sets].mean(dim=1), descending=True, stable=True)[: width // sets.shape[1]]
        return tuple(sorted(sets[chosen].flatten().tolist()))


def _root_scores(layer: nn.Module, method: str) -> torch.Tensor:
    """Per-output-channel importance of one layer with a GainConvPruner (its effective filters are standardised,
    then scaled by the gain): |gain|, times |∂L/∂gain| for taylor."""
    gain = layer.gain.detach().flatten().abs()
    if method == "taylor" and layer.gain.grad is not None:
        return gain * layer.gain.grad.detach().flatten().abs()
    return gain ** (2 if method == "l2" else 1)


def score_groups(
    model: nn.Module,
    example: torch.Tensor,
    method: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] = (),
) -> list[ScoredGroup]:
    """Score every prunable group of ``model`` with ``method`` (one of METHODS).

    ``magnitude`` is data-free group L1 of the pretrained weights. ``taylor`` is first-order Taylor (|w·∂L/∂w|)
    accumulated over ``batches``; the loss is cross-entropy with the labels when a batch has them, else with the
    unpruned model's own predictions as pseudo-labels (a self-distillation target whose gradient is not zero).
    ``fisher`` (``_fisher_scores``) and ``energy`` (score/energy.py) need no labels. The model is left unchanged
    apart from cleared gradients.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; known: {', '.join(METHODS)}")
    graph = build_graph(model, example)
    listed = prunable_groups(model, graph)
    heads = head_of(model)
    if method == "taylor":
        # Summed over the group's layers, not averaged: removing a channel removes it from all of them, so their
        # loss estimates add up, and a group of many coupled layers (a residual stream) is not undervalued.
        importance = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
        _accumulate_gradients(model, batches)
    elif method == "fisher":
        importance = _fisher_scores(model, graph, listed, batches)
    elif method == "energy":
        importance = energy_scores(model, listed, batches)
    else:
        p = 2 if method == "l2" else 1
        importance = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)
    scored = []
    modules = dict(model.named_modules())
    for name, group in listed:
        root = modules[name]
        channels = graph.get_pruner_of_module(root).get_out_channels(root)
        scores, reason = None, ""
        if group is None:
            reason = (
                "torch-pruning cannot follow this group through the graph: its search for the coupled layers"
                " ran away or mapped more indices than a layer has channels"
            )
        elif len(group[0].idxs) != channels:  # torch-pruning's index mapping went wrong (Res2Net's split-concat)
            reason = f"torch-pruning maps {len(group[0].idxs)} indices onto its {channels} output channels"
        else:
            try:
                with torch.no_grad():
                    scores = importance(group)
            except Exception as exc:  # the index mapping fails on some graphs
                reason = f"torch-pruning cannot score it: {type(exc).__name__}: {' '.join(str(exc).split())}"
        if scores is None and not reason and isinstance(graph.get_pruner_of_module(root), GainConvPruner):
            scores = _root_scores(root, method)  # torch-pruning's importances only know their own pruners
        # A group the importance cannot score stays in the list (a plan names every group), unscored: kept whole.
        scores = None if scores is None else scores.detach().float().cpu()
        unit = 0
        if root in heads and scores is not None:  # attention projections: whole heads or nothing
            scores, unit = head_scores(scores, heads[root]), channels // (int(heads[root].max()) + 1)
        elif any(dep.target.module in heads and dep.handler.__name__ == "prune_out_channels" for dep, _ in group or ()):
            scores, reason = None, "attention projections whose group is rooted elsewhere: heads cannot be cut whole"
        elif any(dep.target.module in heads and dep.handler.__name__ == "prune_in_channels" for dep, _ in group or ()):
            # The residual stream of a transformer (what every attention and MLP reads and writes): cutting it
            # shrinks every layer's input at once and costs far more quality than heads and neurons (a MiniLM
            # classifier at 2x kept 26% test accuracy with it cut, against 54% unpruned). Kept whole, by design.
            scores = None
        tied = getattr(group, "edgeprune_tied", ())
        if scores is None or unit or len({len(t) for t in tied}) > 1:
            # Attention projections are cut in whole heads, which hold their q, k and v channels together already;
            # sets of unequal sizes cannot be cut in aligned steps. Either way the probe tries the group as before.
            tied = ()
        per_set = tuple(sorted({len(set(item.idxs)) // len(tied) for item in (group if tied else ())
                                if isinstance(item.dep.target.module, ROOT_TYPES)}))  # fmt: skip
        scored.append(ScoredGroup(module=name, channels=channels, scores=scores, reason=reason[:200], unit=unit,
                                  comparable=method in ("taylor", "fisher"), tied=tied,
                                  per_set=per_set))  # fmt: skip
    model.zero_grad(set_to_none=True)
    return scored


STRUCTURES = ("all", "heads", "neurons")


def select_structures(scored: list[ScoredGroup], which: str) -> list[ScoredGroup]:
    """Only attention heads (``heads``), or everything but them (``neurons``: MLP neurons, and conv channels in a
    CNN), left prunable; the other groups lose their scores and are kept whole. ``all`` changes nothing."""
    if which == "all":
        return scored
    wanted = (lambda g: g.unit > 0) if which == "heads" else (lambda g: g.unit == 0)
    return [g if wanted(g) else replace(g, scores=None) for g in scored]


def _task_loss(model: nn.Module, output: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Taylor's loss: cross-entropy with the labels or, without them, the model's own top class; the in-batch
    contrastive loss of an embedding model; the output's energy for anything else (label-free, with a gradient)."""
    if is_embedding(model):
        return similarity_loss(output)
    if output.dim() == 2:
        return F.cross_entropy(output, y if y is not None else output.detach().argmax(dim=1))
    return output.pow(2).mean()


def _accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    model.zero_grad(set_to_none=True)
    count = 0
    for x, y in batches:
        _task_loss(model, model(trim_padding(model, x)), y).backward()
        count += 1
    if count == 0:
        raise ValueError("taylor importance needs at least one batch of data")


def _fisher_scores(model: nn.Module, graph: tp.DependencyGraph, listed: list, batches: Iterable) -> Callable:
    """Per group, Σ over samples of (the group's w·∂L/∂w for one sample)²: the empirical Fisher's estimate of what
    removing a channel costs, ½ δᵀFδ with δ the channel's weights, so it is in loss units like taylor's.

    Why not taylor's |Σ w·∂L/∂w|: a model trained on the task sits near a minimum of its loss there, where the
    gradients of different samples cancel in the sum and what is left is noise; their squares do not cancel. For a
    classifier each sample's loss is the cross-entropy with a label drawn from the model's own softmax (seeded), so
    the score is the curvature of the KL divergence from the unpruned outputs, the fidelity a build is judged by
    (measured, README: RegNetX-200MF at 0.7 of its latency kept 0.53 top-1 agreement with it against 0.35 with
    taylor's). An embedding model's loss (in-batch contrastive) needs the batch, so there a batch is the unit;
    outputs of other shapes use taylor's label-free loss per sample. Returns a scorer of one group, as
    torch-pruning's importances are; it raises what torch-pruning raised on that group.
    """
    importance = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=True)
    groups = {id(group[0].dep.target.module): group for _, group in listed if group}  # (prunable_groups)
    totals: dict[int, torch.Tensor | Exception | None] = {}
    generator = torch.Generator().manual_seed(FISHER_SEED)
    per_sample = not is_embedding(model)
    units = 0
    for x, y in batches:
        x = trim_padding(model, x)
        for first in range(0, len(x), 1 if per_sample else len(x)):
            unit = slice(first, first + 1 if per_sample else len(x))
            model.zero_grad(set_to_none=True)
            output = model(x[unit])
            if output.dim() == 2 and per_sample:
                drawn = torch.multinomial(F.softmax(output.detach().float(), dim=1), 1, generator=generator)[:, 0]
                loss = F.cross_entropy(output, drawn)
            else:
                loss = _task_loss(model, output, None if y is None else y[unit])
            loss.backward()
            units += 1
            for key, group in groups.items():
                if key in totals and not isinstance(totals[key], torch.Tensor):
                    continue  # unscorable: stays so
                try:
                    with torch.no_grad():
                        scores = importance(group)
                except Exception as exc:  # the index mapping fails on some graphs; score_groups says why
                    totals[key] = exc
                    continue
                root = group[0].dep.target.module
                if scores is None and isinstance(graph.get_pruner_of_module(root), GainConvPruner):
                    scores = (root.gain * root.gain.grad).detach().flatten() if root.gain.grad is not None else None
                totals[key] = None if scores is None else totals.get(key, 0) + scores.float() ** 2
    if units == 0:
        raise ValueError("fisher importance needs at least one batch of data")
    model.zero_grad(set_to_none=True)

    def score(group: tp.Group) -> torch.Tensor | None:
        found = totals.get(id(group[0].dep.target.module))
        if isinstance(found, Exception):
            raise found
        return found

    return score
