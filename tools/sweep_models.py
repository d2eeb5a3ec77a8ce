"""Robustness sweep: the full `edgeprune build` on many timm architectures, one at a time, one table.

    python tools/sweep_models.py [--models resnet18 vit_tiny_patch16_224@224 ...] [--timeout 300] [--speedup 1.5]
                                 [--json rows.json] [--markdown] [--jobs 2] [--debug]

Each model is built with random weights (no --weights) by `edgeprune build --model timm:NAME --target x86-openvino
--speedup 1.5 --input-shape 1,3,H,W --out TMP --json` in a subprocess with a timeout. Progress goes to stderr per
model; at the end a table gives, per model, whether it was pruned, exported, matched PyTorch and how fast it got, or
the one-line reason it failed (the last `edgeprune: error:` line, else the last line of a traceback). A model is a
success when the build exported its artifact and the artifact's outputs match PyTorch: exit 0, or exit 1 when only the
final measurement landed over the budget (the "met budget" column shows those). Latency on a shared machine is noisy:
the speedup and budget columns are indicative, the export and validation columns are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from rich.console import Console
from rich.table import Table

# (timm name, family, input side). 96 wherever the model runs on it; models with fixed patch grids, absolute
# position embeddings or fixed attention windows get the smallest size they accept (checked with a forward pass).
MODELS: list[tuple[str, str, int]] = [
    ("resnet18", "ResNet", 96),
    ("resnet50", "ResNet (bottleneck)", 96),
    ("seresnet18", "SE-ResNet", 96),
    ("resnext50_32x4d", "ResNeXt (grouped)", 96),
    ("res2net50_14w_8s", "Res2Net", 96),
    ("resnest14d", "ResNeSt (split attn)", 96),
    ("skresnet18", "SKNet", 96),
    ("nf_resnet26", "NF-ResNet (WS conv)", 96),
    ("mobilenetv2_100", "MobileNetV2", 96),
    ("mobilenetv3_large_100", "MobileNetV3", 96),
    ("mobilenetv3_small_100", "MobileNetV3", 96),
    ("mobilenetv4_conv_small", "MobileNetV4", 96),
    ("efficientnet_b0", "EfficientNet", 96),
    ("efficientnet_lite0", "EfficientNet-Lite", 96),
    ("tf_efficientnet_b0", "EfficientNet (TF same pad)", 96),
    ("tinynet_a", "TinyNet", 96),
    ("mixnet_s", "MixNet (mixed kernels)", 96),
    ("mnasnet_100", "MnasNet", 96),
    ("fbnetc_100", "FBNet", 96),
    ("hardcorenas_a", "HardCoReNAS", 96),
    ("lcnet_050", "LCNet", 96),
    ("rexnet_100", "ReXNet (partial residual)", 96),
    ("ghostnet_100", "GhostNet", 96),
    ("ghostnetv2_100", "GhostNetV2", 96),
    ("regnetx_002", "RegNetX", 96),
    ("regnety_002", "RegNetY", 96),
    ("repvgg_a0", "RepVGG", 96),
    ("mobileone_s0", "MobileOne", 96),
    ("densenet121", "DenseNet (concat)", 96),
    ("dla34", "DLA", 96),
    ("dpn68", "DPN (dual path)", 96),
    ("inception_v3", "Inception", 96),
    ("legacy_xception", "Xception", 96),
    ("cspresnet50", "CSPNet", 96),
    ("hrnet_w18_small", "HRNet", 96),
    ("ese_vovnet19b_dw", "VoVNet", 96),
    ("hgnetv2_b0", "HGNetV2", 96),
    ("convnext_atto", "ConvNeXt", 96),
    ("convnext_femto", "ConvNeXt", 96),
    ("poolformer_s12", "PoolFormer (MetaFormer)", 96),
    ("edgenext_xx_small", "EdgeNeXt (hybrid)", 96),
    ("mobilevit_xxs", "MobileViT (hybrid)", 96),
    ("efficientvit_b0", "EfficientViT-MIT (hybrid)", 96),
    ("efficientvit_m0", "EfficientViT-MSRA (hybrid)", 96),
    ("fastvit_t8", "FastViT (hybrid)", 96),
    ("repvit_m0_9", "RepViT", 96),
    ("tiny_vit_5m_224", "TinyViT (hybrid)", 96),
    ("xcit_nano_12_p16_224", "XCiT (transformer)", 96),
    ("efficientformer_l1", "EfficientFormer (hybrid)", 224),
    ("levit_128s", "LeViT (transformer)", 224),
    ("vit_tiny_patch16_224", "ViT (transformer)", 224),
    ("deit_tiny_patch16_224", "DeiT (transformer)", 224),
    ("pit_ti_224", "PiT (transformer)", 224),
    ("swin_tiny_patch4_window7_224", "Swin (transformer)", 224),
    ("mixer_s16_224", "MLP-Mixer", 224),
]
COLUMNS = ("model", "family", "input", "exit", "pruned", "kept whole", "exported", "outputs match", "speedup",
           "met budget", "rounds", "build s", "failure")  # fmt: skip


RUNNING: set[subprocess.Popen] = set()  # the builds under way (several with --jobs), for a stop to kill


def stop(*_: object) -> None:
    """SIGTERM: kill every build under way with its runner, then exit; queued models never start (see main)."""
    for proc in list(RUNNING):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(143)


def run_one(name: str, side: int, args: argparse.Namespace, out: Path) -> dict:
    """Build one model in a subprocess (its own process group, killed whole on timeout) and summarise the result."""
    command = [sys.executable, "-m", "edgeprune.cli", "build", "--model", f"timm:{name}", "--target", args.target,
               "--speedup", str(args.speedup), "--input-shape", f"1,3,{side},{side}",
               "--out", str(out), "--json"]  # fmt: skip
    started = time.perf_counter()
    # A crash prints a plain traceback, not a wrapped rich box; SIGABRT makes a stuck build print where it is.
    env = os.environ | {"TYPER_STANDARD_TRACEBACK": "1", "PYTHONFAULTHANDLER": "1"}
    if args.debug:
        env["EDGEPRUNE_DEBUG"] = "1"  # an internal error raises: its traceback (and the frame) lands in the reason
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    RUNNING.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
        code, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        ps = subprocess.run(["ps", "--sid", str(proc.pid), "-o", "args="], capture_output=True, text=True, check=False)
        running = [" ".join(Path(word).name for word in line.split()[:2]) for line in ps.stdout.splitlines()]
        os.kill(proc.pid, signal.SIGABRT)  # faulthandler dumps the build's threads to its stderr
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)  # the build and the benchmark runner it started
        stdout, stderr = proc.communicate()
        code, timed_out = None, True
    except BaseException:  # the sweep itself is stopped: take the running build down with it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds = time.perf_counter() - started
    lines = [line for line in stderr.splitlines() if line.strip()]
    row: dict = {"model": name, "input": side, "exit": code, "timed_out": timed_out, "seconds": round(seconds, 1),
                 "stderr_tail": lines[-40:], "running_at_timeout": running if timed_out else []}  # fmt: skip
    try:
        report = json.loads(stdout) if stdout.strip().startswith("{") else None
    except json.JSONDecodeError:
        report = None
    if report is not None:
        base, result = report["baseline"], report["result"]
        row.update(
            ratio=result.get("ratio"), macs_kept=result["macs"] / base["macs"],
            params_kept=result["params"] / base["params"],
            speedup=result.get("speedup"), rounds=len(report["iterations"]), met_budget=report["met_budget"],
            validation_ok=report["validation"]["ok"], max_abs_err=report["validation"]["max_abs_err"],
            kept_whole=[u["module"] for u in report.get("unprunable", [])],
        )  # fmt: skip
    counted = [re.search(r"(\d+) of (\d+) groups cannot be pruned", line) for line in lines]
    row["groups"] = next((int(m.group(2)) for m in counted if m), None)
    # A build that exported and validated its artifact but measured just over the budget on a busy machine (exit 1,
    # report printed, nothing published) built end to end: the budget column tells it apart.
    row["exported"] = ((out / "model.xml").is_file() and (out / "model.onnx").is_file()) or report is not None
    row["ok"] = code in (0, 1) and row["exported"] and bool(row.get("validation_ok"))
    row["reason"] = "" if code == 0 else failure_reason(lines, timed_out, args.timeout)
    if timed_out:
        row["reason"] += f"; processes: {', '.join(running)}"
    return row


def failure_reason(lines: list[str], timed_out: bool, timeout: float) -> str:
    """The one line that says why a build failed: a timeout (with the stage it was in), the CLI's error line, or
    the exception line of a traceback."""
    if timed_out:  # the last timestamped progress line, and the main thread's innermost frames from faulthandler
        stage = next((line.strip() for line in reversed(lines) if re.match(r"\s*\d+\.\ds ", line)), "no progress")
        dump = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), len(lines))
        frames = [line.strip().removeprefix("File ") for line in lines[dump + 1 :] if line.strip().startswith("File")]
        own = [f for f in frames if "/edgeprune/" in f][:1]
        where = "; stuck in " + " from ".join(short(f) for f in frames[:1] + own) if frames else ""
        return f"timed out after {timeout:g} s; last progress: {stage}{where}"
    errors = [line for line in lines if line.startswith(("edgeprune: error:", "edgeprune: internal error:"))]
    if errors:
        return errors[-1].removeprefix("edgeprune: ").removeprefix("error:").strip()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:  # a crash, not an edgeprune error: the exception line and the innermost frame it was raised in
        block = lines[starts[-1] :]
        frames = [i for i, line in enumerate(block) if line.startswith('  File "')]
        tail = block[frames[-1] + 1 :] if frames else block[-1:]
        while len(tail) > 1 and tail[0].startswith("    "):  # the frame's source line and its ^^^ markers
            tail = tail[1:]
        exception = " ".join(line.strip() for line in tail)
        where = f" (in {short(block[frames[-1]].strip().removeprefix('File '))})" if frames else ""
        return f"uncaught {exception[:300]}{where}"
    return lines[-1].strip() if lines else "no output on stderr"


def short(frame: str) -> str:
    """A traceback's or faulthandler's frame ('"/a/b/c.py", line 3, in f') as 'b/c.py:3 f'."""
    file, _, rest = frame.strip().lstrip('"').partition('", line ')
    return f"{'/'.join(Path(file).parts[-2:])}:{rest.replace(', in ', ' ').replace(' in ', ' ')}"


def cells(row: dict, family: str) -> list[str]:
    """One table row of strings."""
    has = "macs_kept" in row
    exit_code = "timeout" if row["timed_out"] else str(row["exit"])
    pruned = f"r={row['ratio']:.2f}, {row['macs_kept']:.0%} MACs" if has and row.get("ratio") is not None else "-"
    match = "-"
    if row.get("validation_ok") is not None:
        match = f"{'yes' if row['validation_ok'] else 'NO'} ({row['max_abs_err']:.1e})"
    speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
    whole = "-" if "kept_whole" not in row else str(len(row["kept_whole"]))
    whole += f" of {row['groups']}" if row.get("groups") and row.get("kept_whole") else ""
    exported = "yes" if row["exported"] else "no"
    met = "-" if row.get("met_budget") is None else ("yes" if row["met_budget"] else "no")
    return [row["model"], family, f"{row['input']}²", exit_code, pruned, whole, exported, match, speedup, met,
            str(row.get("rounds", "-")), f"{row['seconds']:.0f}", row["reason"]]  # fmt: skip


def parse_models(requested: list[str] | None) -> list[tuple[str, str, int]]:
    """The models to run: the table, or the names given (NAME or NAME@SIDE; a name not in the table gets 96)."""
    if not requested:
        return MODELS
    known = {name: (family, side) for name, family, side in MODELS}
    chosen = []
    for item in requested:
        name, _, side = item.removeprefix("timm:").partition("@")
        family, default = known.get(name, ("-", 96))
        chosen.append((name, family, int(side) if side else default))
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="timm names, NAME@SIDE to set the input side (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per build (default 300)")
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--target", default="x86-openvino")
    parser.add_argument("--json", type=Path, help="write the rows (with each build's stderr tail) to this file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for docs/benchmarks/)")
    parser.add_argument("--jobs", type=int, default=1, help="builds at once (more is faster and makes latency noisier)")
    parser.add_argument("--debug", action="store_true", help="EDGEPRUNE_DEBUG=1: internal errors give their frame")
    args = parser.parse_args()
    models = parse_models(args.models)

    signal.signal(signal.SIGTERM, stop)  # so that a stopped sweep stops its builds and still removes its folder
    err = Console(stderr=True, highlight=False)
    rows: list[tuple[dict, str]] = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp, ThreadPoolExecutor(args.jobs) as pool:

        def one(i: int, name: str, family: str, side: int) -> dict:
            err.print(f"[{i}/{len(models)}] {name} ({family}, {side}x{side}) ...", markup=False)
            row = run_one(name, side, args, Path(tmp) / f"out{i}") | {"family": family}
            verdict = ("ok" if row["ok"] else "FAILED") + (f": {row['reason']}" if row["reason"] else "")
            detail = f", {row['speedup']:.2f}x, {row['macs_kept']:.0%} MACs" if row.get("speedup") else ""
            code = "timeout" if row["timed_out"] else f"exit {row['exit']}"
            err.print(f"[{i}/{len(models)}] {name}: {code} in {row['seconds']:.0f} s{detail}: {verdict}",
                      markup=False, soft_wrap=True)  # fmt: skip
            return row

        futures = [pool.submit(one, i, *model) for i, model in enumerate(models, 1)]
        try:
            for future in as_completed(futures):
                rows.append((future.result(), future.result()["family"]))
                if args.json:  # written after every model, so a long sweep that is stopped still leaves its rows
                    args.json.write_text(json.dumps([r for r, _ in rows], indent=2))
        except SystemExit:
            for future in futures:
                future.cancel()  # queued models never start; the running builds were killed by stop()
            raise
        order = {name: i for i, (name, _, _) in enumerate(models)}
        rows.sort(key=lambda pair: order[pair[0]["model"]])

    title = f"edgeprune build --target {args.target} --speedup {args.speedup:g}, timm, random weights"
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "family", "failure") else "right")
    for row, family in rows:
        table.add_row(*cells(row, family))
    if args.markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row, family in rows:
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells(row, family)) + " |")
    else:
        Console(width=250).print(table)
    succeeded = sum(row["ok"] for row, _ in rows)
    met = sum(bool(row.get("met_budget")) and row["ok"] for row, _ in rows)
    print(f"\n{succeeded} of {len(rows)} ({succeeded / max(len(rows), 1):.0%}) built end to end with matching outputs;"
          f" {met} of them also met the budget on their final measurement")  # fmt: skip
    return 0 if succeeded == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
