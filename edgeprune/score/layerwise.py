"""Stage 2: a latency model per layer, fitted to the runtime's own per-node times.

A handful of whole-model p50s cannot tell apart what costs what: one cost per conv MAC, one per depthwise MAC and
one per byte misprice a 7×7 depthwise conv, a squeeze-excite block, or a 1×1 conv at a width the runtime's kernels
handle badly. OpenVINO's per-node counters (``PERF_COUNT``) say where each profiled plan's time went, node by node.
From them every conv and linear layer gets a fit of its own, time ≈ a + b × (its roofline time at these widths),
which learns what this runtime does with that layer's shapes. Nodes that belong to no conv or linear layer (norms,
activations that were not fused, pooling, reorders) are fitted together against the activation elements the layers
write. The node times are taken in a run of their own, since counters slow a model down; the whole model's measured
p50 is then fitted as offset + scale × the sum of the nodes (``LatencyModel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The share of the node times that must fall to the conv and linear layers for the per-layer fit to be used: node
# names are the exporter's module scopes, and a runtime that renamed them would leave everything unattributed.
MIN_ATTRIBUTED = 0.5


def attribute(nodes: list[tuple[str, str, float]], layer_names: list[str]) -> tuple[list[float], float]:
    """Split node times into per-layer times (in ``layer_names`` order) and the rest.

    An ONNX node's name is its module scope, then the op: "/blocks/blocks.5/blocks.5.0/conv_pw/Conv/WithoutBiases"
    belongs to the layer "blocks.5.0.conv_pw"; OpenVINO keeps the name on the node it fused the conv's bias and
    activation into. A reorder (a layout change between two nodes) is counted as the rest, whatever it is named.
    """
    index = {name: i for i, name in enumerate(layer_names)}
    per_layer, rest = [0.0] * len(layer_names), 0.0
    for name, kind, ms in nodes:
        layer = None if kind == "Reorder" else _layer_of(name, index)
        if layer is None:
            rest += ms
        else:
            per_layer[layer] += ms
    return per_layer, rest


def _layer_of(node_name: str, index: dict[str, int]) -> int | None:
    # The exporter names a module inside a ModuleList or Sequential by its container's scope and its index
    # ("blocks.5" under "blocks", "blocks.5.0" under "blocks.5"), any other by its attribute name ("conv_pw"):
    # "/stages/stages.0/blocks/blocks.0/mlp/fc1/MatMul" is the module "stages.0.blocks.0.mlp.fc1".
    scopes, found = [], None
    for part in node_name.split("/")[1:]:
        if scopes and part.startswith(scopes[-1] + "."):
            scopes[-1] = part
        else:
            scopes.append(part)
        found = index.get(".".join(scopes), found)
    return found


@dataclass(frozen=True)
class LayerwiseFit:
    """Per layer, ms ≈ intercept + slope × roofline ms; the rest ≈ rest[0] + rest[1] × activation elements."""

    intercept: np.ndarray
    slope: np.ndarray
    rest: tuple[float, float]

    def nodes_ms(self, roofline: np.ndarray, activations: float) -> float:
        """The summed node time of a plan whose layers have these roofline times and write these activations."""
        return float((self.intercept + self.slope * roofline).sum() + self.rest[0] + self.rest[1] * activations)

    def fixed_ms(self) -> float:
        """The part that no width changes."""
        return float(self.intercept.sum() + self.rest[0])


def fit_layerwise(roofline: np.ndarray, layer_ms: np.ndarray, activations: np.ndarray, rest_ms: np.ndarray):
    """Fit each layer's column of ``layer_ms`` (samples × layers) against the same column of ``roofline``, and the
    rest against ``activations``; None when too little of the time was attributed to layers to trust it."""
    if layer_ms.sum() < MIN_ATTRIBUTED * (layer_ms.sum() + rest_ms.sum()):
        return None
    intercept, slope = _line_fits(roofline, layer_ms)
    rest_intercept, rest_slope = _line_fits(activations[:, None], rest_ms[:, None])
    return LayerwiseFit(intercept, slope, (float(rest_intercept[0]), float(rest_slope[0])))


def _line_fits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column by column, y ≈ a + b·x with a, b ≥ 0 (least squares). From one sample, or where x never varied, the
    line through the origin: the layer's measured time scaled by its roofline, which still prices a cut of it.
    Closed form, all columns at once: the loop refits after every measured round."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    through_origin = np.maximum((x * y).sum(axis=0) / np.maximum((x * x).sum(axis=0), 1e-30), 0.0)
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    spread = ((x - mean_x) ** 2).sum(axis=0)
    varied = spread > 1e-6 * np.maximum((x * x).sum(axis=0), 1e-30)
    slope = np.maximum(((x - mean_x) * (y - mean_y)).sum(axis=0) / np.where(varied, spread, 1.0), 0.0)
    intercept = mean_y - slope * mean_x
    line = varied & (intercept >= 0)  # a negative intercept: the best line with a ≥ 0 goes through the origin
    return np.where(line, intercept, 0.0), np.where(line, slope, through_origin)
