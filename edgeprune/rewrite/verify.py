"""Stage 3: check that a pruned model computes what the unpruned one does with the removed channels silenced.

The artifact check (stage 4) compares the exported model with the *pruned* PyTorch model, so it cannot see a
rewrite that cut the wrong channels: both sides are wrong alike. torch-pruning has done that silently (a split's
slices swapped, so a conv was fed its neighbour's channels; graph/tp_compat.py). This check can see it. In a copy
of the unpruned model, every layer that writes a removed channel (each conv, linear and norm that a group cuts the
outputs of) has that channel's parameters set to zero, so the channel carries exact zeros. Where nothing mixes
channels on the way (a LayerNorm or GroupNorm over a cut dimension does, and so does a weight-standardised conv,
whose filter statistics span its cut inputs: NF-ResNets), zeros flow through activations, residual
adds, concatenations and attention as zeros, and the pruned model must compute the same outputs to float
precision. If it does not, channels were routed to the wrong place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.graph.groups import build_graph
from edgeprune.graph.modules import copy_model
from edgeprune.graph.plan import Plan

TOLERANCE = 1e-4  # relative to the largest output; float rounding of a correct rewrite stays below 1e-6
BATCH_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class RoutingCheck:
    """``checked`` False when the model cannot be checked this way (``reason`` says why); else ``error`` is the
    largest output difference relative to the largest output, and ``ok`` whether it is within TOLERANCE."""

    checked: bool
    error: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.checked or self.error <= TOLERANCE

    def to_dict(self) -> dict:
        return {"checked": self.checked, "relative_error": self.error, "ok": self.ok, "reason": self.reason}


def silenced_copy(model: nn.Module, plan: Plan, example: torch.Tensor) -> tuple[nn.Module | None, str]:
    """A copy of ``model`` whose removed channels carry zeros, or None and why it cannot be made exactly."""
    silenced = copy_model(model)
    graph = build_graph(silenced, example)
    modules = dict(silenced.named_modules())
    names = {module: name for name, module in modules.items()}
    for group_plan in plan.groups:
        kept = set(group_plan.kept)
        removed = [i for i in range(group_plan.channels) if i not in kept]
        if not removed:
            continue
        root = modules[group_plan.module]
        group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed)
        for dep, idxs in group:
            layer = dep.target.module
            if "StdConv" in type(layer).__name__:  # timm's weight standardisation: statistics over all inputs
                return None, f"weight-standardised conv {names.get(layer, '?')} normalises its filters over cut inputs"
            if not graph.is_out_channel_pruning_fn(dep.handler) or not isinstance(layer, nn.Module):
                continue
            # A zero channel changes the others' normalisation in every norm but batch norm (LayerNorm, GroupNorm,
            # RmsNorm, EvoNorm: found by name, as timm's own norms do not all subclass torch's).
            if "Norm" in type(layer).__name__ and not isinstance(layer, BATCH_NORM):
                return None, f"{type(layer).__name__} {names.get(layer, '?')} normalises across cut channels"
            if not isinstance(layer, BATCH_NORM) and any(b.dim() for b in layer.buffers(recurse=False)):
                # Per-channel state that is not a parameter (FrozenBatchNorm2d's scale and shift): zero parameters
                # do not silence the channel there.
                return None, f"{type(layer).__name__} {names.get(layer, '?')} keeps per-channel buffers"
            if isinstance(layer, BATCH_NORM) and not layer.affine:
                return None, f"BatchNorm {names.get(layer, '?')} has no affine parameters to silence a channel"
            if isinstance(layer, nn.modules.conv._ConvTransposeNd):
                return None, f"transposed conv {names.get(layer, '?')} keeps its outputs on the second axis"
            width = max(idxs) + 1
            with torch.no_grad():
                for parameter in layer.parameters(recurse=False):
                    if parameter.dim() and parameter.shape[0] >= width:
                        parameter[list(idxs)] = 0
    return silenced, ""


def check_routing(model: nn.Module, plan: Plan, pruned: nn.Module, example: torch.Tensor) -> RoutingCheck:
    """Compare ``pruned`` (``plan`` applied to ``model``, before any refit) with the silenced unpruned model."""
    if not any(g.width < g.channels for g in plan.groups):
        return RoutingCheck(checked=False, reason="nothing was cut")
    silenced, reason = silenced_copy(model, plan, example)
    if silenced is None:
        return RoutingCheck(checked=False, reason=reason)
    # Not the build's example itself: for images it is all zeros, on which a randomly initialised network's
    # channels are all alike (skresnet18's wrong routing was invisible on it). Token ids are used as they are.
    if example.is_floating_point():
        example = torch.randn(example.shape, generator=torch.Generator().manual_seed(0), dtype=example.dtype)
    with torch.no_grad():
        expected, produced = silenced.eval()(example), pruned.eval()(example)
    if not isinstance(expected, torch.Tensor) or expected.shape != produced.shape:
        return RoutingCheck(checked=False, reason="the outputs are not one tensor of the same shape")
    scale = float(expected.abs().max())
    if scale == 0:  # timm's MLP-Mixer starts with a zero head: its outputs say nothing of the channels before it
        return RoutingCheck(checked=False, reason="the model's outputs are all zero")
    error = float((produced - expected).abs().max()) / scale
    return RoutingCheck(checked=True, error=error)
