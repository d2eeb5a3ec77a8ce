"""Stage 3: whole residual blocks removed (depth pruning), where a model's latency is in its layer count.

A residual block computes ``x + f(x)`` (or ``act(x + f(x))``); without ``f`` it passes its input on, so the block
can go entirely: its layers, their launches and their memory traffic. On a small input a model's time is mostly
per-layer overhead that no channel cut removes. EfficientNet-Lite0 at 64×64 on this CPU needed 85% of its MACs
cut to run 2x faster, while bypassing 9 of its 16 blocks alone ran 1.87x faster (measured by hand: README,
"Depth"). The plan names the blocks (``notes["dropped_blocks"]``); apply_plan bypasses them before any channel cut.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from edgeprune.errors import BadInput


class Bypass(nn.Module):
    """What stands in for a removed residual block: its input, unchanged (extra arguments, such as a block's
    drop-connect rate, are ignored). Exporters see no node at all."""

    def forward(self, x, *args, **kwargs):
        return x


def residual_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The names of the blocks that are residual, innermost first in forward order.

    A block is residual when, with every parameter and buffer it holds set to zero, it returns its input unchanged
    on the example: ``x + f(x)`` with ``f`` zeroed is ``x`` (and ``relu(x)`` is ``x`` after a ReLU). A block that
    is not residual returns zeros or a constant. The test runs the block's own code, so it needs no knowledge of
    its class. Only blocks holding a convolution or a linear layer count (an activation passes the test too), and
    of nested residual modules only the innermost (a stage of residual blocks is itself residual)."""
    calls: dict[nn.Module, tuple] = {}

    def record_inputs(module, args, kwargs):  # copied before the forward pass: in-place ops may change them later
        if module not in calls:
            calls[module] = (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), kwargs, None)

    def record_output(module, args, output):
        if calls[module][2] is None:
            calls[module] = (*calls[module][:2], output.clone() if isinstance(output, torch.Tensor) else output)

    modules = dict(model.named_modules())
    computes = {n: m for n, m in modules.items() if n and _holds_layers(m)}
    handles = [m.register_forward_pre_hook(record_inputs, with_kwargs=True) for m in computes.values()]
    handles += [m.register_forward_hook(record_output) for m in computes.values()]
    # Random images, not the example: from zeros, the blocks of many models see all-zero inputs, which tell nothing
    if example.is_floating_point():
        example = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    found = [name for name, module in computes.items() if module in calls and _passes_input(module, *calls[module])]
    innermost = [n for n in found if not any(other.startswith(n + ".") for other in found)]
    order = {module: i for i, module in enumerate(calls)}
    return sorted(innermost, key=lambda n: order[modules[n]])


def _holds_layers(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear) for m in module.modules())


def _passes_input(module: nn.Module, args: tuple, kwargs: dict, output) -> bool:
    if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
        return False
    x = args[0]
    if output.shape != x.shape or not x.is_floating_point() or not x.abs().sum():
        return False
    zeroed = copy.deepcopy(module).eval()
    with torch.no_grad():
        for tensor in [*zeroed.parameters(), *zeroed.buffers()]:
            if tensor.is_floating_point():
                tensor.zero_()
        try:
            passed = zeroed(*args, **kwargs)
        except Exception:  # whatever the block's own code raises with zero weights: not known to be residual
            return False
    return isinstance(passed, torch.Tensor) and passed.shape == x.shape and torch.allclose(passed, x, atol=1e-5)


def drop_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace, in place, the named blocks of ``model`` by a Bypass; return the model."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise BadInput(
                f"plan removes block '{name}', which the model does not have; the plan was made for another model"
            )
        if isinstance(modules[name], Bypass):  # removed already (a plan replayed on a model without it)
            continue
        model.set_submodule(name, Bypass())
    return model


def with_dropped(plan, names: list[str]):
    """The plan with its removed blocks noted, so that apply_plan on the original model bypasses them first."""
    return replace(plan, notes={**plan.notes, "dropped_blocks": list(names)}) if names else plan
