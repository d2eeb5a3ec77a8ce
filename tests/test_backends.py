"""Stage 4: export to ONNX and OpenVINO IR, run the artifact against PyTorch, time it with the standalone runner."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.backends import Measurement, get_backend
from edgeprune.backends.onnx import OnnxBackend, export_onnx
from edgeprune.backends.openvino import OpenVinoBackend
from edgeprune.device import RUNNER, DeviceError, LocalDevice
from edgeprune.errors import BadInput
from edgeprune.model import load_model
from edgeprune.target import BenchmarkSettings, Target, load_target

SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def target() -> Target:
    return dataclasses.replace(load_target("x86-openvino"), benchmark=BenchmarkSettings(warmup=2, iterations=10))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    module = load_model("timm:mobilenetv3_small_100", input_shape=SHAPE).module
    with torch.no_grad():  # trained-looking BN: timm's zero-initialised ones would hide a wrong channel order
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + 1]) for i in range(len(inputs))])


@pytest.fixture(scope="module")
def ov_dirs(tmp_path_factory, model, target):
    """The model exported for an fp32 and an fp16 OpenVINO target, each with its artifact."""
    out = {}
    for precision in ("fp32", "fp16"):
        directory = tmp_path_factory.mktemp(f"ov-{precision}")
        tgt = dataclasses.replace(target, precision=precision)
        out[precision] = (OpenVinoBackend().export(model, torch.zeros(SHAPE), directory, tgt), tgt, directory)
    return out


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, model, target):
    return OnnxBackend().export(model, torch.zeros(SHAPE), tmp_path_factory.mktemp("onnx"), target)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_measurement(measurement: Measurement, target: Target, runtime: str) -> None:
    assert isinstance(measurement, Measurement)
    assert 0 < measurement.p50 <= measurement.p90 <= measurement.p99
    assert measurement.mean > 0
    # The target's 10 runs are a minimum; the window's time floor makes a small model run many more.
    assert measurement.iterations > target.benchmark.iterations == 10
    assert measurement.iterations * measurement.mean >= 0.9 * target.benchmark.min_timed_s * 1000
    assert measurement.measured_on == "local"
    assert measurement.threads == target.threads
    assert measurement.runtime.startswith(runtime)
    assert measurement.peak_memory_mb is not None and measurement.peak_memory_mb >= 0
    assert measurement.latency()["p50"] == measurement.p50


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------- OpenVINO


def test_openvino_export_writes_ir_and_onnx(ov_dirs):
    artifact, _, directory = ov_dirs["fp32"]
    assert sorted(p.name for p in directory.iterdir()) == ["model.bin", "model.onnx", "model.xml"]
    assert artifact.backend == "openvino"
    assert artifact.model == directory / "model.xml"
    assert artifact.files == {
        "model": directory / "model.xml", "weights": directory / "model.bin", "onnx": directory / "model.onnx",
    }  # fmt: skip
    assert all(p.stat().st_size > 0 for p in artifact.files.values())
    # What ships is the IR (xml + bin); the ONNX beside it is an intermediate and not counted.
    shipped = (directory / "model.xml").stat().st_size + (directory / "model.bin").stat().st_size
    assert artifact.size_bytes() == shipped


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_openvino_validate_matches_pytorch(ov_dirs, inputs, reference, precision):
    artifact, tgt, _ = ov_dirs[precision]
    validation = OpenVinoBackend().validate(artifact, inputs, reference, tgt)
    assert validation.samples == 3
    assert validation.ok
    assert validation.max_abs_err < validation.atol
    assert validation.atol == pytest.approx({"fp32": 1e-3, "fp16": 3e-2}[precision] * max(1.0, reference.abs().max()))
    assert validation.to_dict()["ok"] is True


def test_openvino_benchmark(ov_dirs, target):
    artifact, _, _ = ov_dirs["fp32"]
    _check_measurement(OpenVinoBackend().benchmark(artifact, SHAPE, target, LocalDevice()), target, "openvino")


def test_benchmark_with_a_reference_times_both_in_one_run(ov_dirs, target):
    """A speedup is compared as a ratio measured in one run: the reference is timed in alternating blocks of runs."""
    small, _, _ = ov_dirs["fp32"]
    big, _, _ = ov_dirs["fp16"]  # another artifact of the same model, as the reference
    measurement = OpenVinoBackend().benchmark(small, SHAPE, target, LocalDevice(), reference=big)
    _check_measurement(measurement, target, "openvino")
    assert measurement.reference_p50 is not None and measurement.reference_p50 > 0
    assert measurement.latency()["reference_p50"] == measurement.reference_p50
    # Normalised to a baseline measured at twice the reference's p50 (a slow spell then): the candidate's p50
    # doubles too, since the ratio is what was measured.
    assert measurement.comparable_p50(2 * measurement.reference_p50) == pytest.approx(2 * measurement.p50)
    assert OpenVinoBackend().benchmark(small, SHAPE, target, LocalDevice()).reference_p50 is None


def test_the_profiles_benchmark_settings_reach_the_runner(ov_dirs, target):
    """Windows and time floors are the profile's: two windows of at least 0.2 s each, both reported."""
    small, _, _ = ov_dirs["fp32"]
    settings = BenchmarkSettings(warmup=2, iterations=10, windows=2, min_timed_s=0.2, min_warmup_s=0.0)
    measurement = OpenVinoBackend().benchmark(small, SHAPE, dataclasses.replace(target, benchmark=settings))
    assert len(measurement.windows_p50) == 2 and measurement.p50 == min(measurement.windows_p50)
    assert measurement.iterations * measurement.mean >= 0.9 * 0.2 * 1000


