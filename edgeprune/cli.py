"""The command line (DESIGN.md): ``edgeprune targets``, ``edgeprune build``.

Exit codes: 0 success, 1 budget or validation not met, 2 bad input, 3 internal error (a bug to report). Errors
are one line on stderr, never a traceback (EDGEPRUNE_DEBUG=1 shows it for an internal error). Progress goes to
stderr, so ``--json`` leaves stdout to the report alone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from edgeprune.errors import BadInput, EdgepruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune a PyTorch model to a budget on a target.")
targets_app = typer.Typer(help="List the target profiles, or show one.", invoke_without_command=True)
app.add_typer(targets_app, name="targets")
err = Console(stderr=True, highlight=False)
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
    units = {"latency_ms": "{:g} ms", "speedup": "{:g}x faster", "memory_mb": "{:g} MB"}
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


@app.command()
def build(
    target: Annotated[str, typer.Option(help="Target profile name (see 'edgeprune targets') or a .toml path.")] = (
        "x86-openvino"
    ),
    model: Annotated[str, typer.Option(help="timm:NAME, package.module:factory or file.py:factory.")] = (
        "edgeprune.zoo:efficientnet_lite0"
    ),
    weights: Annotated[str | None, typer.Option(help="State dict (.pt/.pth/.safetensors) to load.")] = None,
    latency_ms: Annotated[float | None, typer.Option(help="Budget: p50 latency in ms on the target.")] = None,
    speedup: Annotated[float | None, typer.Option(help="Budget: p50 speedup over the unpruned model.")] = None,
    memory_mb: Annotated[float | None, typer.Option(help="Budget: peak memory in MB (not built yet).")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input shape, e.g. 1,3,224,224.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration data: ImageFolder dir or .npz.")] = None,
    method: Annotated[str, typer.Option(help="Importance: auto, magnitude, taylor.")] = "auto",
    device: Annotated[str | None, typer.Option(help="Where to measure; 'local' (default).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("out"),
    force: Annotated[bool, typer.Option(help="Replace an output folder that already holds files.")] = False,
    max_rounds: Annotated[int, typer.Option(help="Most measured rounds of the search.")] = 4,
    recover_steps: Annotated[int, typer.Option(help="Distillation steps at the end (needs --calib).")] = 20,
    trust_pickle: Annotated[bool, typer.Option(help="Allow weights files that need unpickling.")] = False,
    strict: Annotated[bool, typer.Option(help="Fail on layers that cannot be pruned, not keep them.")] = False,
    plan: Annotated[str | None, typer.Option(help="Replay this plan.json instead of searching.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json on stdout.")] = False,
) -> None:
    """Prune, export and measure until the budget holds; write the artifact, plan.json and report.json."""
    from edgeprune.build import BuildOptions
    from edgeprune.build import build as run_build
    from edgeprune.errors import BudgetNotMet
    from edgeprune.model import parse_input_shape
    from edgeprune.target import Budget

    start = time.perf_counter()

    def say(message: str) -> None:
        err.print(f"[dim]{time.perf_counter() - start:6.1f}s[/dim] {message}", soft_wrap=True)

    try:
        given = {"latency_ms": latency_ms, "speedup": speedup, "memory_mb": memory_mb}
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise BadInput(f"give one budget, not {' and '.join('--' + k.replace('_', '-') for k in given)}")
        for kind, value in given.items():
            if not value > 0 or (kind == "speedup" and value < 1):
                need = "at least 1" if kind == "speedup" else "positive"
                raise BadInput(f"--{kind.replace('_', '-')} must be {need}, got {value}")
        options = BuildOptions(
            target=target, model=model, weights=weights, budget=Budget(**given) if given else None,
            input_shape=parse_input_shape(input_shape) if input_shape else None, calib=calib, method=method,
            device=device, out=out_dir, force=force, max_rounds=max_rounds, recover_steps=recover_steps,
            trust_pickle=trust_pickle, strict=strict, plan=plan,
        )  # fmt: skip
        report = run_build(options, say=say)
    except KeyboardInterrupt as stop:  # the build's own cleanup has run: nothing partial is left
        signal_name = "terminated" if isinstance(stop, Terminated) else "interrupted"
        err.print(f"edgeprune: {signal_name}; no output was written")
        raise typer.Exit(143 if isinstance(stop, Terminated) else 130) from None
    except BudgetNotMet as exc:
        if as_json and exc.report is not None:
            print(json.dumps(exc.report, indent=2))
        _fail(exc)
    except EdgepruneError as exc:
        _fail(exc)
    except Exception as exc:  # a bug of ours or of a library: still one line, and a distinct exit code
        if os.environ.get("EDGEPRUNE_DEBUG"):
            raise
        err.print(
            f"edgeprune: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; nothing was"
            " written. Please report it; EDGEPRUNE_DEBUG=1 shows the traceback", markup=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(3) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_summary(report, out_dir)


@app.command()
def validate(
    out_dir: Annotated[Path, typer.Argument(help="A build's output folder.")],
    device: Annotated[str | None, typer.Option(help="Where to run the artifact; 'local' (default).")] = None,
    latency_ms: Annotated[float | None, typer.Option(help="Check against this budget, not the recorded one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check a built artifact: hashes against manifest.json, outputs against PyTorch's, latency against the budget.

    Exit 0 when all hold, 1 when one does not (the verdict line says which), 2 for a folder that is not a build.
    """
    from edgeprune.validate import validate as run_validate

    try:
        result = run_validate(out_dir, device, latency_ms)
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
    out.print(
        f"budget {report['budget']['latency_ms']:.3f} ms p50 {verdict}: {report['result']['speedup']:.2f}x faster"
        f" in {len(report['iterations'])} measured round(s); outputs match PyTorch within"
        f" {report['validation']['atol']:.2g} (max error {report['validation']['max_abs_err']:.2g}); wrote {out_dir}/"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` runs: the build removes its partial output folder."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> None:
    """Entry point of the ``edgeprune`` script. SIGINT and SIGTERM stop a build cleanly: no partial output."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main()
