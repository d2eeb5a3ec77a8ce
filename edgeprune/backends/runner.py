"""Run an exported model with its runtime: outputs for validation, and latency for the benchmark.

One standalone file on purpose: it imports only numpy and the runtime (OpenVINO, ONNX Runtime, LiteRT, trtexec),
never torch or edgeprune, so it runs here in a subprocess and on a device that has only the runtime. It prints one
JSON object on stdout (``python runner.py --help`` lists the flags).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

# Run as a script, this file's folder comes first on sys.path, where edgeprune's openvino.py and onnx.py would shadow
# the real packages. Compared after resolving links: Python resolves sys.path[0], __file__ keeps the caller's path.
if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import numpy as np  # noqa: E402

ALTERNATION_BLOCK = 10  # runs of one model before switching to the other, when a reference is timed alongside


def _memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB, from /proc; ru_maxrss where there is no /proc. On Linux
    ru_maxrss carries the parent's peak across fork and exec (the build's, with torch loaded); VmHWM starts at exec."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _openvino(model: str, threads: int, precision: str, per_node: bool = False):
    import openvino as ov

    core = ov.Core()
    # Without an explicit precision hint the CPU plugin may run bf16 on CPUs that have it, which is not what fp32 means.
    config = {"PERF_COUNT": per_node, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "INFERENCE_PRECISION_HINT": {"fp32": "f32", "fp16": "f16"}.get(precision, "f32")}  # fmt: skip
    compiled = core.compile_model(core.read_model(model), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer([x])[compiled.output(0)])

    ids = compiled.input(0).get_element_type().is_integral()
    run.nodes = lambda: [(p.node_name, p.node_type, p.real_time.total_seconds() * 1e3)
                         for p in request.profiling_info if p.status.name == "EXECUTED"]  # fmt: skip
    run.producers = lambda executed: _executed_producers(compiled.get_runtime_model(), executed)
    return run, f"openvino {ov.get_version()}", core.get_property("CPU", "FULL_DEVICE_NAME"), ids


def _executed_producers(runtime_model, executed: set[str]) -> dict[str, list[str]]:
    """For each executed node of the plugin's graph, the executed nodes whose outputs it reads (through any that did
    not run); the caller walks these back from a reorder or a decomposed norm to a node whose name has its layer."""
    ops = {op.get_friendly_name(): op for op in runtime_model.get_ops()}
    behind: dict[str, list[str]] = {}  # a node that did not run → the executed nodes whose outputs pass through it

    def sources(name: str) -> list[str]:
        found = []
        for source in (i.get_source_output().get_node().get_friendly_name() for i in ops[name].inputs()):
            if source in executed:
                found.append(source)
            elif source in ops:
                if source not in behind:
                    behind[source] = []  # compiled graphs have no cycles; this only bounds the recursion
                    behind[source] = sources(source)
                found += behind[source]
        return found

    return {name: sources(name) for name in executed if name in ops}


def _node_times(model: str, shape: tuple[int, ...], args) -> dict:
    """Each executed node's median time over ``args.node_times`` runs from OpenVINO's counters, in a model compiled
    apart so that they never slow the timing. A reference's nodes are counted in alternating blocks and the median of
    their sum returned beside: a busy spell inflates a run's every node alike, which the caller divides out."""
    models = {"model": model, **({"reference": args.reference} if args.reference else {})}
    runs = {key: _openvino(path, args.threads, args.precision, per_node=True) for key, path in models.items()}
    x = _sample(shape, runs["model"][3])
    for run, *_ in runs.values():
        _timed_window(run, x, args.warmup, args.min_warmup_s)
    times: dict[tuple[str, str], list[float]] = {}
    reference_sums: list[float] = []
    for _ in range(0, args.node_times, ALTERNATION_BLOCK):
        for key, (run, *_) in runs.items():
            for _ in range(ALTERNATION_BLOCK):
                run(x)
                if key == "reference":
                    reference_sums.append(sum(ms for _, _, ms in run.nodes()))
                    continue
                for name, kind, ms in run.nodes():
                    times.setdefault((name, kind), []).append(ms)
    producers = runs["model"][0].producers({name for name, _ in times})
    result: dict = {"nodes": [[name, kind, float(np.median(ms)), producers.get(name, [])]
                              for (name, kind), ms in times.items()]}  # fmt: skip
    if reference_sums:
        result["reference_ms"] = float(np.median(reference_sums))
    return result