def test_comparable_p50_without_a_reference_is_the_p50():
    m = Measurement(p50=2.0, p90=3.0, p99=4.0, mean=2.5, iterations=10, measured_on="local", runtime="x", threads=1)
    assert m.comparable_p50(123.0) == 2.0
    with_reference = dataclasses.replace(m, reference_p50=4.0)
    assert with_reference.comparable_p50(8.0) == pytest.approx(4.0)  # 2 ms beside 4 ms, baseline 8 ms: 4 ms


def _constant_types(xml: Path) -> Counter:
    import openvino as ov

    graph = ov.Core().read_model(str(xml))
    constants = [op for op in graph.get_ops() if op.get_type_name() == "Constant"]
    return Counter(op.get_output_element_type(0).get_type_name() for op in constants)


def test_fp32_ir_holds_fp32_weights_and_fp16_half(ov_dirs, model):
    fp32, _, _ = ov_dirs["fp32"]
    fp16, _, _ = ov_dirs["fp16"]
    params = _params(model)
    fp32_bin, fp16_bin = fp32.files["weights"].stat().st_size, fp16.files["weights"].stat().st_size
    # BN is folded into the convs on export, so the IR holds about as many numbers as the model has parameters.
    assert 0.9 * 4 * params < fp32_bin < 1.05 * 4 * params
    assert 0.45 < fp16_bin / fp32_bin < 0.55
    fp32_types, fp16_types = _constant_types(fp32.model), _constant_types(fp16.model)
    assert fp32_types["f32"] > 0 and fp32_types["f16"] == 0
    assert fp16_types["f16"] > fp16_types["f32"]


