"""No device: the build's stand-in for a board that is not reachable (a Jetson from a workstation without TensorRT).

``EstimateDevice`` answers the runner's contract without running the target's runtime:

- latency: a roofline over the exported ONNX graph at the target profile's ``[estimate]`` figures. Each node takes
  max(2·MACs / peak FLOP/s, bytes it reads and writes / memory bandwidth); convolutions and matrix products count
  their MACs, every other node only moves bytes. It is an estimate, never a measurement, and it is labelled so in
  every report (``measured_on: "estimate"``).
- outputs: the same ONNX run with ONNX Runtime on this machine's CPU in fp32, so the exported graph is still checked
  against PyTorch; the target runtime's own numerics (fp16, int8 kernels) are not, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from edgeprune.score.structure import BYTES_PER_ELEMENT, WEIGHT_BYTES
from edgeprune.target import Target

ESTIMATE_LABEL = "estimate"


def _elements(model: onnx.ModelProto) -> dict[str, int]:
    """Element count of every tensor whose shape is known after shape inference, initializers included."""
    counts = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            counts[value.name] = math.prod(d.dim_value for d in dims)
    return counts


def node_macs(node: onnx.NodeProto, elements: dict[str, int], weights: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of a Conv, Gemm or MatMul node (0 for any other): output elements × reduction length."""
    out = elements.get(node.output[0], 0)
    if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in weights:
        shape = weights[node.input[1]]  # Conv: [out, in/groups, kh, kw]; ConvTranspose: [in, out/groups, kh, kw]
        reduction = math.prod(shape[1:]) if node.op_type == "Conv" else shape[0] * math.prod(shape[2:]) // shape[1]
        return out * reduction
    if node.op_type in ("Gemm", "MatMul"):
        for name in node.input[1:2]:
            if name in weights:
                shape = weights[name]
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                return out * (shape[-1] if trans_b else shape[-2] if len(shape) > 1 else shape[0])
    return 0


def graph_roofline_ms(onnx_path: Path, precision: str, peak_gflops: float, memory_gbps: float) -> float:
    """The roofline latency in ms of the ONNX graph at ``onnx_path``, nodes run one after another."""
    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    elements = _elements(model)
    weights = {t.name: tuple(numpy_helper.to_array(t).shape) for t in model.graph.initializer}
    size, weight_size = BYTES_PER_ELEMENT.get(precision, 4), WEIGHT_BYTES.get(precision, 4)
    total = 0.0
    for node in model.graph.node:
        moved = sum(
            elements.get(n, 0) * (weight_size if n in weights else size) for n in [*node.input, *node.output] if n
        )
        compute = 2 * node_macs(node, elements, weights) / (peak_gflops * 1e9)
        total += max(compute, moved / (memory_gbps * 1e9))
    return total * 1e3


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def measuring_device(device, backend, target: Target, say=None):
    """``device``, unless it is this machine and this machine cannot run the backend's runtime (TensorRT on a
    workstation without trtexec): then the estimate stands in, and ``say`` is told so."""
    from edgeprune.device import LocalDevice

    if not isinstance(device, LocalDevice) or backend.can_measure_here():
        return device
    if say:
        say(
            f"no device here runs {backend.name}: latencies are a roofline estimate from {target.name}'s"
            " estimate figures (peak GFLOP/s, memory GB/s), outputs are checked with ONNX Runtime; pass"
            " --device ssh://… to measure on the board"
        )
    return EstimateDevice(target)


@dataclass(frozen=True)
class EstimateDevice:
    """Answers benchmark and validation runs from the ONNX graph: a roofline estimate and ONNX Runtime's outputs."""

    target: Target

    @property
    def label(self) -> str:
        return ESTIMATE_LABEL

    def _onnx(self, model: str) -> Path:
        # Every backend's artifact keeps the simplified ONNX it was made from beside it as model.onnx.
        path = Path(model)
        return path if path.suffix == ".onnx" else path.with_name("model.onnx")

    def latency(self, model: str) -> dict:
        estimate = self.target.estimate
        ms = graph_roofline_ms(self._onnx(model), self.target.precision, estimate.peak_gflops, estimate.memory_gbps)
        return {"p50": ms, "p90": ms, "p99": ms, "mean": ms, "iterations": 0, "warmup": 0, "windows_p50": [ms]}

    def run_runner(self, args: list[str]) -> dict:
        result: dict = {"runtime": "roofline estimate (not measured)", "device": f"{self.target.name} (estimated)",
                        "threads": self.target.threads, "peak_memory_mb": None}  # fmt: skip
        if _flag(args, "--inputs"):
            import onnxruntime as ort

            session = ort.InferenceSession(str(self._onnx(_flag(args, "--model"))), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            inputs = np.load(_flag(args, "--inputs"))
            inputs = inputs.astype(np.int64) if inputs.dtype.kind in "iu" else inputs.astype(np.float32)
            outputs = [session.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))]
            np.save(_flag(args, "--outputs"), np.concatenate(outputs, axis=0))
            result["outputs"] = _flag(args, "--outputs")
            result["outputs_from"] = f"onnxruntime {ort.__version__} (fp32, CPU)"
        if int(_flag(args, "--iterations") or 0) > 0:
            result["latency_ms"] = self.latency(_flag(args, "--model"))
            if _flag(args, "--reference"):
                result["reference_latency_ms"] = self.latency(_flag(args, "--reference"))
        return result