def _onnxruntime(model: str, threads: int, precision: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    ids = session.get_inputs()[0].type in ("tensor(int64)", "tensor(int32)")
    return run, f"onnxruntime {ort.__version__}", "CPU", ids


def _litert(model: str, threads: int, precision: str):
    try:  # XNNPACK with the target's threads, as LiteRT's benchmark_model runs it on a board
        from ai_edge_litert import __version__ as version
        from ai_edge_litert.interpreter import Interpreter

        version, options = f"litert {version}", {"experimental_default_delegate_latest_features": True}
    except ImportError:  # many boards ship only the older tflite_runtime wheel; same interpreter API, XNNPACK default
        from tflite_runtime import __version__ as version
        from tflite_runtime.interpreter import Interpreter

        version, options = f"tflite_runtime {version}", {}
    interpreter = Interpreter(model_path=model, num_threads=threads, **options)
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    ids = source["dtype"] in (np.int32, np.int64)  # token ids, not a quantised image

    def run(x: np.ndarray) -> np.ndarray:
        # A fully integer model may take and give int8 tensors: quantise the input and dequantise the output with
        # the model's own scale and zero point, so the caller always sees float32.
        if ids:
            x = x.astype(source["dtype"])
        elif source["dtype"] != np.float32:
            (scale, zero), info = source["quantization"], np.iinfo(source["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(source["dtype"])
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(sink["index"])
        if sink["dtype"] != np.float32:
            scale, zero = sink["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return np.array(y, dtype=np.float32)

    return run, version, "CPU (XNNPACK)", ids


def _sample(shape: tuple[int, ...], ids: bool) -> np.ndarray:
    generator = np.random.default_rng(0)  # the same input on every run of the runner
    # Token ids for a text model: any id is as fast as another, and 1-99 fit every vocabulary.
    return generator.integers(1, 100, shape) if ids else generator.standard_normal(shape).astype(np.float32)


def _load_inputs(path: str) -> np.ndarray:
    inputs = np.load(path)  # saved model inputs: token ids stay int64, anything else becomes float32
    return inputs.astype(np.int64) if inputs.dtype.kind in "iu" else inputs.astype(np.float32)


RUNTIMES = {"openvino": _openvino, "onnxruntime": _onnxruntime, "litert": _litert}

# --- TensorRT: trtexec times engines itself; this runner drives it and reads its report ---------------------------
_TRT_STATISTIC = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-+0-9.eE]+)\s*ms")
_TRT_SECTIONS = {"Latency": "latency", "Enqueue Time": "enqueue", "H2D Latency": "h2d",
                 "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}  # fmt: skip


def parse_trtexec(text: str) -> dict:
    """trtexec's "Performance summary" as numbers: throughput (qps), per section (latency, enqueue, h2d, gpu_compute,
    d2h) min/max/mean/median and each percentile printed (p90, p95, p99; TensorRT before 8.5: p99), total host walltime
    and GPU compute time in s. Log prefixes and other lines are skipped; no summary is a ValueError."""
    if "=== Performance summary ===" not in text:
        raise ValueError("trtexec printed no performance summary")
    summary: dict = {}
    for line in text.split("=== Performance summary ===", 1)[1].splitlines():
        body = re.sub(r"^(\[[^\]]*\]\s*)+", "", line.strip())  # "[11/21/2026-10:00:00] [I] "
        head, _, rest = body.partition(":")
        if head == "Throughput":
            summary["throughput_qps"] = float(rest.split()[0])
        elif head in _TRT_SECTIONS:
            summary[_TRT_SECTIONS[head]] = {f"p{percentile.removesuffix('.0')}" if percentile else name: float(value)
                                            for name, percentile, value in _TRT_STATISTIC.findall(rest)}  # fmt: skip
        elif head in ("Total Host Walltime", "Total GPU Compute Time"):
            summary[head.lower().replace(" ", "_") + "_s"] = float(rest.split()[0])
    if "latency" not in summary or "median" not in summary["latency"]:
        raise ValueError("trtexec's performance summary has no latency line")
    return summary


def _trtexec(arguments: list[str], timeout: float = 1800) -> str:
    done = subprocess.run(["trtexec", *arguments], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stdout.splitlines() if "[E]" in line] or done.stderr.splitlines() or ["?"]
        raise RuntimeError(f"trtexec {arguments[0]} failed: {errors[-1].strip()}")
    return done.stdout


def _engine(model: str, precision: str, folder: str) -> tuple[str, str]:
    """An engine for ``model`` (built from an ONNX with the precision's flags, or as given) and TensorRT's version."""
    if not model.endswith(".onnx"):
        return model, _trt_version(_trtexec([f"--loadEngine={model}", "--iterations=1", "--warmUp=0", "--duration=0"]))
    engine = os.path.join(folder, os.path.basename(model)[: -len(".onnx")] + ".engine")
    flags = {"fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}.get(precision, [])
    calibration = os.path.join(os.path.dirname(model), "calibration.cache")
    if precision == "int8" and "qdq" not in os.path.basename(model) and os.path.exists(calibration):
        flags.append(f"--calib={calibration}")
    out = _trtexec([f"--onnx={model}", f"--saveEngine={engine}", *flags, "--skipInference"])
    return engine, _trt_version(out)


def _trt_version(text: str) -> str:
    found = re.search(r"TensorRT\.trtexec \[TensorRT v(\d+)\]", text)
    if not found:
        return "tensorrt (version not printed)"
    code = found.group(1)  # 8601 for 8.6.1, 100300 for 10.3.0
    major, minor, patch = (code[0], code[1], code[2:]) if len(code) == 4 else (code[:2], code[2:4], code[4:])
    return f"tensorrt {int(major)}.{int(minor)}.{int(patch)}"


def trtexec_main(args) -> int:
    """The runner's contract (outputs for --inputs, latency for --iterations) with trtexec doing the work."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-trt-") as folder:
        try:
            engine, version = _engine(args.model, args.precision, folder)
            reference = _engine(args.reference, args.precision, folder)[0] if args.reference else None
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return _fail(f"tensorrt could not build or load {args.model}", 3, exc)
        result: dict = {"runtime": version, "device": "GPU (TensorRT)", "threads": args.threads, "peak_memory_mb": None}
        if args.inputs:  # one trtexec call per sample
            shape, inputs, outputs = "x".join(args.shape.split(",")), _load_inputs(args.inputs), []
            for i in range(len(inputs)):
                sample, exported = os.path.join(folder, f"in{i}.bin"), os.path.join(folder, f"out{i}.json")
                np.ascontiguousarray(inputs[i : i + 1]).tofile(sample)
                _trtexec([f"--loadEngine={engine}", f"--loadInputs=input:{sample}", f"--exportOutput={exported}",
                          "--iterations=1", "--warmUp=0", "--duration=0", f"--shapes=input:{shape}"])  # fmt: skip
                with open(exported) as f:
                    outputs.append(np.asarray(json.load(f)[0]["values"], dtype=np.float32))
            np.save(args.outputs, np.stack(outputs))
            result["outputs"] = args.outputs
        if args.iterations > 0:
            result.update(_trt_latency(engine, reference, args))
    print(json.dumps(result))
    return 0


def _trt_latency(engine: str, reference: str | None, args) -> dict:
    """latency_ms (and reference_latency_ms) from ``args.windows`` trtexec runs each."""
    # trtexec warms up by time (ms) and floors its run by duration (s); our floors are the same idea.
    warm_ms = max(200, round(args.min_warmup_s * 1000))
    timing = [f"--warmUp={warm_ms}", f"--iterations={args.iterations}", "--percentile=90,95,99",
              f"--duration={max(0, round(args.min_timed_s))}", "--useSpinWait", "--avgRuns=1"]  # fmt: skip
    engines = {"latency_ms": engine, **({"reference_latency_ms": reference} if reference else {})}
    windows: dict[str, list[dict]] = {key: [] for key in engines}
    for _ in range(max(1, args.windows)):
        for key, path in engines.items():
            windows[key].append(parse_trtexec(_trtexec([f"--loadEngine={path}", *timing])))
    result = {}
    for key, summaries in windows.items():  # the window with the lowest median counts
        summary = min(summaries, key=lambda s: s["latency"]["median"])
        latency, p50s = summary["latency"], [s["latency"]["median"] for s in summaries]
        iterations = round(summary.get("throughput_qps", 0.0) * summary.get("total_host_walltime_s", 0.0))
        result[key] = {"p50": latency["median"], "p90": latency.get("p90", latency.get("p99", latency["max"])),
                       "p99": latency.get("p99", latency["max"]), "mean": latency["mean"], "iterations": iterations,
                       "warmup": warm_ms, "windows_p50": p50s, "trtexec": summary}  # fmt: skip
    return result


def _timed_window(run, x: np.ndarray, iterations: int, min_seconds: float) -> list[float]:
    """Per-run latencies in ms: at least ``iterations`` runs and at least ``min_seconds`` of them. Warm-up too is
    floored by time, as in benchmark_app and trtexec: 30 runs of a 0.4 ms model are too short to reach steady state."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iterations or (time.perf_counter() - start < min_seconds and len(times) < 10**6):
        began = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - began) * 1000.0)
    return times


def _alternating_window(runs: list, x: np.ndarray, args) -> list[list[float]]:
    """One window of a model and its reference, alternating every ALTERNATION_BLOCK runs until each has made its
    iterations and the window has lasted twice its seconds: models timed a few ms apart see more nearly the same
    machine (ratio spread ±6%, against ±27% with half-second windows: tools/bench_repeatability.py). Blocks, not
    single runs: alternating every run makes each evict the other's weights from cache."""
    timed: list[list[float]] = [[] for _ in runs]
    start, seconds = time.perf_counter(), 2 * args.min_timed_s
    while len(timed[0]) < args.iterations or (time.perf_counter() - start < seconds and len(timed[0]) < 10**6):
        for times, model_run in zip(timed, runs, strict=True):
            times += _timed_window(model_run, x, ALTERNATION_BLOCK, 0.0)
    return timed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--runtime", required=True, choices=sorted([*RUNTIMES, "tensorrt"]))
    add("--model", required=True)
    add("--shape", required=True, help="input shape, e.g. 1,3,224,224")
    add("--threads", type=int, default=1)
    add("--precision", default="fp32")
    add("--warmup", type=int, default=0)
    add("--iterations", type=int, default=0, help="0: no benchmark")
    add("--min-warmup-s", type=float, default=0.0, help="warm up for at least this long")
    add("--min-timed-s", type=float, default=0.0, help="time each window for at least this long")
    add("--windows", type=int, default=1, help="timed windows; the one with the lowest p50 counts")
    add("--reference", help="a second model timed alongside in alternating blocks (e.g. the unpruned one)")
    add("--node-times", type=int, default=0, help="openvino: time each node over this many runs")
    add("--inputs", help=".npy of N samples to run, batch by batch")
    add("--outputs", help="where to save the outputs for --inputs, as .npy")
    return parser


def _fail(message: str, code: int, exc: BaseException | None = None) -> int:
    """Print the error (with the exception's message, on one line, for the caller to report) and return ``code``."""
    print(json.dumps({"error": message + (": " + " ".join(str(exc).split()) if exc is not None else "")}))
    return code


def _windows(runs: dict, x: np.ndarray, warmed: int, args) -> dict:
    """Statistics per model over ``args.windows`` windows; the model's quietest window counts for every model."""
    # A burst of other work only ever adds time, so the quietest window is the best estimate of the device.
    windows: dict[str, list[list[float]]] = {key: [] for key in runs}
    for _ in range(max(1, args.windows)):
        if len(runs) == 1:
            windows["latency_ms"].append(_timed_window(runs["latency_ms"], x, args.iterations, args.min_timed_s))
            continue
        for key, timed in zip(runs, _alternating_window(list(runs.values()), x, args), strict=True):
            windows[key].append(timed)
    model = windows["latency_ms"]
    quietest = min(range(len(model)), key=lambda i: float(np.percentile(model[i], 50)))
    # The reference's statistics come from the model's quietest window: the ratio of the two is what a speedup
    # budget compares, and it holds only for times taken side by side.
    result = {}
    for key, timed in windows.items():
        times = timed[quietest]
        result[key] = {**{f"p{q}": float(np.percentile(times, q)) for q in (50, 90, 99)}, "mean": float(np.mean(times)),
                       "iterations": len(times), "warmup": warmed,
                       "windows_p50": [float(np.percentile(w, 50)) for w in timed]}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    if args.node_times > 0 and args.runtime != "openvino":
        return _fail(f"--node-times needs OpenVINO's per-node counters, not {args.runtime}'s", 2)
    if args.runtime == "tensorrt":
        return trtexec_main(args)
    # More threads than cores (a 4-core board's profile on a 2-core host) make the model and the reference, each with
    # its own pool, slow each other unevenly: run at most one thread per core here and report the threads used.
    requested, args.threads = args.threads, max(1, min(args.threads, os.cpu_count() or args.threads))
    load = RUNTIMES[args.runtime]
    rss_before = _memory_mb("VmRSS")
    try:
        run, runtime, device, ids = load(args.model, args.threads, args.precision)
    except Exception as exc:  # the runtime's own message
        return _fail(f"{args.runtime} could not load {args.model}", 3, exc)
    result: dict = {"runtime": runtime, "device": device, "threads": args.threads}
    if requested != args.threads:
        result["threads_requested"] = requested
    if args.inputs:
        inputs, batch = _load_inputs(args.inputs), shape[0]
        outputs = [run(np.ascontiguousarray(inputs[i : i + batch])) for i in range(0, len(inputs), batch)]
        np.save(args.outputs, np.concatenate(outputs, axis=0))
        result["outputs"] = args.outputs
    if args.iterations > 0:
        x = _sample(shape, ids)
        warmed = len(_timed_window(run, x, args.warmup, args.min_warmup_s))
    # Growth of the peak resident memory since before the load: the runtime's own footprint for this model (weights,
    # kernels, activations), measured, not estimated; taken before a reference model is loaded beside it.
    result["peak_memory_mb"] = max(0.0, _memory_mb("VmHWM") - rss_before)
    if args.iterations > 0:
        runs = {"latency_ms": run}
        if args.reference:
            try:
                runs["reference_latency_ms"] = load(args.reference, args.threads, args.precision)[0]
            except Exception as exc:
                return _fail(f"{args.runtime} could not load {args.reference}", 3, exc)
            _timed_window(runs["reference_latency_ms"], x, args.warmup, args.min_warmup_s)
        result.update(_windows(runs, x, warmed, args))
    if args.node_times > 0:
        result["node_times"] = _node_times(args.model, shape, args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
