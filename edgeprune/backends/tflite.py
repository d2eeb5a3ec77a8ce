"""LiteRT (TFLite) for ARM targets: converted by litert-torch (no TensorFlow), quantised by ai-edge-quantizer.

The fp32 model comes straight from litert-torch; the other precisions are ai-edge-quantizer's recipes applied to it,
which is how Google's own tool chain quantises a LiteRT model since litert-torch 0.9 dropped TensorFlow's converter:

- fp16: weights stored as float16 (FLOAT_CASTING of conv and fully-connected weights), activations float32;
- int8-dynamic: dynamic-range int8, per-channel int8 weights, activations quantised on the fly (no calibration);
- int8: full integer, int8 weights and activations with ranges calibrated on the build's calibration images.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.backends.base import Artifact, Backend
from edgeprune.backends.onnx import export_onnx
from edgeprune.errors import BadInput
from edgeprune.target import Target

# Full-integer calibration: enough images to see the activations' ranges, few enough to keep a round fast.
CALIBRATION_SAMPLES = 32


def _quiet():
    """The converters print pages of MLIR and absl logging; a build prints its own progress lines instead."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO())


def _convert_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    import litert_torch

    out, err = _quiet()
    try:
        with warnings.catch_warnings(), out, err:
            warnings.simplefilter("ignore")
            litert_torch.convert(model.eval(), (example,)).export(str(path))
    except Exception as exc:
        raise BadInput(f"LiteRT conversion (litert-torch) failed: {' '.join(str(exc).split())[:300]}") from None


def _input_name(path: Path) -> tuple[str, str]:
    """The signature key and its input's name, e.g. ('serving_default', 'args_0'), read from the model itself."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def _quantize(fp32: Path, path: Path, precision: str, calibration: np.ndarray | None) -> None:
    from ai_edge_quantizer import quantizer, recipe

    engine = quantizer.Quantizer(str(fp32))
    if precision == "fp16":
        names = quantizer.qtyping.TFLOperationName
        for op in (names.FULLY_CONNECTED, names.CONV_2D, names.DEPTHWISE_CONV_2D, names.CONV_2D_TRANSPOSE):
            engine.add_weight_only_config(regex=".*", operation_name=op, num_bits=16,
                                          algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)  # fmt: skip
        result = engine.quantize()
    elif precision == "int8-dynamic":
        engine.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        result = engine.quantize()
    else:  # int8: full integer, calibrated
        if calibration is None or not len(calibration):
            raise BadInput("a full int8 LiteRT build needs calibration images: pass --calib DATA")
        engine.load_quantization_recipe(recipe.static_wi8_ai8())
        key, name = _input_name(fp32)
        dtype = calibration.dtype if calibration.dtype.kind in "iu" else np.float32  # token ids stay integers
        samples = [{name: calibration[i : i + 1].astype(dtype)} for i in range(len(calibration))]
        result = engine.quantize(engine.calibrate({key: samples}))
    result.export_model(str(path), overwrite=True)


class LiteRtBackend(Backend):
    """PyTorch → .tflite with litert-torch (+ ai-edge-quantizer), run with the ai-edge-litert interpreter (XNNPACK)."""

    name = "tflite"
    runtime = "litert"
    package = "litert_torch"
    extra = "tflite"

    def available(self) -> bool:
        import importlib.util

        return all(importlib.util.find_spec(p) for p in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"))

    def export(
        self, model: nn.Module, example: torch.Tensor, out_dir: Path, target: Target,
        calibration: torch.Tensor | None = None,
    ) -> Artifact:  # fmt: skip
        self.require()
        out_dir = Path(out_dir)
        # The simplified ONNX is what the memory budget reads its tensor liveness from, as for every backend.
        onnx_path = export_onnx(model, example, out_dir / "model.onnx")
        path = out_dir / "model.tflite"
        if target.precision == "fp32":
            _convert_fp32(model, example, path)
        else:
            fp32 = out_dir / "model_fp32.tflite"
            _convert_fp32(model, example, fp32)
            data = None if calibration is None else calibration[:CALIBRATION_SAMPLES].detach().cpu().numpy()
            out, err = _quiet()
            try:
                with warnings.catch_warnings(), out, err:
                    warnings.simplefilter("ignore")
                    _quantize(fp32, path, target.precision, data)
            except BadInput:
                raise
            except Exception as exc:
                reason = " ".join(str(exc).split())[:300]
                raise BadInput(f"LiteRT {target.precision} quantisation failed: {reason}") from None
            finally:
                fp32.unlink(missing_ok=True)
        return Artifact(backend=self.name, model=path, files={"model": path, "onnx": onnx_path})
