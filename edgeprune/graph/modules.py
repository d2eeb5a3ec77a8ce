"""Plain module helpers that scoring and rewriting share: a deep copy, and a forward pass hooked on every layer."""

from __future__ import annotations

import copy

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``. timm's LeViT, EfficientFormer and TinyViT cache, in eval mode, attention biases
    gathered from a parameter (tensors with a grad history) in a dict on the module, and deepcopy refuses such
    tensors: every group of those models failed to prune for it. Those caches are dropped first (their forward
    fills them again); anything else deepcopy refuses still raises."""
    try:
        return copy.deepcopy(model)
    except RuntimeError:
        cleared = 0
        for module in model.modules():
            for value in vars(module).values():
                if isinstance(value, dict) and any(_derived(v) for v in value.values()):
                    value.clear()
                    cleared += 1
        if not cleared:
            raise
        return copy.deepcopy(model)


def _derived(value) -> bool:
    return isinstance(value, torch.Tensor) and value.grad_fn is not None


def forward_with_layer_hook(model: nn.Module, example: torch.Tensor, hook) -> None:
    """Run ``model`` once on ``example`` with ``hook`` on every conv and linear layer (subclasses included)."""
    counted = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
