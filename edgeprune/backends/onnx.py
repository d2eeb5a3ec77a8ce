"""ONNX: the exchange format every other backend starts from. Exported by torch, simplified with onnxsim.

As a backend of its own, the artifact is run and timed with ONNX Runtime on this machine's CPU.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from torch import nn

from edgeprune.backends.base import Artifact, Backend
from edgeprune.errors import BadInput
from edgeprune.target import Target

OPSET = 17


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``model`` to ONNX at ``path`` and simplify it with onnxsim (constant folding, shape inference).

    The TorchScript exporter is used: it handles every CNN we prune and writes the same bytes for the same model.
    An export that fails is a BadInput naming the operator problem, since the model is the user's input.
    """
    import onnx
    import onnxsim

    model = model.eval()
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), opset_version=OPSET, dynamo=False,
                input_names=["input"], output_names=["output"], do_constant_folding=True,
            )  # fmt: skip
    except Exception as exc:
        raise BadInput(f"ONNX export failed: {' '.join(str(exc).split())[:300]}") from None
    graph = onnx.load(str(path))
    simplified, ok = onnxsim.simplify(graph)
    # onnxsim checks its result by running both graphs; keep the original when it cannot prove them equal.
    onnx.save(simplified if ok else graph, str(path))
    return path


class OnnxBackend(Backend):
    """Simplified ONNX, timed with ONNX Runtime."""

    name = "onnx"
    runtime = "onnxruntime"
    package = "onnxruntime"
    extra = "all"

    def export(
        self, model: nn.Module, example: torch.Tensor, out_dir: Path, target: Target,
        calibration: torch.Tensor | None = None,
    ) -> Artifact:  # fmt: skip
        self.require()
        path = export_onnx(model, example, Path(out_dir) / "model.onnx")
        return Artifact(backend=self.name, model=path, files={"onnx": path})
