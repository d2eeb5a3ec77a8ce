"""`edgeprune bench ARTIFACT --target NAME [--device URL]`: time an artifact that already exists, on the target's
runtime and settings, here or on a board: the on-device latency check of a CI job, without a build.

The backend comes from the artifact's file type (model.xml → openvino, .tflite → tflite, .onnx → the target's
backend when it reads ONNX (onnx, tensorrt), .engine → tensorrt); the input shape from ``--input-shape`` or the
ONNX graph every build leaves beside its artifact.
"""

from __future__ import annotations

from pathlib import Path

from edgeprune.backends import Artifact, get_backend
from edgeprune.device import open_device
from edgeprune.errors import BadInput
from edgeprune.estimate import measuring_device
from edgeprune.target import load_target

BACKEND_OF_SUFFIX = {".xml": "openvino", ".tflite": "tflite", ".engine": "tensorrt"}


def onnx_input_shape(path: Path) -> tuple[int, ...]:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise BadInput(f"{path} is not an ONNX model ({' '.join(str(exc).split())[:120]})") from None
    initializers = {t.name for t in graph.initializer}
    first = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim]
    if not dims or not all(dims):
        raise BadInput(f"{path}'s input has no fixed shape; pass --input-shape 1,3,H,W")
    return tuple(dims)


def run_bench(artifact_path: Path, target_name: str, device_url: str | None = None,
              input_shape: tuple[int, ...] | None = None) -> dict:  # fmt: skip
    """Benchmark ``artifact_path`` with the target's threads, warm-up and iterations; the result as plain data."""
    path = Path(artifact_path)
    if not path.is_file():
        raise BadInput(
            f"artifact {path} does not exist; pass the model file a build wrote (model.xml, model.tflite, …)"
        )
    target = load_target(target_name)
    name = BACKEND_OF_SUFFIX.get(path.suffix.lower())
    if path.suffix.lower() == ".onnx":
        name = target.backend if target.backend in ("onnx", "tensorrt") else "onnx"
    if name is None:
        raise BadInput(f"cannot tell the runtime of {path.name}: expected .xml, .tflite, .onnx or .engine")
    if name != target.backend and not (name == "onnx" and path.suffix.lower() == ".onnx"):
        raise BadInput(f"{path.name} is for {name}, but target '{target.name}' runs {target.backend}")
    backend = get_backend(name)
    backend.require()
    device = measuring_device(open_device(device_url or target.device), backend, target)
    sibling = path if path.suffix.lower() == ".onnx" else path.with_name("model.onnx")
    if input_shape is None:
        if not sibling.is_file():
            raise BadInput(f"no model.onnx beside {path.name} to read the input shape from; pass --input-shape")
        input_shape = onnx_input_shape(sibling)
    artifact = Artifact(backend=name, model=path, files={"onnx": sibling} if sibling.is_file() else {})
    measured = backend.benchmark(artifact, input_shape, target, device)
    return {"artifact": str(path), "target": target.name, "backend": name, "input_shape": list(input_shape),
            "measured_on": measured.measured_on, "runtime": measured.runtime, "threads": measured.threads,
            "latency_ms": measured.latency(), "peak_memory_mb": measured.peak_memory_mb,
            "estimate": measured.measured_on == "estimate"}  # fmt: skip
