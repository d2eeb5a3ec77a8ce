"""Stage 2: the model's layers as numbers, so that the cost of any candidate plan is computed without pruning a copy.

A plan sets one width per group. torch-pruning's dependency graph says which layers' output channels and input
channels each group cuts (and by how many indices per channel: a flatten before a linear layer turns one channel into
H·W inputs). From that, every conv and linear layer's widths under a plan follow by a matrix product, and so do its
MACs, its parameters and the bytes it moves. Counting MACs by pruning a copy costs a second on a large model; this
costs microseconds, which is what lets the allocator weigh thousands of single-step choices.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeprune.graph.groups import build_graph, prunable_groups
from edgeprune.graph.modules import forward_with_layer_hook
from edgeprune.graph.plan import Plan

KINDS = ("conv", "depthwise", "linear")
# Bytes per activation and per weight at a target precision; dynamic-range int8 keeps float activations.
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8-dynamic": 4, "int8": 1}
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8-dynamic": 1, "int8": 1}


@dataclass(frozen=True)
class Layer:
    """One conv or linear layer of the unpruned model, and where its input and output sit in the graph."""

    name: str
    kind: str  # one of KINDS
    in_channels: int
    out_channels: int
    groups: int
    kernel: int  # kernel positions (kh·kw); 1 for linear
    in_positions: int  # input elements per input channel (H·W, or tokens for a linear layer)
    out_positions: int  # output elements per output channel


@dataclass
class Structure:
    """Layers, prunable groups, and how each group's width reaches each layer.

    ``out_cut[l, g]`` (``in_cut[l, g]``) is how many of layer l's output (input) channels go with one channel of
    group g, so removing r channels of g removes ``r · out_cut[l, g]`` of them.
    """

    layers: list[Layer]
    groups: list[str]
    channels: np.ndarray  # per group, unpruned
    out_cut: np.ndarray
    in_cut: np.ndarray
    input_shape: tuple[int, ...]

    @property
    def key(self) -> str:
        """A digest of what latency depends on (layers, widths, groups, input shape), not of the weight values."""
        text = repr((self.input_shape, self.groups, self.channels.tolist(), self.layers))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def full_widths(self) -> np.ndarray:
        return self.channels.astype(float)

    def widths_of(self, plan: Plan) -> np.ndarray:
        """The per-group widths of ``plan``, in this structure's group order."""
        kept = {g.module: g.width for g in plan.groups}
        return np.array([kept.get(name, c) for name, c in zip(self.groups, self.channels, strict=True)], dtype=float)

    def layer_widths(self, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each layer's (input channels, output channels) when the groups have ``widths``."""
        removed = self.channels - widths
        base_in = np.array([layer.in_channels for layer in self.layers], dtype=float)
        base_out = np.array([layer.out_channels for layer in self.layers], dtype=float)
        outs = np.maximum(base_out - self.out_cut @ removed, 1)
        # torch-pruning cuts a depthwise conv's input channels with its output channels (one handler for both), so
        # the dependency graph lists no input cut: its input is as wide as its output, times its multiplier.
        depthwise = np.array([layer.kind == "depthwise" for layer in self.layers])
        ins = np.where(depthwise, outs * base_in / base_out, np.maximum(base_in - self.in_cut @ removed, 1))
        return ins, outs

    def per_layer(self, widths: np.ndarray, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer under ``widths``: MACs, parameters, and bytes moved (input, output and weights)."""
        ins, outs = self.layer_widths(widths)
        kernel = np.array([layer.kernel for layer in self.layers], dtype=float)
        depthwise = np.array([layer.kind == "depthwise" for layer in self.layers])
        groups = np.array([layer.groups for layer in self.layers], dtype=float)
        # A depthwise conv keeps one input channel per output channel however many are pruned.
        per_output = np.where(depthwise, 1.0, ins / groups)
        weights = outs * per_output * kernel
        out_positions = np.array([layer.out_positions for layer in self.layers], dtype=float)
        in_positions = np.array([layer.in_positions for layer in self.layers], dtype=float)
        macs = out_positions * weights
        moved = (ins * in_positions + outs * out_positions) * BYTES_PER_ELEMENT.get(precision, 4)
        moved = moved + weights * WEIGHT_BYTES.get(precision, 4)
        return macs, weights + outs, moved  # + outs: the biases (or the norm's shift that folds into them)

    def macs(self, widths: np.ndarray) -> float:
        return float(self.per_layer(widths)[0].sum())

    def params(self, widths: np.ndarray) -> float:
        return float(self.per_layer(widths)[1].sum())

    def peak_activation_bytes(self, widths: np.ndarray, precision: str = "fp32") -> float:
        """A layer-local estimate of peak activation memory: the largest input + output of one layer, doubled for
        the residual or skip tensors that stay alive alongside (the artifact's exact figure comes from its graph)."""
        ins, outs = self.layer_widths(widths)
        in_positions = np.array([layer.in_positions for layer in self.layers], dtype=float)
        out_positions = np.array([layer.out_positions for layer in self.layers], dtype=float)
        live = (ins * in_positions + outs * out_positions) * BYTES_PER_ELEMENT.get(precision, 4)
        return float(2 * live.max()) if len(live) else 0.0

    def widths_matching(self, other: Structure, widths: np.ndarray) -> np.ndarray | None:
        """This structure's group widths under which each of its layers is as wide as the layer of the same name in
        ``other`` under ``widths``: ``other`` is the same model with more layers (before residual blocks were
        removed). None where a group cuts no layer that ``other`` has."""
        _, outs = other.layer_widths(widths)
        index = {layer.name: i for i, layer in enumerate(other.layers)}
        mapped = self.full_widths()
        for g in range(len(self.groups)):
            cut = [i for i in np.nonzero(self.out_cut[:, g])[0] if self.layers[i].name in index]
            if not cut:
                if self.out_cut[:, g].any():
                    return None
                continue  # a group kept whole cuts nothing: its width does not matter
            there = index[self.layers[cut[0]].name]
            removed = other.layers[there].out_channels - outs[there]
            mapped[g] = self.channels[g] - removed / self.out_cut[cut[0], g]
        return np.clip(np.round(mapped), 1, self.channels)

    def kind_mask(self, kind: str) -> np.ndarray:
        return np.array([layer.kind == kind for layer in self.layers])


def read_structure(model: nn.Module, example: torch.Tensor, group_names: list[str] | None = None) -> Structure:
    """The structure of ``model`` for the prunable groups ``group_names`` (the scorer's groups, in its order; None:
    every prunable group, as ``edgeprune profile`` and an unrestricted build list them)."""
    shapes: dict[nn.Module, tuple[int, int]] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        channels_in = module.in_channels if isinstance(module, nn.modules.conv._ConvNd) else module.in_features
        channels_out = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
        batch = example.shape[0]  # costs are per sample, as count_macs_params counts them
        shapes[module] = (inputs[0].numel() // (channels_in * batch), output.numel() // (channels_out * batch))

    forward_with_layer_hook(model, example, hook)
    names = {module: name for name, module in model.named_modules()}
    layers, index = [], {}
    for module, (in_positions, out_positions) in shapes.items():
        index[module] = len(layers)
        layers.append(_layer(names.get(module, "?"), module, in_positions, out_positions))

    graph = build_graph(model, example)
    by_name = dict(prunable_groups(model, graph))
    group_names = list(by_name) if group_names is None else group_names
    out_cut = np.zeros((len(layers), len(group_names)))
    in_cut = np.zeros((len(layers), len(group_names)))
    channels = np.zeros(len(group_names))
    modules = dict(model.named_modules())
    for g, name in enumerate(group_names):
        if name not in by_name:
            raise ValueError(f"group '{name}' is not a prunable group of this model")
        root = modules[name]
        channels[g] = graph.get_pruner_of_module(root).get_out_channels(root)
        for item in by_name[name] or ():  # None: torch-pruning cannot follow it; kept whole, it cuts nothing
            module = item.dep.target.module
            if module not in index:
                continue
            side = out_cut if item.dep.handler.__name__ == "prune_out_channels" else in_cut
            side[index[module], g] = max(side[index[module], g], len(item.idxs) / channels[g])
    return Structure(layers, list(group_names), channels, out_cut, in_cut, tuple(example.shape))


def _layer(name: str, module: nn.Module, in_positions: int, out_positions: int) -> Layer:
    if isinstance(module, nn.Linear):
        return Layer(name, "linear", module.in_features, module.out_features, 1, 1, in_positions, out_positions)
    depthwise = module.groups > 1 and module.groups == module.in_channels
    kernel = math.prod(module.kernel_size)
    return Layer(name, "depthwise" if depthwise else "conv", module.in_channels, module.out_channels, module.groups,
                 kernel, in_positions, out_positions)  # fmt: skip
