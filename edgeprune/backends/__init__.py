"""Stage 4: backend exporters, one module each, looked up by the name a target profile gives."""

from __future__ import annotations

from edgeprune.backends.base import Artifact, Backend, Measurement, Validation
from edgeprune.errors import BadInput


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a planned or unknown one is a one-line BadInput."""
    if name == "openvino":
        from edgeprune.backends.openvino import OpenVinoBackend

        return OpenVinoBackend()
    if name == "onnx":
        from edgeprune.backends.onnx import OnnxBackend

        return OnnxBackend()
    if name == "tflite":
        from edgeprune.backends.tflite import LiteRtBackend

        return LiteRtBackend()
    if name == "tensorrt":
        from edgeprune.backends.tensorrt import TensorRtBackend

        return TensorRtBackend()
    raise BadInput(f"unknown backend '{name}'; known: openvino, onnx, tflite, tensorrt")


__all__ = ["Artifact", "Backend", "Measurement", "Validation", "get_backend"]
