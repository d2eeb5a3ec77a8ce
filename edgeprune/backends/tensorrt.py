"""TensorRT for Jetson targets: the simplified ONNX, the board's trtexec command and an int8 calibration cache.

A TensorRT engine is specific to the GPU and TensorRT version it is built on, so what ships is what the board
builds its engine from:

- ``model.onnx``: the simplified ONNX (stage 4's common format);
- ``trtexec.sh``: the exact trtexec commands that build the engine with the target's precision and time it with
  the target's warm-up and iterations (JetPack ships trtexec in /usr/src/tensorrt/bin);
- ``calibration.cache`` (int8): TensorRT's calibration table (``TRT-<version>-EntropyCalibration2``, then one
  ``tensor: scale`` line per tensor, the scale as the big-endian hex of a float32 = amax / 127), made here from the
  build's calibration images with ONNX Runtime's entropy calibrator, so the board needs no calibration data;
- ``model.engine``, where TensorRT's Python API and a GPU are present on this machine.

Measuring runs trtexec on the device (the runner's ``tensorrt`` runtime parses its performance summary). With no
device that has trtexec, the build runs on ``EstimateDevice``: latencies are a roofline estimate from the profile's
figures and the outputs are checked with ONNX Runtime in fp32; the report says both in plain words.
"""

from __future__ import annotations

import importlib.util
import io
import shlex
import shutil
import struct
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.backends.base import Artifact, Backend
from edgeprune.backends.onnx import export_onnx
from edgeprune.errors import BadInput
from edgeprune.target import Target

# The calibration table's header names the TensorRT version that reads it: JetPack 6.1 and 6.2 ship TensorRT 10.3.
TENSORRT_VERSION = "10.3.0"
CALIBRATION_SAMPLES = 64
FLAGS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}  # fp16 as the fallback for int8 layers


def version_code(version: str) -> str:
    """TensorRT's version code in a calibration table: 8.6.1 → 8601, 10.3.0 → 100300."""
    major, minor, patch = (int(p) for p in (version.split(".") + ["0", "0"])[:3])
    return f"{major}{minor}{patch:02d}" if major < 10 else f"{major}{minor:02d}{patch:02d}"


def calibration_table(ranges: dict[str, float], version: str = TENSORRT_VERSION) -> str:
    """The text of a TensorRT entropy calibration cache for per-tensor absolute maxima ``ranges``."""
    lines = [f"TRT-{version_code(version)}-EntropyCalibration2"]
    for name, amax in ranges.items():
        lines.append(f"{name}: {struct.pack('>f', float(amax) / 127.0).hex()}")
    return "\n".join(lines) + "\n"


