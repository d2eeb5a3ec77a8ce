"""Run an exported model with its runtime: outputs for validation, and latency for the benchmark.

A standalone script on purpose: it imports only numpy and the runtime (OpenVINO, ONNX Runtime, LiteRT), never torch
or edgeprune, so the same file runs here in a subprocess and on a device that has only the runtime. It prints one
JSON object on stdout.

    python runner.py --runtime openvino --model model.xml --shape 1,3,224,224 --threads 2 --precision fp32 \
        --warmup 30 --iterations 200 [--inputs in.npy --outputs out.npy]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Run as a script, Python puts this file's folder first on sys.path, where edgeprune's own openvino.py and onnx.py
# would shadow the real packages; drop it before importing any runtime.
# Compared after resolving links: Python resolves sys.path[0], __file__ keeps the path as the caller gave it.
if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import numpy as np  # noqa: E402


def _memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB, from /proc; ru_maxrss where there is no /proc.

    ru_maxrss is no good on Linux here: it carries the parent's peak across fork and exec, so a runner started by a
    large process (the build, holding torch and the model) would report no growth at all. VmHWM starts at exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _openvino(model: str, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        # Without an explicit hint the CPU plugin may run bf16 on CPUs that have it, which is not what fp32 means.
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "fp16": "f16"}.get(precision, "f32"),
    }
    compiled = core.compile_model(core.read_model(model), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer([x])[compiled.output(0)])

    return run, f"openvino {ov.get_version()}", core.get_property("CPU", "FULL_DEVICE_NAME")


def _onnxruntime(model: str, threads: int, precision: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run, f"onnxruntime {ort.__version__}", "CPU"


RUNTIMES = {"openvino": _openvino, "onnxruntime": _onnxruntime}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _warm_up(run, x: np.ndarray, count: int, min_seconds: float) -> int:
    """Run at least ``count`` times and at least ``min_seconds``: benchmark_app and trtexec floor warm-up by time
    too, since 30 runs of a 0.4 ms model are 12 ms, too short to reach steady state. Returns the runs made."""
    runs, start = 0, time.perf_counter()
    while runs < count or time.perf_counter() - start < min_seconds:
        run(x)
        runs += 1
    return runs


def _statistics(windows: list[list[float]], warmed: int) -> dict:
    times = min(windows, key=lambda w: float(np.percentile(w, 50)))
    return {
        "p50": float(np.percentile(times, 50)),
        "p90": float(np.percentile(times, 90)),
        "p99": float(np.percentile(times, 99)),
        "mean": float(np.mean(times)),
        "iterations": len(times),
        "warmup": warmed,
        "windows_p50": [float(np.percentile(w, 50)) for w in windows],
    }


def _timed_window(run, x: np.ndarray, iterations: int, min_seconds: float) -> list[float]:
    """Per-run latencies in ms: at least ``iterations`` runs and at least ``min_seconds`` of them."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iterations or (time.perf_counter() - start < min_seconds and len(times) < 10**6):
        began = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - began) * 1000.0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", required=True, choices=sorted(RUNTIMES))
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="input shape, e.g. 1,3,224,224")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=0, help="0: no benchmark")
    parser.add_argument("--min-warmup-s", type=float, default=0.0, help="warm up for at least this long")
    parser.add_argument("--min-timed-s", type=float, default=0.0, help="time each window for at least this long")
    parser.add_argument("--windows", type=int, default=1, help="timed windows; the one with the lowest p50 counts")
    parser.add_argument("--reference", help="a second model timed in alternating windows (e.g. the unpruned one)")
    parser.add_argument("--inputs", help=".npy of N samples to run, batch by batch")
    parser.add_argument("--outputs", help="where to save the outputs for --inputs, as .npy")
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))

    rss_before = _memory_mb("VmRSS")
    try:
        run, runtime, device = RUNTIMES[args.runtime](args.model, args.threads, args.precision)
    except Exception as exc:  # the runtime's message, on one line, for the caller to report
        print(json.dumps({"error": f"{args.runtime} could not load {args.model}: {_one_line(exc)}"}))
        return 3
    result: dict = {"runtime": runtime, "device": device, "threads": args.threads}

    if args.inputs:
        inputs = np.load(args.inputs).astype(np.float32)
        batch = shape[0]
        outputs = [run(np.ascontiguousarray(inputs[i : i + batch])) for i in range(0, len(inputs), batch)]
        np.save(args.outputs, np.concatenate(outputs, axis=0))
        result["outputs"] = args.outputs

    if args.iterations > 0:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        warmed = _warm_up(run, x, args.warmup, args.min_warmup_s)
    # Growth of the process's peak resident memory from before the model was loaded: the runtime's own footprint
    # for this model (weights, compiled kernels, activations), measured, not estimated; taken before a reference
    # model is loaded beside it.
    result["peak_memory_mb"] = max(0.0, _memory_mb("VmHWM") - rss_before)

    if args.iterations > 0:
        runs = {"latency_ms": run}
        if args.reference:
            try:
                runs["reference_latency_ms"] = RUNTIMES[args.runtime](args.reference, args.threads, args.precision)[0]
            except Exception as exc:
                print(json.dumps({"error": f"{args.runtime} could not load {args.reference}: {_one_line(exc)}"}))
                return 3
            _warm_up(runs["reference_latency_ms"], x, args.warmup, args.min_warmup_s)
        # Windows alternate between the model and the reference, so a slow spell of the machine (other tenants,
        # lasting seconds) hits both and their ratio holds. Per model, the window with the lowest p50 counts: a
        # burst of other work only ever adds time, so the quietest window is the best estimate of the device.
        windows: dict[str, list[list[float]]] = {key: [] for key in runs}
        for _ in range(max(1, args.windows)):
            for key, model_run in runs.items():
                windows[key].append(_timed_window(model_run, x, args.iterations, args.min_timed_s))
        for key, timed in windows.items():
            result[key] = _statistics(timed, warmed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
