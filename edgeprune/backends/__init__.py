"""Stage 4: backend exporters, one module each, looked up by the name a target profile gives."""

from __future__ import annotations

from edgeprune.backends.base import Artifact, Backend, Measurement, Validation
from edgeprune.errors import BadInput

# Backends whose exporters later issues build; a target naming one loads, but a build says plainly it cannot run.
PLANNED = {"tflite": "LiteRT/TFLite", "tensorrt": "TensorRT"}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a planned or unknown one is a one-line BadInput."""
    if name == "openvino":
        from edgeprune.backends.openvino import OpenVinoBackend

        return OpenVinoBackend()
    if name == "onnx":
        from edgeprune.backends.onnx import OnnxBackend

        return OnnxBackend()
    if name in PLANNED:
        raise BadInput(f"the {PLANNED[name]} backend is not built yet; build for an openvino or onnx target for now")
    raise BadInput(f"unknown backend '{name}'; known: openvino, onnx, {', '.join(PLANNED)}")


__all__ = ["Artifact", "Backend", "Measurement", "Validation", "get_backend"]
