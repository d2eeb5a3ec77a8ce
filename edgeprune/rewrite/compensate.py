"""Stage 3: closed-form compensation of a pruned model, in place of retraining (no gradient step).

After channels are removed, each conv or linear layer whose inputs were cut is refitted by least squares so that,
on calibration images, its output from the pruned network's activations matches what the unpruned layer produced
from the unpruned network's: W = argmin ||A W - Y||² + λ||W||², with A the pruned layer's (unfolded) inputs plus a
column of ones where the layer has a bias (which then also corrects the shift of the mean; a layer without one keeps
its parameters' names, so plan.json and the saved weights still replay), Y the unpruned layer's outputs at the
channels the pruned layer keeps. Layers are refitted in forward order, each on the
activations of the already-refitted layers before it, so errors do not pile up. The normal equations are summed
batch by batch (AᵀA is d×d for d = inputs × kernel size), so memory does not grow with the calibration set.
λ is ``ridge`` × the mean of diag(AᵀA): scale-free. Grouped and depthwise convolutions are left as they are (a cut
input of a depthwise conv removes its output too), and so is a conv subclass that does more than a plain conv.

For a token-id model (a transformer encoder), only the rows of real tokens are fitted: padding positions are masked
out of attention and pooling, so what a layer computes there never reaches the output, and sentences padded to the
sequence length are mostly padding (fitting it spent the refit on rows that do not matter).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.graph.modules import forward_with_layer_hook
from edgeprune.text import token_mask, trim_padding

RIDGE = 1e-3


def _capture(module: nn.Module, what: str):
    store: dict[str, torch.Tensor] = {}

    def hook(_, inputs, output):
        store["value"] = inputs[0] if what == "input" else output

    return store, module.register_forward_hook(hook)


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of what each output position multiplies: unfolded patches for a conv."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N × (C·k·k) × L
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _targets(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return (
        y.reshape(-1, y.shape[-1])
        if isinstance(layer, nn.Linear)
        else y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    )


def compensable(layer: nn.Module) -> bool:
    """Dense conv or linear layers (subclasses too, where ``_plain`` finds that they compute a plain one)."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple)


def _plain(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``layer`` computed ``y`` from its input ``x`` as a plain conv with its own attributes. A subclass may
    pad inside forward (EfficientNet's and timm's same-padding convs; at 1×1 and stride 1 they pad nothing) or
    transform its weights (weight standardisation): then the rows unfolded here are not what its weights multiply,
    and a refit would be wrong. Checked on the layer's real input, not guessed from its class: EfficientNet-Lite0's
    1×1 convs are such a subclass, and excluding every subclass left its refit one layer, the classifier."""
    if type(layer) in (nn.Linear, nn.Conv2d):
        return True
    if isinstance(layer, nn.Linear):
        expected = F.linear(x, layer.weight, layer.bias)
    else:
        expected = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return expected.shape == y.shape and torch.allclose(expected, y, rtol=1e-4, atol=1e-5)


def compensate(original: nn.Module, pruned: nn.Module, batches: Iterable[torch.Tensor], ridge: float = RIDGE) -> dict:
    """Refit, in place, every layer of ``pruned`` (made by apply_plan) whose inputs were cut; return per layer its
    relative output error on the calibration images before its refit."""
    kept = getattr(pruned, "edgeprune_kept", {})
    batches = [trim_padding(pruned, b) for b in batches]
    masks = [token_mask(pruned, b) for b in batches]
    masks = [m.reshape(-1) if m is not None else None for m in masks]  # per row of a per-token layer
    modules, reference_modules = dict(pruned.named_modules()), dict(original.named_modules())
    order = _forward_order(pruned, batches[0][:1])
    report = {}
    original.eval(), pruned.eval()
    for name in order:
        layer = modules[name]
        if "in" not in kept.get(name, {}) or not compensable(layer) or name not in reference_modules:
            continue
        outputs = kept[name].get("out", list(range(_out_size(layer))))
        inputs, handle = _capture(layer, "input")
        produced, handle_out = _capture(layer, "output")
        expected, handle_ref = _capture(reference_modules[name], "output")
        gram = moment = None
        err_before = total = 0.0
        try:
            with torch.no_grad():
                for x, mask in zip(batches, masks, strict=True):
                    pruned(x), original(x)
                    if gram is None and not _plain(layer, inputs["value"], produced["value"]):
                        break
                    a = _rows(layer, inputs["value"])
                    y = _targets(layer, expected["value"])[:, outputs]
                    before = _targets(layer, produced["value"])
                    if mask is not None and len(mask) == len(a):  # a layer applied per token: real tokens only
                        a, y, before = a[mask], y[mask], before[mask]
                    if layer.bias is not None:
                        a = torch.cat([a, torch.ones(len(a), 1)], dim=1)
                    a, y = a.double(), y.double()
                    gram = a.T @ a if gram is None else gram + a.T @ a
                    moment = a.T @ y if moment is None else moment + a.T @ y
                    err_before += float(((before.double() - y) ** 2).sum())
                    total += float((y**2).sum())
        finally:
            handle.remove(), handle_out.remove(), handle_ref.remove()
        if gram is None:  # not a plain conv: left as it is
            continue
        damping = ridge * float(gram.diagonal().mean())
        solution = torch.linalg.solve(gram + damping * torch.eye(len(gram), dtype=gram.dtype), moment).float()
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.copy_(solution[-1])
                solution = solution[:-1]
            layer.weight.copy_(solution.T.reshape(layer.weight.shape))
        report[name] = {"relative_error_before": (err_before / max(total, 1e-12)) ** 0.5}
    return report


def _out_size(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv and linear layers in the order the forward pass runs them (module order can differ)."""
    names = {module: name for name, module in model.named_modules()}
    order: list[str] = []
    forward_with_layer_hook(model, example, lambda m, i, o: order.append(names[m]))
    return list(dict.fromkeys(order))
