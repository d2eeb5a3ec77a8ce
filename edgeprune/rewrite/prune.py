"""Stage 3: rewrite a model into a physically smaller one by applying a Plan with torch-pruning's dependency graph.

No masks: weights are sliced, so the exported graph really is smaller. The same function builds the model during a
build and replays plan.json afterwards, so a build and its replay cannot drift apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.graph.groups import build_graph, prunable_groups
from edgeprune.graph.modules import copy_model, forward_with_layer_hook
from edgeprune.graph.plan import Plan
from edgeprune.rewrite.depth import drop_blocks
from edgeprune.rewrite.heads import sync_head_counts
from edgeprune.rewrite.lowrank import decompose


def apply_plan(
    model: nn.Module, plan: Plan, example: torch.Tensor, inplace: bool = False, check_fit: bool = True
) -> nn.Module:
    """Return ``model`` with every group of ``plan`` pruned to its kept channels (a copy unless ``inplace``).

    ``check_fit`` refuses a plan that does not name exactly the model's prunable groups; only a caller that built the
    plan from this very model's groups (the probe, many times over) may skip it, as listing the groups is costly.

    Each group is pruned through its root module; torch-pruning carries the cut to every coupled layer (BN, next
    layer's inputs, residual partners). Indices refer to the unpruned model: a group's root output channels are not
    touched by pruning other groups, so applying groups one after another is exact.
    """
    target = model if inplace else copy_model(model)
    if plan.notes.get("dropped_blocks"):  # depth pruning: the plan's groups are those of the model without them
        drop_blocks(target, list(plan.notes["dropped_blocks"]))
    if plan.notes.get("decomposed"):  # lowrank / double: the plan's groups are those of the SVD form
        decompose(target, list(plan.notes["decomposed"]))
    graph = build_graph(target, example)
    modules = dict(target.named_modules())
    names = {module: name for name, module in modules.items()}
    # A plan names every prunable group of the model it was made for; another model with the same module names
    # (resnet18's plan on resnet34) would otherwise be pruned in part, silently.
    expected = {name for name, _ in prunable_groups(target, graph)} if check_fit else set()
    named = {g.module for g in plan.groups}
    if check_fit and named != expected:
        missing, extra = sorted(expected - named)[:3], sorted(named - expected)[:3]
        raise BadInput(
            f"plan does not fit this model: the model's prunable groups {missing} are not in the plan, the plan's"
            f" {extra} are not in the model; the plan was made for another model"
        )
    for group_plan in plan.groups:
        module = modules.get(group_plan.module)
        if module is None:
            raise BadInput(f"plan names module '{group_plan.module}', which the model does not have")
        pruner = graph.get_pruner_of_module(module)
        current = pruner.get_out_channels(module) if pruner else None
        if current != group_plan.channels:
            raise BadInput(
                f"plan expects {group_plan.channels} channels in '{group_plan.module}', the model has {current};"
                " the plan was made for another model"
            )
        kept = set(group_plan.kept)
        removed = [i for i in range(group_plan.channels) if i not in kept]
        if removed:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, removed)
            _record_kept(target, names, group)
            group.prune()
    sync_head_counts(target)  # attention modules whose heads were cut read their head count from attributes
    sync_split_widths(target)
    return target


def _record_kept(model: nn.Module, names: dict, group) -> None:
    """Note in ``model.edgeprune_kept[layer]["out" | "in"]`` which of the unpruned layer's channels each conv and
    linear layer keeps, so that compensation can match a pruned layer to the unpruned one. Cuts of one dimension by
    several groups (a concatenation's consumer) compose: each group's indices count what is left at that point."""
    kept = model.__dict__.setdefault("edgeprune_kept", {})
    for dep, indices in group:
        layer = dep.target.module
        if not isinstance(layer, nn.modules.conv._ConvNd | nn.Linear) or layer not in names:
            continue
        side = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
        if isinstance(layer, nn.Linear):
            size = layer.out_features if side == "out" else layer.in_features
        else:
            size = layer.out_channels if side == "out" else layer.in_channels
        current = kept.setdefault(names[layer], {}).setdefault(side, list(range(size)))
        cut = set(indices)
        kept[names[layer]][side] = [k for i, k in enumerate(current) if i not in cut]


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of conv and linear layers in one forward pass on ``example``, and the parameter count.

    Counted with forward hooks matched by isinstance, so subclasses (timm's and EfficientNet's same-padding convs)
    count too; torch-pruning's counter matches exact types and misses them. Norms and activations are left out.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
            total += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    forward_with_layer_hook(model, example, hook)
    params = sum(p.numel() for p in model.parameters())
    return int(total // example.shape[0]), int(params)


def sync_split_widths(model: nn.Module) -> None:
    """Set the channel splits of timm's MixedConv2d (MixNet's mixed kernels: one conv per kernel size, each on its
    slice of the channels) from its pruned convs. Its forward splits the input by a list kept as an attribute, which
    torch-pruning cannot see; left stale, every pruned MixNet block failed with "split_with_sizes expects ..."."""
    for module in model.modules():
        if type(module).__name__ == "MixedConv2d" and isinstance(module, nn.ModuleDict) and hasattr(module, "splits"):
            convs = list(module.values())
            module.splits = [conv.in_channels for conv in convs]
            module.in_channels, module.out_channels = sum(module.splits), sum(conv.out_channels for conv in convs)
