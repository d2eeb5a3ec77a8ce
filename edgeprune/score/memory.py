"""Stage 2: the memory an artifact needs, computed from its graph: weights at the target precision plus the peak of
the activations that are alive at once.

Liveness is read from the exported ONNX graph (the graph every backend starts from): nodes run in the file's
topological order; a tensor is born when its node runs and freed after the last node that reads it; the model's
inputs live from the start and its outputs to the end. The peak of the live bytes is what a runtime that allocates
per tensor needs; runtimes that reuse buffers in place need less, so this is an upper bound on activations. The
peak resident memory measured while the artifact runs (the runner's VmHWM) is reported beside it where the runtime
runs here.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import shape_inference

from edgeprune.score.structure import BYTES_PER_ELEMENT, WEIGHT_BYTES

MIB = 1 << 20


def artifact_memory_mb(onnx_path: Path, precision: str) -> dict:
    """{"weights_mb", "peak_activations_mb", "total_mb"} of the ONNX model at ``onnx_path`` run at ``precision``."""
    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    size = BYTES_PER_ELEMENT.get(precision, 4)
    weights = sum(math.prod(t.dims) for t in model.graph.initializer) * WEIGHT_BYTES.get(precision, 4)
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = math.prod(d.dim_value for d in dims) * size
    last_use: dict[str, int] = {}
    for step, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = step
    outputs = {o.name for o in model.graph.output}
    live = {i.name for i in model.graph.input if i.name not in initializers}
    current = sum(shapes.get(name, 0) for name in live)
    peak = current
    for step, node in enumerate(model.graph.node):
        for name in node.output:
            if name and name not in live:
                live.add(name)
                current += shapes.get(name, 0)
        peak = max(peak, current)
        for name in list(live):
            if last_use.get(name, -1) <= step and name not in outputs:
                live.discard(name)
                current -= shapes.get(name, 0)
    return {"weights_mb": weights / MIB, "peak_activations_mb": peak / MIB, "total_mb": (weights + peak) / MIB}