def read_calibration_table(text: str) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a calibration cache; names may hold spaces or colons, so split on the last ': '."""
    header, *lines = text.strip().splitlines()
    table = {}
    for line in lines:
        name, _, value = line.rpartition(": ")
        table[name] = struct.unpack(">f", bytes.fromhex(value.zfill(8)))[0]
    return header, table


def calibrate(onnx_path: Path, images: np.ndarray) -> dict[str, float]:
    """Per-tensor absolute maxima of every activation of the graph over ``images``, by ONNX Runtime's entropy
    calibrator (the same KL-divergence threshold search as TensorRT's IInt8EntropyCalibrator2)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            dtype = images.dtype if images.dtype.kind in "iu" else np.float32  # token ids stay integers
            self.samples = iter([{"input": images[i : i + 1].astype(dtype)} for i in range(len(images))])

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory(prefix="edgeprune-calib-") as tmp:
        calibrator = create_calibrator(onnx_path, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy)  # fmt: skip
        with redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            calibrator.collect_data(Reader())
            ranges = calibrator.compute_data()
    return {name: float(np.max(np.abs(np.asarray(d.range_value, dtype=np.float64)))) for name, d in ranges.items()}


def trtexec_script(target: Target, shape: tuple[int, ...], int8: bool) -> str:
    """The board's commands: build model.engine from model.onnx, then time it as edgeprune's runner would."""
    build = ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", *FLAGS[target.precision]]
    if int8:
        build.append("--calib=calibration.cache")
    time_it = ["trtexec", "--loadEngine=model.engine", f"--shapes=input:{'x'.join(map(str, shape))}", "--warmUp=500",
               f"--iterations={target.benchmark.iterations}", "--percentile=90,95,99", "--useSpinWait"]  # fmt: skip
    return "\n".join([
        "#!/bin/sh",
        f"# Made by edgeprune for {target.name} ({target.precision}); run on the board, in this folder.",
        "# TensorRT 10.x (JetPack 6): 11.x removed --fp16, --int8 and --calib in favour of strongly typed ONNX.",
        "set -e",
        'PATH="$PATH:/usr/src/tensorrt/bin"',
        shlex.join(build),
        shlex.join(time_it),
        "",
    ])  # fmt: skip


def build_engine(onnx_path: Path, engine_path: Path, precision: str, cache: Path | None) -> None:
    """Build a serialized engine with TensorRT's Python API (10.x), int8 from the calibration cache: the calibrator
    returns the cache, so TensorRT reads its scales instead of asking for batches. Needs a GPU; not run in CI."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise BadInput(f"TensorRT could not parse {onnx_path.name}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":

        class CacheCalibrator(trt.IInt8EntropyCalibrator2):
            def get_batch_size(self) -> int:
                return 1

            def get_batch(self, names):
                return None  # no batches: every scale comes from the cache

            def read_calibration_cache(self):
                return cache.read_bytes()

            def write_calibration_cache(self, data) -> None:
                pass

        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = CacheCalibrator()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BadInput(f"TensorRT could not build an engine from {onnx_path.name}")
    engine_path.write_bytes(bytes(serialized))


def has_gpu_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt as trt

        return trt.Builder(trt.Logger(trt.Logger.ERROR)) is not None
    except Exception:  # no CUDA driver or device: the Python package imports but cannot build
        return False


class TensorRtBackend(Backend):
    """ONNX + trtexec.sh + calibration cache for the board; the runner's ``tensorrt`` runtime times it there."""

    name = "tensorrt"
    runtime = "tensorrt"
    package = "onnxruntime"  # what the board-ready files need here; TensorRT itself runs on the device
    extra = "tensorrt"

    def can_measure_here(self) -> bool:
        return shutil.which("trtexec") is not None

    def export(
        self, model: nn.Module, example: torch.Tensor, out_dir: Path, target: Target,
        calibration: torch.Tensor | None = None,
    ) -> Artifact:  # fmt: skip
        int8 = target.precision.startswith("int8")
        if target.precision == "int8-dynamic":
            raise BadInput("TensorRT has no dynamic-range int8; use int8 (calibrated) or fp16 for a tensorrt target")
        if int8 and (calibration is None or not len(calibration)):
            raise BadInput("an int8 TensorRT build needs calibration images: pass --calib DATA")
        out_dir = Path(out_dir)
        onnx_path = export_onnx(model, example, out_dir / "model.onnx")
        files = {"onnx": onnx_path, "trtexec": out_dir / "trtexec.sh"}
        if int8:
            images = calibration[:CALIBRATION_SAMPLES].detach().cpu().numpy()
            files["calibration"] = out_dir / "calibration.cache"
            files["calibration"].write_text(calibration_table(calibrate(onnx_path, images)))
        files["trtexec"].write_text(trtexec_script(target, tuple(example.shape), int8))
        files["trtexec"].chmod(0o755)
        if has_gpu_tensorrt():
            files["engine"] = out_dir / "model.engine"
            build_engine(onnx_path, files["engine"], target.precision, files.get("calibration"))
        return Artifact(backend=self.name, model=onnx_path, files=files)
