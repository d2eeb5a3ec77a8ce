"""The command line: ``edgeprune targets``, ``build``, ``bench``, ``validate``, ``profile`` (docs/cli.md).

Exit codes: 0 success, 1 budget or validation not met, 2 bad input, 3 internal error (a bug to report). Errors
are one line on stderr, never a traceback (EDGEPRUNE_DEBUG=1 shows it for an internal error). Progress goes to
stderr, so ``--json`` leaves stdout to the report alone.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table
from typer.core import TyperCommand

from edgeprune.errors import EdgepruneError, Terminated, install_stop_handlers
from edgeprune.farm.executor import EXECUTORS_HELP
from edgeprune.progress import Progress, err


class PanelledCommand(TyperCommand):
    """Plain help (rich markup would eat the "[default: …]" in help texts) with the options under titled panels."""

    def format_options(self, ctx, formatter) -> None:
        panels: dict[str, list[tuple[str, str]]] = {title: [] for title in PANELS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        for title, records in panels.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


PANELS = ("Budget", "Model and data", "Method", "Search", "Devices and execution", "Output")
_budget, _inputs, _method, _search, _devices, _output = (partial(typer.Option, rich_help_panel=p) for p in PANELS)
DEVICE_HELP = (
    "Where to measure: 'local' (default) or ssh://[user@]host[:port][?identity=KEY&known_hosts=FILE&python=PATH&timeout=S]"
    " (the board needs Python 3, numpy and the runtime). Give it more than once for a pool of boards that share"
    " the benchmarks."
)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prune a PyTorch model to a budget on a target.",
    rich_markup_mode=None,
)  # help texts say "[default: 1]": literal, not rich markup
targets_app = typer.Typer(help="List the target profiles, or show one.", invoke_without_command=True)
app.add_typer(targets_app, name="targets")
out = Console(highlight=False)


def _fail(exc: EdgepruneError) -> None:
    err.print(f"edgeprune: error: {exc}", markup=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@targets_app.callback()
def targets_list(ctx: typer.Context) -> None:
    """List the bundled target profiles."""
    if ctx.invoked_subcommand is not None:
        return
    from edgeprune.target import list_targets

    table = Table("backend", "precision", "multiple", "threads", "default budget")
    table.columns.insert(0, Column("name", no_wrap=True))  # a name is typed back in: never truncate it
    units = {"latency_ms": "{:g} ms", "speedup": "{:g}x faster", "memory_mb": "{:g} MB", "macs_ratio": "{:g} of MACs",
             "params_ratio": "{:g} of params"}  # fmt: skip
    for t in list_targets():
        budget = units[t.budget.kind].format(t.budget.value)
        table.add_row(t.name, t.backend, t.precision, str(t.channel_multiple), str(t.threads), budget)
    out.print(table)
    out.print("'edgeprune targets show NAME' prints one profile with its description.")


@targets_app.command("show")
def targets_show(name: str, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Print one target profile."""
    from edgeprune.target import load_target

    try:
        target = load_target(name)
    except EdgepruneError as exc:
        _fail(exc)
    data = target.to_dict()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    out.print(f"[bold]{target.name}[/bold]  ({target.path})")
    for key, value in data.items():
        out.print(f"  {key}: {value}", markup=False)


