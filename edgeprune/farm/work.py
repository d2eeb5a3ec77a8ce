"""The loop's unit of work, "measure this candidate on this target", as a plain function of plain data.

``evaluate(share, job)``: the build's shared inputs (model, example, target, device, reference artifact) and one
candidate (a plan and a folder name) in; MACs, params, the Measurement and the artifact out. Nothing in it reads
the search's state, so it runs the same in this process, one candidate after another, or on Ray workers, several
at once (farm/executor.py); the search only chooses plans and reads the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune._torchvision_shim import ensure_torchvision_importable
from edgeprune.backends import Artifact, Measurement, get_backend
from edgeprune.graph.plan import Plan
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.target import Target

# A Ray worker unpickles timm models, whose modules import torchvision: the shim must be in place first there too.
ensure_torchvision_importable()


@dataclass(frozen=True)
class BuildShare:
    """What every candidate of one build shares; sent to the workers once (``Executor.share``), not per candidate.

    ``workdir`` must be readable and writable at the same path where the candidates run: always on one machine, and
    on a multi-node Ray cluster only with a shared file system (the README says so)."""

    model: nn.Module
    example: torch.Tensor
    target: Target
    backend: str
    device: object  # anything with ``label`` and ``run_runner(args)``: a device, a pool, a pool on Ray
    workdir: Path
    reference: Artifact | None = None  # timed alongside every candidate: the unpruned artifact
    quiet_reference_ms: float | None = None  # the baseline's p50, timed alone: a timing far over it is retaken
    calibration: torch.Tensor | None = None  # images a full-int8 export calibrates its ranges on


@dataclass(frozen=True)
class CandidateJob:
    plan: Plan
    name: str  # the folder of the work dir its artifact goes to


@dataclass(frozen=True)
class Evaluated:
    macs: int
    params: int
    measurement: Measurement
    artifact: Artifact


def export_and_measure(share: BuildShare, model: nn.Module, name: str) -> tuple[Measurement, Artifact]:
    """Export ``model`` into its own folder of the work dir and benchmark it on the share's device."""
    backend = get_backend(share.backend)
    directory = Path(share.workdir) / name
    directory.mkdir(parents=True, exist_ok=True)
    artifact = backend.export(model, share.example, directory, share.target, share.calibration)
    shape = tuple(share.example.shape)
    measured = backend.benchmark(artifact, shape, share.target, share.device, share.reference, share.quiet_reference_ms)
    return measured, artifact


def evaluate(share: BuildShare, job: CandidateJob) -> Evaluated:
    """Prune the share's model by the job's plan, count it, export it and measure it."""
    pruned = apply_plan(share.model, job.plan, share.example)
    macs, params = count_macs_params(pruned, share.example)
    measurement, artifact = export_and_measure(share, pruned, job.name)
    return Evaluated(macs, params, measurement, artifact)