def test_int8_openvino_target_is_bad_input(model, target, tmp_path):
    with pytest.raises(BadInput) as info:
        OpenVinoBackend().export(model, torch.zeros(SHAPE), tmp_path, dataclasses.replace(target, precision="int8"))
    assert "int8" in _one_line(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# ---------------------------------------------------------------------------------------------------- ONNX


def test_export_onnx_is_valid_and_matches_pytorch(model, inputs, reference, tmp_path):
    import onnx
    import onnxruntime as ort

    path = export_onnx(model, torch.zeros(SHAPE), tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert [i.name for i in graph.graph.input] == ["input"] and [o.name for o in graph.graph.output] == ["output"]
    assert not any(node.op_type == "BatchNormalization" for node in graph.graph.node)  # folded
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in range(len(inputs)):
        (out,) = session.run(None, {"input": inputs[i : i + 1].numpy()})
        np.testing.assert_allclose(out, reference[i : i + 1].numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_backend_validate_and_benchmark(onnx_artifact, inputs, reference, target):
    assert onnx_artifact.backend == "onnx" and onnx_artifact.model.name == "model.onnx"
    backend = OnnxBackend()
    validation = backend.validate(onnx_artifact, inputs, reference, target)
    assert validation.ok and validation.max_abs_err < validation.atol and validation.samples == 3
    _check_measurement(backend.benchmark(onnx_artifact, SHAPE, target), target, "onnxruntime")


@pytest.mark.parametrize("backend_name", ["openvino", "onnx"])
def test_validation_that_must_fail(backend_name, ov_dirs, onnx_artifact, inputs, reference, target):
    artifact = ov_dirs["fp32"][0] if backend_name == "openvino" else onnx_artifact
    validation = get_backend(backend_name).validate(artifact, inputs, reference + 1.0, target)
    assert not validation.ok
    assert validation.max_abs_err == pytest.approx(1.0, abs=1e-3)
    assert validation.to_dict()["ok"] is False
    # a single sample off by a little more than the tolerance is enough
    shifted = reference.clone()
    shifted[2, 7] += 5 * validation.atol
    assert not get_backend(backend_name).validate(artifact, inputs, shifted, target).ok


# ---------------------------------------------------------------------------------------------------- get_backend


def test_get_backend_known_and_unknown():
    assert isinstance(get_backend("openvino"), OpenVinoBackend) and get_backend("openvino").available()
    assert isinstance(get_backend("onnx"), OnnxBackend) and get_backend("onnx").available()
    assert get_backend("tflite").name == "tflite" and get_backend("tensorrt").name == "tensorrt"
    # TensorRT does not run here: a build for it measures on a device, or estimates.
    assert not get_backend("tensorrt").can_measure_here() and get_backend("openvino").can_measure_here()
    with pytest.raises(BadInput) as info:
        get_backend("nope")
    assert "unknown backend 'nope'" in _one_line(info.value)


# ---------------------------------------------------------------------------------------------------- runner


def test_runner_with_missing_model_fails_cleanly(tmp_path):
    missing = tmp_path / "nothing.xml"
    for runtime in ("openvino", "onnxruntime"):
        args = ["--runtime", runtime, "--model", str(missing), "--shape", "1,3,8,8", "--iterations", "2"]
        done = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert str(missing) in json.loads(done.stdout.strip().splitlines()[-1])["error"]
        with pytest.raises(DeviceError) as info:
            LocalDevice().run_runner(args)
        message = _one_line(info.value)
        assert "runner failed on local" in message and str(missing) in message
        assert info.value.exit_code == 2
    with pytest.raises(DeviceError) as info:  # an argument the runner refuses: argparse's last stderr line
        LocalDevice().run_runner(["--runtime", "nope", "--model", "x", "--shape", "1"])
    assert "invalid choice" in _one_line(info.value)


def _imported_modules(args: list[str]) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(RUNNER), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "latency_ms" in json.loads(done.stdout.strip().splitlines()[-1])
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")} - {
        "imported package"
    }


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_runner_never_imports_torch(runtime, ov_dirs, onnx_artifact):
    model = ov_dirs["fp32"][0].model if runtime == "openvino" else onnx_artifact.model
    args = ["--runtime", runtime, "--model", str(model), "--shape", "1,3,64,64", "--iterations", "1"]
    modules = _imported_modules(args)
    assert runtime in modules and "numpy" in modules  # the list is real
    assert not {m for m in modules if m.split(".")[0] in ("torch", "edgeprune", "timm", "torch_pruning")}


def test_runner_through_a_symlinked_directory(ov_dirs, tmp_path):
    link = tmp_path / "backends"
    link.symlink_to(RUNNER.parent, target_is_directory=True)
    args = ["--runtime", "openvino", "--model", str(ov_dirs["fp32"][0].model), "--shape", "1,3,64,64"]
    done = subprocess.run([sys.executable, str(link / "runner.py"), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout


def test_peak_memory_is_measured_when_the_caller_is_large(onnx_artifact, target):
    ballast = np.ones(64 * 2**20)  # 512 MiB resident in this process, larger than the runner's peak
    measurement = OnnxBackend().benchmark(onnx_artifact, SHAPE, target)
    assert ballast[-1] == 1.0
    assert measurement.peak_memory_mb > 1.0  # ONNX Runtime loaded a 10 MB model: its footprint is not zero


# ---------------------------------------------------------------------------------------------------- torchvision shim


def test_frozen_batchnorm_equals_batchnorm_in_eval():
    from edgeprune._torchvision_shim import FrozenBatchNorm2d

    generator = torch.Generator().manual_seed(3)
    bn = nn.BatchNorm2d(6, eps=1e-3)
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(torch.randn(6, generator=generator))
        bn.running_var.copy_(torch.rand(6, generator=generator) + 0.1)
    frozen = FrozenBatchNorm2d(6, eps=1e-3)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, name).copy_(getattr(bn, name).detach())
    assert not list(frozen.parameters())  # frozen: buffers only, nothing an optimiser could move
    x = torch.randn(2, 6, 5, 5, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(FrozenBatchNorm2d(6)(x), nn.BatchNorm2d(6).eval()(x), rtol=1e-6, atol=1e-6)


def test_frozen_batchnorm_loads_a_batchnorm_state_dict():
    from edgeprune._torchvision_shim import FrozenBatchNorm2d

    bn = nn.BatchNorm2d(4)
    generator = torch.Generator().manual_seed(0)
    for tensor in (bn.weight.data, bn.bias.data, bn.running_mean):  # not the defaults a load that did nothing keeps
        tensor.copy_(torch.randn(4, generator=generator))
    bn.running_var.copy_(torch.rand(4, generator=generator) + 0.1)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is dropped, not an unexpected key
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(frozen, name), getattr(bn, name).detach()), name


def test_torchvision_placeholders_raise_import_error_in_a_subprocess():
    script = textwrap.dedent(
        """
        import json, sys
        from edgeprune._torchvision_shim import FrozenBatchNorm2d, _ShimFinder, ensure_torchvision_importable
        in_use = ensure_torchvision_importable()
        result = {"in_use": in_use, "again": ensure_torchvision_importable()}
        result["finders"] = sum(isinstance(f, _ShimFinder) for f in sys.meta_path)
        if in_use:
            import torchvision
            import torchvision.transforms as T
            from torchvision.ops.misc import FrozenBatchNorm2d as Frozen
            result["frozen_is_real"] = Frozen is FrozenBatchNorm2d
            result["version"] = torchvision.__version__
            try:
                T.Compose([])
                result["error"] = None
            except ImportError as exc:
                result["error"] = str(exc)
            try:
                from torchvision.transforms import InterpolationMode
                InterpolationMode.BILINEAR()
            except ImportError as exc:
                result["nested"] = str(exc)
        print(json.dumps(result))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["in_use"]:
        pytest.skip("a working torchvision is installed here: the stand-in is not used")
    assert result["again"] is True and result["finders"] == 1
    assert result["frozen_is_real"] is True
    assert "shim" in result["version"]
    assert result["error"] and "torchvision" in result["error"] and "Compose" in result["error"]
    assert "torchvision" in result["nested"] and "BILINEAR" in result["nested"]