@app.command(cls=PanelledCommand)
def build(
    target: Annotated[str | None, _devices(help="Target name or .toml path [default: x86-openvino].")] = None,
    model: Annotated[str | None, _inputs(help="timm:NAME, package.module:factory or file.py:factory.")] = None,
    weights: Annotated[str | None, _inputs(help="State dict (.pt/.pth/.safetensors) to load.")] = None,
    latency_ms: Annotated[float | None, _budget(help="p50 latency in ms on the target.")] = None,
    speedup: Annotated[float | None, _budget(help="p50 speedup over the unpruned model.")] = None,
    memory_mb: Annotated[
        float | None, _budget(help="MB of weights (target precision) + peak live activations.")
    ] = None,
    macs_ratio: Annotated[float | None, _budget(help="Fraction of the unpruned MACs, in (0, 1].")] = None,
    params_ratio: Annotated[float | None, _budget(help="Fraction of the unpruned params.")] = None,
    input_shape: Annotated[str | None, _inputs(help="Input shape, e.g. 1,3,224,224.")] = None,
    calib: Annotated[str | None, _inputs(help="Calibration data: ImageFolder dir or .npz.")] = None,
    train: Annotated[str | None, _inputs(help="The task's labelled data (a new head if its classes differ).")] = None,
    aux: Annotated[str | None, _inputs(help="Auxiliary data for recovery, labelled or not.")] = None,
    adapt_steps: Annotated[int | None, _method(help="Fine-tuning steps of a new head [default: 100].")] = None,
    method: Annotated[
        str | None,
        _method(help="auto, magnitude, taylor, fisher, compensate, lowrank, double or vote (docs/methods.md)."),
    ] = None,
    compensate: Annotated[bool, _method(help="Refit layers by least squares after pruning (needs --calib).")] = False,
    bank: Annotated[
        str | None, _method(help="Mask bank folder: store this task's kept channels (vote reads it).")
    ] = None,
    allocation: Annotated[
        str | None, _method(help="Widths: global (by cost on the target) or uniform [default: global].")
    ] = None,
    structures: Annotated[
        str | None, _method(help="What may be cut: all, heads or neurons (transformers) [default: all].")
    ] = None,
    drop_blocks: Annotated[
        str | None,
        _method(
            help="Residual blocks to remove whole, those the task's data misses least, before channels are cut: a"
            " count, or auto (the count whose plan to the budget keeps the task's outputs closest) [default: auto"
            " with task data and a latency or speedup budget under global allocation, else 0]."
        ),
    ] = None,
    device: Annotated[list[str] | None, _devices(help=DEVICE_HELP)] = None,
    executor: Annotated[str | None, _devices(help=f"Where candidates run: {EXECUTORS_HELP}.")] = None,
    in_flight: Annotated[
        int | None, _devices(help="Candidates pruned, exported and measured at once per round [default: 1].")
    ] = None,
    out_dir: Annotated[Path | None, _output("--out", help="Output folder [default: out].")] = None,
    force: Annotated[bool, _output(help="Replace an output folder that already holds files.")] = False,
    max_rounds: Annotated[int | None, _search(help="Most measured rounds of the search [default: 4].")] = None,
    recover_steps: Annotated[int | None, _method(help="Distillation steps (needs --calib) [default: 20].")] = None,
    calib_limit: Annotated[
        int | None,
        _inputs(
            help="Most samples read from each of --train, --calib, --aux [default: 1024 --train images, 256 others;"
            " all text]."
        ),
    ] = None,
    trust_pickle: Annotated[bool, _inputs(help="Allow weights files that need unpickling.")] = False,
    strict: Annotated[bool, _method(help="Fail on layers that cannot be pruned, not keep them.")] = False,
    plan: Annotated[str | None, _search(help="Replay this plan.json instead of searching.")] = None,
    config: Annotated[Path | None, typer.Option(help="Project config [default: ./edgeprune.toml if present].")] = None,
    key_file: Annotated[
        str | None,
        _output(help="Sign manifest.json with this key file (HMAC-SHA256); validate --key-file checks it."),
    ] = None,
    as_json: Annotated[bool, _output("--json", help="Print report.json on stdout.")] = False,
) -> None:
    """Prune, export and measure until the budget holds; write the artifact, plan.json and report.json.

    With a project config (edgeprune.toml, or [tool.edgeprune] in pyproject.toml), build every target it lists,
    each into OUT/<target>; flags override the file. The exit code is 0 only when every target met its budget.
    """
    from rich.markup import escape

    from edgeprune.jobs import plan_jobs, run_jobs, unpickling_granted_by

    say = Progress()
    flags = {
        "target": target, "model": model, "weights": weights, "input_shape": input_shape, "calib": calib,
        "method": method, "allocation": allocation, "structures": structures,
        "device": ",".join(device) if device else None, "out": str(out_dir) if out_dir else None, "executor": executor,
        "in_flight": in_flight, "max_rounds": max_rounds, "recover_steps": recover_steps, "calib_limit": calib_limit,
        "plan": plan, "force": force or None, "strict": strict or None, "trust_pickle": trust_pickle or None,
        "compensate": compensate or None, "bank": bank, "train": train, "aux": aux, "adapt_steps": adapt_steps,
        "drop_blocks": _count_or_word(drop_blocks), "key_file": key_file,
    }  # fmt: skip
    budget = {"latency_ms": latency_ms, "speedup": speedup, "memory_mb": memory_mb, "macs_ratio": macs_ratio,
              "params_ratio": params_ratio}  # fmt: skip
    try:
        jobs, project = plan_jobs(flags, budget, config)
    except EdgepruneError as exc:
        _fail(exc)
    granted_by = unpickling_granted_by(flags, project)
    if granted_by:  # a config found in the working folder can turn it on: never silently
        say(f"[bold]unpickling of weights files is ON[/bold], turned on by {escape(granted_by)}: a pickle can run code")
    try:
        results = run_jobs(jobs, say, announce=project is not None)
        say.stop()
    except KeyboardInterrupt as stop:  # the build's own cleanup has run: nothing partial is left
        say.stop()
        signal_name = "terminated" if isinstance(stop, Terminated) else "interrupted"
        err.print(f"edgeprune: {signal_name}; no output was written")
        raise typer.Exit(143 if isinstance(stop, Terminated) else 130) from None
    for options, code, _, message in results:
        if message:
            prefix = f"[{options.target}] " if project else ""
            err.print(f"edgeprune: {'internal error' if code == 3 else 'error'}: {prefix}{message}", markup=False,
                      soft_wrap=True)  # fmt: skip
    if as_json:
        reports = [report for _, _, report, _ in results]
        print(json.dumps({"targets": reports} if project else reports[0], indent=2))
    elif project:
        _print_targets(results)
    elif results[0][2] is not None and results[0][1] == 0:
        _print_summary(results[0][2], results[0][0].out)
    raise typer.Exit(max(code for _, code, _, _ in results))


