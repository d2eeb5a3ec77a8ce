"""From the command line and the project config to build jobs, and one job run to an exit code.

Precedence: a flag given on the command line, then the project config (edgeprune.toml or [tool.edgeprune]), then
BuildOptions' defaults. With a config, every target it lists is a job with an output folder of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeprune.config import SCHEMA, ProjectConfig, TargetJob, check_setting, find_config, load_config
from edgeprune.errors import BadInput, BudgetNotMet, EdgepruneError
from edgeprune.farm.executor import LocalExecutor, make_executor
from edgeprune.model import exit_call, parse_input_shape
from edgeprune.pipeline import BuildOptions
from edgeprune.pipeline import build as run_build
from edgeprune.target import Budget, budget_value

PATH_SETTINGS = ("weights", "calib", "train", "aux", "bank", "plan", "key_file", "out")


def plan_jobs(flags: dict, budget_flags: dict, config: Path | None) -> tuple[list[BuildOptions], ProjectConfig | None]:
    """The BuildOptions of every job, and the project config used (None without one). Bad flags or config: BadInput.
    Flags are checked against the config's SCHEMA, so both obey the same types and bounds."""
    budget = _budget(budget_flags)
    path = config or find_config()
    if config is not None and not Path(config).is_file():
        raise BadInput(f"--config {config}: no such file")
    project = load_config(path) if path else None
    settings = dict(project.settings) if project else {}
    if project:  # paths in a config are relative to the config file, as in pyproject.toml
        base = Path(project.path).parent
        for key in PATH_SETTINGS:
            if isinstance(settings.get(key), str) and not Path(settings[key]).is_absolute():
                settings[key] = str(base / settings[key])
    settings.update(_checked_flags(flags))
    settings["trust_pickle_from"] = unpickling_granted_by(flags, project)
    settings["config"] = project.path if project else None
    out = Path(settings.pop("out", "out"))
    if flags.get("target"):  # one target; a target the config lists keeps its budget unless a flag gives one
        listed = {job.target: job.budget for job in project.targets} if project else {}
        targets = [TargetJob(flags["target"], budget or listed.get(flags["target"]))]
    elif project:
        targets = [TargetJob(job.target, budget or job.budget) for job in project.targets]
    else:
        targets = [TargetJob("x86-openvino", budget)]
    jobs = []
    for job in targets:
        folder = out / Path(job.target).stem if project else out
        try:
            jobs.append(BuildOptions(target=job.target, budget=job.budget, out=folder, **settings))
        except TypeError as exc:
            raise BadInput(f"{project.path if project else 'options'}: {exc}") from None
    return jobs, project


def unpickling_granted_by(flags: dict, project: ProjectConfig | None) -> str | None:
    """What turned on unpickling of weights files: "--trust-pickle", the config file's path, or None (it is off)."""
    if flags.get("trust_pickle"):
        return "--trust-pickle"
    if project is not None and project.settings.get("trust_pickle") is True:
        return project.path
    return None


def _checked_flags(flags: dict) -> dict:
    """The flags given (not None), each checked as its config setting is; the target is not a setting."""
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in flags.items() if v is not None}
    given.pop("target", None)
    if isinstance(given.get("input_shape"), str):
        given["input_shape"] = parse_input_shape(given["input_shape"])
    return {k: check_setting(k, v, "--" + k.replace("_", "-")) if k in SCHEMA else v for k, v in given.items()}


def run_job(options: BuildOptions, say) -> tuple[int, dict | None, str | None]:
    """Run one build: (exit code, report or None, one-line error or None). Interrupts are not caught here."""
    try:
        return 0, run_build(options, say=say), None
    except BudgetNotMet as exc:
        return exc.exit_code, exc.report, str(exc)
    except EdgepruneError as exc:
        return exc.exit_code, None, str(exc)
    except SystemExit as exc:  # the model's code, or a library, quit the build: a failure, never a silent success
        return 2, None, f"the model's code or a library called {exit_call(exc)} during the build; nothing was written"
    except Exception as exc:  # a bug of ours or of a library: still one line, and a distinct exit code
        if os.environ.get("EDGEPRUNE_DEBUG"):
            raise
        detail = " ".join(str(exc).split())[:300]
        return (
            3,
            None,
            f"{type(exc).__name__}: {detail}; nothing was written. Please report it; EDGEPRUNE_DEBUG=1"
            " shows the traceback",
        )


def run_jobs(jobs: list[BuildOptions], say, announce: bool) -> list[tuple[BuildOptions, int, dict | None, str | None]]:
    """Run every job: one after another, or, on Ray with several targets, all at once (each build then runs its own
    candidates on the same cluster). Returns (options, exit code, report, error) per job, in the jobs' order."""
    try:
        executor = make_executor(jobs[0].executor) if len(jobs) > 1 else None
    except EdgepruneError as exc:  # a bad --executor, or a cluster that does not answer: every job fails with it
        return [(options, exc.exit_code, None, str(exc)) for options in jobs]
    if executor is None or isinstance(executor, LocalExecutor):
        results = []
        for options in jobs:
            if announce:
                say(f"[bold]target {options.target}[/bold] → {options.out}")
            results.append((options, *run_job(options, say)))
        return results
    try:
        say(f"building {len(jobs)} targets at once on {executor.name}: " + ", ".join(o.target for o in jobs))
        # A build task holds no CPU of its own: it waits on its candidates, which do (else two builds on a 2-CPU
        # instance would hold both CPUs and their candidates would never start).
        outcomes = executor.map(_run_job_quietly, None, jobs, num_cpus=0)
        for options, (code, _, message) in zip(jobs, outcomes, strict=True):
            say(f"target {options.target}: {'done' if code == 0 else message}")
        return [(options, *outcome) for options, outcome in zip(jobs, outcomes, strict=True)]
    finally:
        executor.close()


def _run_job_quietly(_, options: BuildOptions) -> tuple[int, dict | None, str | None]:
    """One build on a worker: its progress lines stay in the worker's log; the driver prints the outcome."""
    return run_job(options, lambda message: None)


def _budget(flags: dict) -> Budget | None:
    given = {k: v for k, v in flags.items() if v is not None}
    if len(given) > 1:
        raise BadInput(f"give one budget, not {' and '.join('--' + k.replace('_', '-') for k in given)}")
    for kind, value in given.items():  # the ranges of a profile's [budget], named by the flag
        budget_value(kind, value, "--" + kind.replace("_", "-"))
    return Budget(**given) if given else None
