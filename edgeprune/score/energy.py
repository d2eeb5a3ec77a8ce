"""Stage 2: which channels of a group to keep, by the energy each one feeds the layers that read it.

Removing channel c of a group zeroes column c of every conv or linear layer that reads the group's channels, and
changes that layer's output by W[:, c]·x_c. Its expected squared size is ||W[:, c]||²·E[x_c²]: the column's weight
energy times the channel's activation energy on the task's inputs (exact for a linear layer; for a conv it ignores
the overlap of neighbouring positions). Summed over the group's readers, that is the score. It needs only forward
passes, so a few dozen samples settle it, where fisher's per-sample gradient squares need hundreds (pipeline.py).

Measured at a uniform ratio, batch norms recalibrated, held-out top-1 agreement with the unpruned model on the
digits (README, "Scorer benchmark"): at ratio 0.3, ResNet-18 0.943 against L1 magnitude's 0.846 and fisher's 0.782;
EfficientNet-Lite0 0.832 against 0.558 and 0.729; ConvNeXt-atto 0.975 against 0.961 and 0.931.

A group holding a norm that normalises across channels (LayerNorm, GroupNorm: ConvNeXt's residual stream) is scored
by L1 magnitude instead. Removing a channel there also rescales every other channel by statistics it was part of,
which the energy after the norm does not see: ConvNeXt-atto's streams scored by energy kept 0.831 at ratio 0.5,
by L1 0.868 (its MLPs by energy either way). Raw energy is in no unit shared across groups, so its scores choose
channels within a group (search/steepness.py), not widths across groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from edgeprune.text import trim_padding

_fn = tp.pruner.function
# Norms across a group's channels: the group keeps L1's ranking (the module's docstring says why)
ACROSS_CHANNELS = (_fn.prune_layernorm_out_channels, _fn.prune_groupnorm_out_channels)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def _is_reader(item) -> bool:
    """A conv or linear layer whose inputs the group cuts (a depthwise conv's are cut as its outputs, and its readers
    count instead: torch-pruning lists it with its output handler)."""
    layer = item.dep.target.module
    return item.dep.handler.__name__ == "prune_in_channels" and isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd))


def _weight_as_stored(layer: nn.Module) -> bool:
    """Whether the layer multiplies its input by ``weight`` as stored. timm's weight-standardised convs (StdConv2d,
    ScaledStdConv2d and their "Same" kin) standardise it in their forward, and a gain scales it (importance.py's
    GainConvPruner); a group they read keeps L1's ranking. Padding subclasses (EfficientNet-Lite0's
    Conv2dStaticSamePadding) use it as it is: a rule on the class's own forward would have left 23 of its 24 groups
    to L1."""
    return getattr(layer, "gain", None) is None and "StdConv" not in type(layer).__name__


def _column_energy(layer: nn.Module) -> torch.Tensor:
    """||W[:, c]||² for every input channel c of a conv or linear layer."""
    weight = layer.weight.detach().float()
    if isinstance(layer, nn.Linear):
        return weight.pow(2).sum(0)
    if layer.transposed:  # (in, out / groups, *kernel): each input channel has its own row
        return weight.pow(2).flatten(1).sum(1)
    groups = layer.groups  # (out, in / groups, *kernel): input c feeds only its own group's outputs
    per_group = layer.in_channels // groups
    return weight.reshape(groups, layer.out_channels // groups, per_group, -1).pow(2).sum((1, 3)).flatten()


def energy_scores(model: nn.Module, listed: list, batches: Iterable) -> Callable:
    """A scorer of one torch-pruning group (as its importances are) for the groups ``listed`` (prunable_groups),
    from the readers' input energies over ``batches``: see the module's docstring."""
    readers = {item.dep.target.module for _, group in listed for item in group or () if _is_reader(item)}
    sums: dict[nn.Module, torch.Tensor] = {}
    calls: dict[nn.Module, int] = {}

    def record(layer: nn.Module, inputs: tuple) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor):  # called with keywords: not measured, not scored
            return
        x = inputs[0].detach().float()
        per_channel = x.reshape(-1, x.shape[-1]) if isinstance(layer, nn.Linear) else x.transpose(0, 1).flatten(1).T
        sums[layer] = sums.get(layer, 0) + per_channel.pow(2).mean(0)
        calls[layer] = calls.get(layer, 0) + 1

    hooks = [layer.register_forward_pre_hook(record) for layer in readers]
    count, modes = 0, {module: module.training for module in model.modules()}
    model.eval()  # inference's activations, and batch-norm statistics left as they are
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(trim_padding(model, x))
                count += 1
    finally:
        for module, training in modes.items():
            module.train(training)
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise ValueError("energy scores need at least one batch of data")
    magnitude = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)

    def score(group: tp.Group) -> torch.Tensor | None:
        # All of a group's readers or none: a partial sum would look like a score and rank by a part of the effect.
        items = [item for item in group if _is_reader(item)]
        unmeasured = any(item.dep.target.module not in sums or not _weight_as_stored(item.dep.target.module)
                         or item.root_idxs is None or None in item.root_idxs for item in items)  # fmt: skip
        normed = any(item.dep.handler in ACROSS_CHANNELS or isinstance(item.dep.target.module, NORMS) for item in group)
        if not items or unmeasured or normed:
            return magnitude(group)
        total = torch.zeros(len(group[0].idxs))
        for item in items:
            layer = item.dep.target.module
            energy = _column_energy(layer) * (sums[layer] / calls[layer])
            total.index_add_(0, torch.as_tensor(item.root_idxs), energy[torch.as_tensor(item.idxs)])
        return total

    return score