def _count_or_word(text: str | None) -> int | str | None:
    """--drop-blocks as the config spells it: a count as an integer, any other word as given (then checked)."""
    try:
        return None if text is None else int(text)
    except ValueError:
        return text


def _print_targets(results: list) -> None:
    table = Table("target", "verdict", "p50 ms", "speedup", "rounds", "output")
    for options, code, report, message in results:
        verdict = {0: "met", 1: "NOT met"}.get(code, "error")
        if report is None:
            table.add_row(options.target, verdict, "-", "-", "-", (message or "")[:60])
            continue
        table.add_row(
            options.target, verdict, f"{report['result']['latency_ms']['p50']:.3f}",
            f"{report['result']['speedup']:.2f}x", str(len(report["iterations"])), str(options.out),
        )  # fmt: skip
    out.print(table)


@app.command()
def bench(
    artifact: Annotated[
        Path, typer.Argument(help="The model file a build wrote: model.xml, model.tflite, model.onnx.")
    ],
    target: Annotated[str, typer.Option(help="Target name or .toml path: runtime, threads, iterations.")],
    device: Annotated[str | None, typer.Option(help=DEVICE_HELP)] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input shape; default: from model.onnx beside it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Time an existing artifact on the target's runtime, here or on a device; no build."""
    from edgeprune.bench import run_bench
    from edgeprune.model import parse_input_shape

    try:
        shape = parse_input_shape(input_shape) if input_shape else None
        result = run_bench(artifact, target, device, shape)
    except EdgepruneError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    lat = result["latency_ms"]
    what = "ESTIMATE (not measured)" if result["estimate"] else f"measured on {result['measured_on']}"
    out.print(f"{result['artifact']} on {result['target']} ({result['runtime']}, {result['threads']} threads), {what}:"
              f" p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, p99 {lat['p99']:.3f} ms over {lat['iterations']}"
              " runs", markup=False, soft_wrap=True)  # fmt: skip


@app.command()
def validate(
    out_dir: Annotated[Path, typer.Argument(help="A build's output folder.")],
    device: Annotated[str | None, typer.Option(help=DEVICE_HELP)] = None,
    latency_ms: Annotated[float | None, typer.Option(help="Check against this budget, not the recorded one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    key_file: Annotated[
        Path | None, typer.Option(help="Require manifest.json's signature (HMAC-SHA256) made with this key file.")
    ] = None,
) -> None:
    """Check a built artifact: hashes against manifest.json, outputs against PyTorch's, latency against the budget.

    The manifest detects corruption and accidental edits, not a forger who rewrites it too; with --key-file, a
    signature made with that secret key is required as well, and a rewritten manifest fails it.

    Exit 0 when all hold, 1 when one does not (the verdict line says which), 2 for a folder that is not a build.
    """
    from edgeprune.validate import validate as run_validate

    try:
        result = run_validate(out_dir, device, latency_ms, key_file)
    except EdgepruneError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        out.print(result["verdict"], markup=False, soft_wrap=True)
    raise typer.Exit(0 if result["ok"] else 1)


def _print_summary(report: dict, out_dir: Path) -> None:
    from edgeprune.report import summary_rows

    table = Table("", "baseline", "pruned", title=f"edgeprune build → {report['target']} ({report['measured_on']})")
    for row in summary_rows(report):
        table.add_row(*row)
    out.print(table)
    verdict = "met" if report["met_budget"] else "NOT met"
    budget = report["budget"]
    if budget["kind"] == "memory_mb":
        what = f"memory {budget['value']:g} MB ({report['result']['memory']['total_mb']:.2f} MB)"
    elif budget["latency_ms"] is None:  # a counted budget (MACs or params fraction)
        what = f"{budget['kind'].replace('_', ' ')} {budget['value']:g} ({report['result'][budget['kind']]:.3f})"
    else:
        what = f"{budget['latency_ms']:.3f} ms p50"
    for key in ("not_measured", "host_measurement"):  # an estimate or a host figure says so wherever it appears
        if report.get(key):
            out.print(f"NOTE: {report[key]}", markup=False, soft_wrap=True)
    rounds = "estimated" if report.get("not_measured") else "measured"
    out.print(
        f"budget {what} {verdict}: {report['result']['speedup']:.2f}x faster"
        f" in {len({i['step'] for i in report['iterations']})} {rounds} round(s)"
        f" ({len(report['iterations'])} candidates); outputs match PyTorch within"
        f" {report['validation']['atol']:.2g} (max error {report['validation']['max_abs_err']:.2g}); wrote {out_dir}/"
    )


@app.command()
def profile(
    target: Annotated[str, typer.Option(help="Target name or .toml path.")] = "x86-openvino",
    model: Annotated[str | None, typer.Option(help="timm:NAME, package.module:factory or file.py:factory.")] = None,
    weights: Annotated[str | None, typer.Option(help="State dict to load (latency does not depend on it).")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input shape, e.g. 1,3,224,224.")] = None,
    device: Annotated[str | None, typer.Option(help=DEVICE_HELP)] = None,
    samples: Annotated[int, typer.Option(help="Plans to measure (at least 4).")] = 10,
    trust_pickle: Annotated[bool, typer.Option(help="Allow weights files that need unpickling.")] = False,
) -> None:
    """Measure how the model's latency responds to width on the target; cache the fit that builds start from."""
    from edgeprune.model import DEFAULT_MODEL, parse_input_shape
    from edgeprune.profile import run_profile

    say = Progress()
    try:
        shape = parse_input_shape(input_shape) if input_shape else None
        result = run_profile(target, model or DEFAULT_MODEL, weights, shape, device, samples, trust_pickle, say)
    except EdgepruneError as exc:
        say.stop()
        _fail(exc)
    except KeyboardInterrupt:
        say.stop()
        err.print("edgeprune: interrupted; the cache was not changed")
        raise typer.Exit(130) from None
    say.stop()
    measured = result["not_measured"] is None
    table = Table("sample", "MACs", "predicted ms" + (" (fit on the others)" if measured else " (ESTIMATE)"),
                  "measured ms", "error", title=f"{result['model']} on {result['target']}")  # fmt: skip
    for row in result["rows"]:
        error = f"{(row.predicted_ms - row.measured_ms) / row.measured_ms:+.1%}" if row.measured_ms else "-"
        measured_ms = f"{row.measured_ms:.3f}" if row.measured_ms else "not measured"
        table.add_row(row.name, f"{row.macs_fraction:.0%}", f"{row.predicted_ms:.3f}", measured_ms, error)
    out.print(table)
    out.print(f"cost model: {result['source']}", markup=False, soft_wrap=True)
    if measured:
        if result.get("timed_beside"):
            out.print(f"measured ms: each sample timed beside the unpruned model, as the p50 it would have measured"
                      f" when the unpruned model measured {result['baseline_p50']:.3f} ms (its median)",
                      markup=False, soft_wrap=True)  # fmt: skip
        if result.get("retaken"):
            out.print(f"timed again, first timed in the machine's slow state: {', '.join(result['retaken'])}",
                      markup=False, soft_wrap=True)  # fmt: skip
        out.print(f"cached in {result['cache']}; builds of this model on {result['target']} start from it",
                  markup=False, soft_wrap=True)  # fmt: skip
    else:
        out.print(f"not measured: {result['not_measured']}; the figures above are an estimate from the target's"
                  " [estimate] roofline, not measurements", markup=False, soft_wrap=True)  # fmt: skip


def main() -> None:
    """Entry point of the ``edgeprune`` script. SIGINT and SIGTERM stop a build cleanly: no partial output."""
    install_stop_handlers()
    app()


if __name__ == "__main__":
    main()
