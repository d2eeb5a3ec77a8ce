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
import re
import resource
import subprocess
import sys
import tempfile
import time

# Run as a script, Python puts this file's folder first on sys.path, where edgeprune's own openvino.py and onnx.py
# would shadow the real packages; drop it before importing any runtime.
# Compared after resolving links: Python resolves sys.path[0], __file__ keeps the path as the caller gave it.
if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import numpy as np  # noqa: E402

ALTERNATION_BLOCK = 10  # runs of one model before switching to the other, when a reference is timed alongside


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


def _openvino(model: str, threads: int, precision: str, per_node: bool = False):
    import openvino as ov

    core = ov.Core()
    config = {
        "PERF_COUNT": per_node,
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

    ids = compiled.input(0).get_element_type().is_integral()
    run.nodes = lambda: [(p.node_name, p.node_type, p.real_time.total_seconds() * 1e3)
                         for p in request.profiling_info if p.status.name == "EXECUTED"]  # fmt: skip
    run.producers = lambda executed: _executed_producers(compiled.get_runtime_model(), executed)
    return run, f"openvino {ov.get_version()}", core.get_property("CPU", "FULL_DEVICE_NAME"), ids


def _executed_producers(runtime_model, executed: set[str]) -> dict[str, list[str]]:
    """For each executed node of the plugin's own graph, the executed nodes whose outputs it reads (through any
    that did not run, such as in-place reshapes). A reorder or a decomposed norm carries no module scope in its
    name; the caller finds the layer it belongs to by walking these edges back to one that does."""
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
    """Each executed node's median time over ``args.node_times`` runs, from OpenVINO's own per-node counters: which
    layers the time goes to, which a latency model of the whole network cannot tell apart from a few totals. In a
    model compiled of its own, with the same settings as the timed one, so that the counters never slow the timing.

    With ``args.reference``, the reference's nodes are counted in alternating blocks of runs too, and the median of
    its summed node time is returned beside: on a shared machine a busy spell inflates every node of one run by the
    same factor, which the caller divides out as it does for the p50s."""
    runs = {"model": _openvino(model, args.threads, args.precision, per_node=True)}
    if args.reference:
        runs["reference"] = _openvino(args.reference, args.threads, args.precision, per_node=True)
    generator = np.random.default_rng(0)
    ids = runs["model"][3]
    x = generator.integers(1, 100, shape) if ids else generator.standard_normal(shape).astype(np.float32)
    for run, *_ in runs.values():
        _warm_up(run, x, args.warmup, args.min_warmup_s)
    times: dict[tuple[str, str], list[float]] = {}
    reference_sums: list[float] = []
    for _ in range(0, args.node_times, ALTERNATION_BLOCK):
        for key, (run, *_) in runs.items():
            for _ in range(ALTERNATION_BLOCK):
                run(x)
                nodes = run.nodes()
                if key == "reference":
                    reference_sums.append(sum(ms for _, _, ms in nodes))
                    continue
                for name, kind, ms in nodes:
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
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    ids = session.get_inputs()[0].type in ("tensor(int64)", "tensor(int32)")
    return run, f"onnxruntime {ort.__version__}", "CPU", ids


def _litert(model: str, threads: int, precision: str):
    try:
        from ai_edge_litert import __version__ as version
        from ai_edge_litert.interpreter import Interpreter

        # XNNPACK with the target's threads, as LiteRT's benchmark_model runs it on a board.
        interpreter = Interpreter(
            model_path=model, num_threads=threads, experimental_default_delegate_latest_features=True
        )
        version = f"litert {version}"
    except ImportError:  # many boards ship only the older tflite_runtime wheel; same interpreter API, XNNPACK default
        from tflite_runtime import __version__ as version
        from tflite_runtime.interpreter import Interpreter

        interpreter = Interpreter(model_path=model, num_threads=threads)
        version = f"tflite_runtime {version}"
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    ids = source["dtype"] in (np.int32, np.int64)  # token ids, not a quantised image

    def run(x: np.ndarray) -> np.ndarray:
        # A fully integer model may take and give int8 tensors: quantise the input and dequantise the output with
        # the model's own scale and zero point, so the caller always sees float32.
        if ids:
            x = x.astype(source["dtype"])
        elif source["dtype"] != np.float32:
            scale, zero = source["quantization"]
            info = np.iinfo(source["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(source["dtype"])
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(sink["index"])
        if sink["dtype"] != np.float32:
            scale, zero = sink["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return np.array(y, dtype=np.float32)

    return run, version, "CPU (XNNPACK)", ids


def _load_inputs(path: str) -> np.ndarray:
    """Saved model inputs: token ids stay int64, anything else becomes float32."""
    inputs = np.load(path)
    return inputs.astype(np.int64) if inputs.dtype.kind in "iu" else inputs.astype(np.float32)


RUNTIMES = {"openvino": _openvino, "onnxruntime": _onnxruntime, "litert": _litert}


# --- TensorRT: trtexec times engines itself; this runner drives it and reads its report ---------------------------

_TRT_STATISTIC = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-+0-9.eE]+)\s*ms")
_TRT_SECTIONS = {"Latency": "latency", "Enqueue Time": "enqueue", "H2D Latency": "h2d",
                 "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}  # fmt: skip


def parse_trtexec(text: str) -> dict:
    """trtexec's "Performance summary" as numbers: throughput (qps), and per section (latency, enqueue, h2d,
    gpu_compute, d2h) min/max/mean/median and every percentile printed (p90, p95, p99 from TensorRT 8.5 on, p99 only
    before), total host walltime and GPU compute time in s. Log prefixes ([date] [I]) and unknown lines are skipped;
    text without a summary is a ValueError."""
    if "=== Performance summary ===" not in text:
        raise ValueError("trtexec printed no performance summary")
    summary: dict = {}
    for line in text.split("=== Performance summary ===", 1)[1].splitlines():
        body = re.sub(r"^(\[[^\]]*\]\s*)+", "", line.strip())  # "[11/21/2026-10:00:00] [I] "
        head, _, rest = body.partition(":")
        if head == "Throughput":
            summary["throughput_qps"] = float(rest.split()[0])
        elif head in _TRT_SECTIONS:
            stats = {}
            for name, percentile, value in _TRT_STATISTIC.findall(rest):
                stats[f"p{percentile.removesuffix('.0')}" if percentile else name] = float(value)
            summary[_TRT_SECTIONS[head]] = stats
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
    """An engine file for ``model`` (built from an ONNX with the precision's flags, or used as given) and the
    TensorRT version trtexec reports."""
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


def _trt_statistics(summary: dict, warmed_ms: int) -> dict:
    latency = summary["latency"]
    iterations = round(summary.get("throughput_qps", 0.0) * summary.get("total_host_walltime_s", 0.0))
    return {"p50": latency["median"], "p90": latency.get("p90", latency.get("p99", latency["max"])),
            "p99": latency.get("p99", latency["max"]), "mean": latency["mean"], "iterations": iterations,
            "warmup": warmed_ms, "windows_p50": [latency["median"]], "trtexec": summary}  # fmt: skip


def trtexec_main(args) -> int:
    """The runner's contract (outputs for --inputs, latency for --iterations) with trtexec doing the work."""
    shape = "x".join(args.shape.split(","))
    with tempfile.TemporaryDirectory(prefix="edgeprune-trt-") as folder:
        try:
            engine, version = _engine(args.model, args.precision, folder)
            reference = _engine(args.reference, args.precision, folder)[0] if args.reference else None
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(json.dumps({"error": f"tensorrt could not build or load {args.model}: {_one_line(exc)}"}))
            return 3
        result: dict = {"runtime": version, "device": "GPU (TensorRT)", "threads": args.threads, "peak_memory_mb": None}
        if args.inputs:
            inputs, outputs = _load_inputs(args.inputs), []
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
            # trtexec warms up by time (ms) and floors its run by duration (s); our floors are the same idea.
            warm_ms = max(200, round(args.min_warmup_s * 1000))
            timing = [f"--warmUp={warm_ms}", f"--iterations={args.iterations}", "--percentile=90,95,99",
                      f"--duration={max(0, round(args.min_timed_s))}", "--useSpinWait", "--avgRuns=1"]  # fmt: skip
            windows: dict[str, list[dict]] = {"latency_ms": []}
            if reference:
                windows["reference_latency_ms"] = []
            for _ in range(max(1, args.windows)):
                for key, path in (("latency_ms", engine), ("reference_latency_ms", reference)):
                    if key in windows:
                        windows[key].append(parse_trtexec(_trtexec([f"--loadEngine={path}", *timing])))
            for key, summaries in windows.items():
                best = min(summaries, key=lambda s: s["latency"]["median"])
                result[key] = _trt_statistics(best, warm_ms)
                result[key]["windows_p50"] = [s["latency"]["median"] for s in summaries]
    print(json.dumps(result))
    return 0


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


def _statistics(windows: list[list[float]], warmed: int, chosen: int) -> dict:
    """Statistics of window ``chosen`` (the model's quietest, for the model and its reference alike)."""
    times = windows[chosen]
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


def _alternating_window(runs: list, x: np.ndarray, args) -> list[list[float]]:
    """One window of a model and its reference, alternating every ALTERNATION_BLOCK runs until each has made its
    iterations and the window has lasted its seconds (both doubled: two models share it).

    On a shared machine the speed wanders by tens of percent within seconds; the model and the reference timed in
    blocks a few ms apart see more nearly the same machine than windows of half a second each (measured in one
    process on one pair: the ratio spread ±6% with blocks, ±27% with windows; across separate benchmarks, where
    the machine's drift dominates, 59% against 68%: tools/bench_repeatability.py). Blocks, not single runs:
    alternating every run makes each model evict the other's weights from cache, which inflates the smaller one."""
    timed: list[list[float]] = [[] for _ in runs]
    start = time.perf_counter()
    while len(timed[0]) < args.iterations or (
        time.perf_counter() - start < 2 * args.min_timed_s and len(timed[0]) < 10**6
    ):
        for times, model_run in zip(timed, runs, strict=True):
            times += _timed_window(model_run, x, ALTERNATION_BLOCK, 0.0)
    return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", required=True, choices=sorted([*RUNTIMES, "tensorrt"]))
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="input shape, e.g. 1,3,224,224")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=0, help="0: no benchmark")
    parser.add_argument("--min-warmup-s", type=float, default=0.0, help="warm up for at least this long")
    parser.add_argument("--min-timed-s", type=float, default=0.0, help="time each window for at least this long")
    parser.add_argument("--windows", type=int, default=1, help="timed windows; the one with the lowest p50 counts")
    parser.add_argument(
        "--reference", help="a second model timed alongside in alternating blocks (e.g. the unpruned one)"
    )
    parser.add_argument("--node-times", type=int, default=0, help="openvino: time each node over this many runs")
    parser.add_argument("--inputs", help=".npy of N samples to run, batch by batch")
    parser.add_argument("--outputs", help="where to save the outputs for --inputs, as .npy")
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    if args.node_times > 0 and args.runtime != "openvino":
        print(json.dumps({"error": f"--node-times needs OpenVINO's per-node counters, not {args.runtime}'s"}))
        return 2
    if args.runtime == "tensorrt":
        return trtexec_main(args)
    # More threads than cores (a 4-core board's profile timed on a 2-core host) oversubscribes the CPU: the model and
    # the reference, each with its own pool, then slow each other unevenly. Run at most one thread per core here and
    # report the threads used.
    requested, args.threads = args.threads, max(1, min(args.threads, os.cpu_count() or args.threads))

    rss_before = _memory_mb("VmRSS")
    try:
        run, runtime, device, ids = RUNTIMES[args.runtime](args.model, args.threads, args.precision)
    except Exception as exc:  # the runtime's message, on one line, for the caller to report
        print(json.dumps({"error": f"{args.runtime} could not load {args.model}: {_one_line(exc)}"}))
        return 3
    result: dict = {"runtime": runtime, "device": device, "threads": args.threads}
    if requested != args.threads:
        result["threads_requested"] = requested

    if args.inputs:
        inputs = _load_inputs(args.inputs)
        batch = shape[0]
        outputs = [run(np.ascontiguousarray(inputs[i : i + batch])) for i in range(0, len(inputs), batch)]
        np.save(args.outputs, np.concatenate(outputs, axis=0))
        result["outputs"] = args.outputs

    if args.iterations > 0:
        generator = np.random.default_rng(0)
        # Token ids for a text model: any id is as fast as another, and 1-99 fit every vocabulary.
        x = generator.integers(1, 100, shape) if ids else generator.standard_normal(shape).astype(np.float32)
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
        # Per model, the window with the lowest p50 counts: a burst of other work only ever adds time, so the
        # quietest window is the best estimate of the device.
        windows: dict[str, list[list[float]]] = {key: [] for key in runs}
        for _ in range(max(1, args.windows)):
            if len(runs) == 1:
                windows["latency_ms"].append(_timed_window(run, x, args.iterations, args.min_timed_s))
                continue
            for key, timed in zip(runs, _alternating_window(list(runs.values()), x, args), strict=True):
                windows[key].append(timed)
        quietest = min(
            range(len(windows["latency_ms"])), key=lambda i: float(np.percentile(windows["latency_ms"][i], 50))
        )
        for key, timed in windows.items():
            # The reference's statistics come from the model's quietest window: the ratio of the two is what a
            # speedup budget compares, and it holds only for times taken side by side.
            result[key] = _statistics(timed, warmed, quietest)
    if args.node_times > 0:
        result["node_times"] = _node_times(args.model, shape, args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
