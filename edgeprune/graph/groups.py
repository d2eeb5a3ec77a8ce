"""torch-pruning's dependency graph of a model, and its prunable groups: what scoring and rewriting both read.

A group is a set of coupled channels (a conv's outputs, its BN, the next layers' inputs, residual partners) that
must be removed together; torch-pruning's DependencyGraph finds them.
"""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

from edgeprune.graph.tp_compat import UnboundedGroup  # (and torch-pruning's workarounds, applied on import)

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class GainConvPruner(tp.pruner.function.ConvPruner):
    """A conv with a per-output-channel ``gain`` parameter (timm's weight-standardised ScaledStdConv2d, used by
    NF-ResNets and NFNets): torch-pruning slices its weight and bias; the gain must lose the same channels."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = [i for i in range(layer.out_channels) if i not in set(idxs)]
        super().prune_out_channels(layer, idxs)
        layer.gain = nn.Parameter(layer.gain.data[keep].clone(), requires_grad=layer.gain.requires_grad)
        return layer


def _custom_pruners(model: nn.Module) -> dict:
    return {type(m): GainConvPruner() for m in model.modules()
            if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "gain", None), nn.Parameter)
            and m.gain.shape[0] == m.out_channels}  # fmt: skip


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` on ``example`` into torch-pruning's dependency graph."""
    with warnings.catch_warnings():
        # Parameters outside a layer (a ViT's cls_token and pos_embed) are cut along their last dimension, the
        # embedding width, which is right for every model we know; torch-pruning warns about it on every build.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                     customized_pruners=_custom_pruners(model) or None)  # fmt: skip


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """The layers whose output channels reach the model's output without another conv or linear layer between.

    Their widths are the model's output (class logits, embedding size), so they are never pruned. Found by walking
    the graph forward through norms, activations and reshapes until a layer that consumes channels is met.
    """
    found = []
    for module, node in graph.module2node.items():
        if isinstance(module, ROOT_TYPES) and _reaches_output(node):
            found.append(module)
    return found


def _reaches_output(node) -> bool:
    stack, seen = list(node.outputs), set()
    if not stack:
        return True
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current.module, ROOT_TYPES):
            continue  # a layer that consumes the channels: the width is internal on this path
        if not current.outputs:
            return True
        stack.extend(current.outputs)
    return False


def prunable_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[tuple[str, tp.Group | None]]:
    """All groups rooted at a conv or linear layer, output layers excluded, each with its root module's name.

    torch-pruning's own listing (``get_all_groups``), with one change: a root whose group torch-pruning cannot
    follow to an end (UnboundedGroup) is listed with None instead of a group, to be kept whole, and the listing goes
    on with the next root instead of never ending.
    """
    names = {module: name for name, module in model.named_modules()}
    ignored = set(output_layers(graph)) | set(graph.IGNORED_LAYERS_IN_TRACING)
    visited: set[nn.Module] = set()
    groups: list[tuple[str, tp.Group | None]] = []
    for module in list(graph.module2node):
        if module in ignored or module in visited or not isinstance(module, ROOT_TYPES) or module not in names:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if channels is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except UnboundedGroup:
            groups.append((names[module], None))
            continue
        cut = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        visited.update(cut)
        if not ignored.intersection(cut):  # a group that cuts an output layer's channels is not prunable
            groups.append((names[module], group))
    return groups
