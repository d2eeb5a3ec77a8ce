"""Stage 2: a latency model per layer, fitted to the runtime's own per-node times.

A handful of whole-model p50s cannot tell apart what costs what: one cost per conv MAC, one per depthwise MAC and
one per byte misprice a 7×7 depthwise conv, a squeeze-excite block, or a 1×1 conv at a width the runtime's kernels
handle badly. OpenVINO's per-node counters (``PERF_COUNT``) say where each profiled plan's time went, node by node.
From them every conv and linear layer gets a fit of its own, time ≈ a + b × (its roofline time at these widths),
which learns what this runtime does with that layer's shapes. The nodes that work on a layer's output (norms,
activations that were not fused, pooling, layout reorders) are tabulated by that output's width, since their cost
jumps where the runtime changes layout; what no layer could be found for is fitted against the activation elements
the layers write. The node times are taken in a run of their own, since counters slow a model down; the whole
model's measured p50 is then fitted as offset + scale × the sum of the nodes (``LatencyModel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The share of the node times that must fall to the conv and linear layers for the per-layer fit to be used: node
# names are the exporter's module scopes, and a runtime that renamed them would leave everything unattributed.
MIN_ATTRIBUTED = 0.5
COMPUTE_KINDS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}  # OpenVINO's types


@dataclass(frozen=True)
class Attribution:
    """One profile's node times: each layer's own (``own``), the nodes that work on each layer's output
    (``after``: norms, activations that were not fused, layout reorders), and what no layer could be found for."""

    own: list[float]
    after: list[float]
    rest: float


def attribute(nodes: list[tuple], layer_names: list[str]) -> Attribution:
    """Split node times (``Backend.node_times``: name, kind, ms and, where the runtime gave them, the executed nodes
    each one reads) among the layers, in ``layer_names`` order.

    An ONNX node's name is its module scope, then the op: "/blocks/blocks.5/blocks.5.0/conv_pw/Conv/WithoutBiases"
    belongs to the layer "blocks.5.0.conv_pw"; OpenVINO keeps the name on the node it fused the conv's bias and
    activation into. Any other node (a reorder, whatever it is named; a norm; "Subtract_77405", a decomposed
    LayerNorm's, with no scope at all) belongs to the layer whose output it works on: the first layer found walking
    its inputs back. Its cost follows that layer's output width, and not smoothly: OpenVINO lays a ConvNeXt stream
    of 32 channels out in 16-channel blocks and reorders it around every LayerNorm, one of 24 or 40 it does not.
    """
    index = {name: i for i, name in enumerate(layer_names)}
    own, after, rest = [0.0] * len(layer_names), [0.0] * len(layer_names), 0.0
    direct = {node[0]: None if node[1] == "Reorder" else _layer_of(node[0], index) for node in nodes}
    inputs = {node[0]: node[3] if len(node) > 3 else () for node in nodes}
    # A conv or matmul no layer's name was found on is work of its own, not after the layer before it; nor is what
    # follows it: the walk stops there, and both stay in the rest.
    owners = {node[0]: None for node in nodes if node[1] in COMPUTE_KINDS and direct[node[0]] is None}

    def owner(start: str) -> int | None:
        """The first layer found walking back from ``start``, first inputs first; iterative, since a chain of
        unnamed nodes can be deeper than Python's recursion."""
        stack, visiting = [start], set()
        while stack:
            name = stack[-1]
            if name in owners or direct.get(name) is not None:
                owners.setdefault(name, direct.get(name))
                stack.pop()
            elif name not in visiting:  # first its inputs (a cycle cannot occur in a compiled graph; it is not walked)
                visiting.add(name)
                stack += [i for i in reversed(inputs.get(name, ())) if i not in owners and i not in visiting]
            else:
                owners[name] = next(
                    (o for i in inputs.get(name, ()) if (o := owners.get(i, direct.get(i))) is not None), None
                )
                stack.pop()
        return owners[start]

    for name, _, ms, *_ in nodes:
        if direct[name] is not None:
            own[direct[name]] += ms
        elif (layer := owner(name)) is not None:
            after[layer] += ms
        else:
            rest += ms
    return Attribution(own, after, rest)


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
class WidthTable:
    """Per layer, a cost measured at each of the output widths seen (rows padded: widths with inf, costs with the
    row's last). Read at any width: as measured there, else interpolated between the nearest measured widths, else
    (outside them) the nearest one's scaled by the width, as elementwise work scales."""

    widths: np.ndarray  # layers × most widths seen, ascending
    ms: np.ndarray
    counts: np.ndarray  # widths seen per layer

    @classmethod
    def tabulate(cls, outs: np.ndarray, ms: np.ndarray) -> WidthTable:
        """From samples × layers of output widths and costs: each layer's median cost at each width."""
        rows = []
        for j in range(outs.shape[1]):
            seen = np.unique(outs[:, j])
            rows.append((seen, np.array([np.median(ms[outs[:, j] == w, j]) for w in seen])))
        most = max(len(seen) for seen, _ in rows)
        widths = np.array([np.pad(seen, (0, most - len(seen)), constant_values=np.inf) for seen, _ in rows])
        costs = np.array([np.pad(cost, (0, most - len(cost)), mode="edge") for _, cost in rows])
        return cls(widths, costs, np.array([len(seen) for seen, _ in rows]))

    def at(self, outs: np.ndarray) -> np.ndarray:
        """Each layer's cost at its output width in ``outs``; vectorised, since the allocator prices thousands of
        trial plans."""
        rows = np.arange(len(outs))
        last = self.counts - 1
        above = np.clip((self.widths <= outs[:, None]).sum(axis=1), 1, last.clip(min=1))  # first measured width > out
        below = above - 1
        w0, w1 = self.widths[rows, below], self.widths[rows, np.minimum(above, last)]
        c0, c1 = self.ms[rows, below], self.ms[rows, np.minimum(above, last)]
        span = np.where(w1 > w0, w1 - w0, 1.0)
        inside = c0 + (c1 - c0) * np.clip((outs - w0) / span, 0.0, 1.0)
        first, final = self.widths[:, 0], self.widths[rows, last]
        return np.where(outs < first, self.ms[:, 0] * outs / first,
                        np.where(outs > final, self.ms[rows, last] * outs / final, inside))  # fmt: skip


@dataclass(frozen=True)
class LayerwiseFit:
    """Per layer, its own nodes' ms ≈ intercept + slope × roofline ms, and the ms of the nodes after it as measured
    at its output widths (``after``); the rest ≈ rest[0] + rest[1] × activation elements."""

    intercept: np.ndarray
    slope: np.ndarray
    rest: tuple[float, float]
    after: WidthTable | None = None

    def nodes_ms(self, roofline: np.ndarray, activations: float, outs: np.ndarray) -> float:
        """The summed node time of a plan whose layers have these roofline times, write these activations, and
        have these output widths."""
        after = self.after.at(np.asarray(outs, float)).sum() if self.after is not None else 0.0
        return float((self.intercept + self.slope * roofline).sum() + after + self.rest[0] + self.rest[1] * activations)

    def fixed_ms(self) -> float:
        """The part that no width changes."""
        return float(self.intercept.sum() + self.rest[0])


def fit_layerwise(roofline: np.ndarray, layer_ms: np.ndarray, activations: np.ndarray, rest_ms: np.ndarray,
                  after_ms: np.ndarray | None = None, outs: np.ndarray | None = None):  # fmt: skip
    """Fit each layer's column of ``layer_ms`` (samples × layers) against the same column of ``roofline``; tabulate
    each layer's ``after_ms`` by its output width in ``outs`` (same shape); fit the rest against ``activations``.
    None when too little of the time was attributed to layers to trust it."""
    after_ms = np.zeros_like(layer_ms) if after_ms is None else after_ms
    # Judged on the layers' own nodes, found by name: one named layer early on would otherwise claim every node
    # after it through the graph, renamed ones included.
    if layer_ms.sum() < MIN_ATTRIBUTED * (layer_ms.sum() + after_ms.sum() + rest_ms.sum()):
        return None
    intercept, slope = _line_fits(roofline, layer_ms)
    rest_intercept, rest_slope = _line_fits(activations[:, None], rest_ms[:, None])
    # A table, not a line: these costs jump at the widths the runtime lays out differently (attribute's docstring),
    # which a line through the measured widths would smear over all of them.
    after = WidthTable.tabulate(np.asarray(outs, float), after_ms) if outs is not None and after_ms.any() else None
    return LayerwiseFit(intercept, slope, (float(rest_intercept[0]), float(rest_slope[0])), after)


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
