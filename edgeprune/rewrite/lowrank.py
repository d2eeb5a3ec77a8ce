"""Stage 3: SVD basis decomposition, so that basis vectors can be pruned like channels (``lowrank``, ``double``).

A conv layer's weight, seen as a matrix W (out × in·kh·kw), is U S Vᵀ. The layer becomes two ordinary layers: a
*basis* conv with r = min(out, in·kh·kw) filters √S Vᵀ (same kernel, stride, padding as the original) and a 1×1
*mix* conv U √S with the original bias; a linear layer becomes linear(in → r) and linear(r → out). The input and
output widths of the original layer do not change, so this applies to any architecture, and exporters see plain
conv and linear layers.

Splitting √S evenly makes each basis filter's norm √s_i: the group L1/L2 magnitude that ranks channels ranks basis
vectors by their singular values, so torch-pruning's groups rooted at the basis layers *are* the basis vectors, and
the same scorer, allocator, cost model and budget prune them (``lowrank``: only those groups; ``double``: those and
the ordinary channel groups under one budget). At full rank the decomposition computes the same function (up to
float rounding); it pays off once enough basis vectors are cut, which the allocator sees in its cost.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from edgeprune.graph.groups import build_graph, output_layers
from edgeprune.graph.modules import copy_model


class Decomposed(nn.Sequential):
    """basis → mix; a marker type so that plans and reports can tell a decomposed layer from an ordinary one."""


def decomposable(layer: nn.Module) -> bool:
    """Dense 2-D convs and linear layers with a rank worth cutting (not 1×1 convs already at their narrow side)."""
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features) > 8
    if type(layer) is not nn.Conv2d or layer.groups != 1 or not isinstance(layer.padding, tuple):
        return False
    return min(layer.out_channels, layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]) > 8


@torch.no_grad()
def decompose_layer(layer: nn.Module) -> Decomposed:
    """The two-layer SVD form of ``layer`` at full rank."""
    weight = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
    root = s.sqrt()
    left, right = (u * root).float(), (root[:, None] * vh).float()
    rank = len(s)
    if isinstance(layer, nn.Linear):
        basis = nn.Linear(layer.in_features, rank, bias=False)
        mix = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
        basis.weight.copy_(right)
        mix.weight.copy_(left)
    else:
        basis = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False, padding_mode=layer.padding_mode)  # fmt: skip
        mix = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
        basis.weight.copy_(right.reshape(rank, *weight.shape[1:]))
        mix.weight.copy_(left[:, :, None, None])
    if layer.bias is not None:
        mix.bias.copy_(layer.bias)
    return Decomposed(basis, mix)


def decompose(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace, in place, the named layers (default: every decomposable one except those listed as output layers by
    the caller) by their SVD form; return the names replaced. Basis layers are then ``<name>.0``, mix ``<name>.1``."""
    modules = dict(model.named_modules())
    chosen = names if names is not None else [n for n, m in modules.items() if n and decomposable(m)]
    for name in chosen:
        if isinstance(modules[name], Decomposed):  # already in SVD form (a plan replayed on a decomposed model)
            continue
        model.set_submodule(name, decompose_layer(modules[name]))
    return chosen


def decomposed_copy(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every decomposable layer in SVD form, except the output layers (their width is
    the model's output, and a classifier head is cheap), and the names of the layers decomposed."""
    copy_ = copy_model(model)
    outputs = set(output_layers(build_graph(copy_, example)))
    names = [n for n, m in copy_.named_modules() if n and m not in outputs and decomposable(m)]
    return copy_, decompose(copy_, names)


def is_basis(group_root: str, names: list[str]) -> bool:
    """Whether a torch-pruning group rooted at ``group_root`` is the basis vectors of a decomposed layer."""
    return group_root.endswith(".0") and group_root[:-2] in set(names)


def basis_only(scored: list, names: list[str]) -> list:
    """``lowrank``: only basis vectors are cut, so every layer keeps its input and output widths."""
    return [g if is_basis(g.module, names) else replace(g, scores=None) for g in scored]


def with_decomposition(plan, names: list[str]):
    """The plan with the decomposed layers noted, so that apply_plan on the original model decomposes them first."""
    return replace(plan, notes={**plan.notes, "decomposed": list(names)})
