"""What each phase of a build hands the next (pipeline.py): prepare → score → search → recover → ship.

Types only, so that the phases and the report read the same records without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.backends import Artifact, Backend, Measurement
from edgeprune.backends.base import Validation
from edgeprune.data import Dataset
from edgeprune.device import Device
from edgeprune.graph.plan import Plan
from edgeprune.methods import Method
from edgeprune.options import BuildOptions
from edgeprune.rounds import Candidate
from edgeprune.search.depth import DepthChoice
from edgeprune.target import Budget, Target


@dataclass(frozen=True)
class Prepared:
    """The build's inputs, every one checked, loaded and settled before the first slow step."""

    options: BuildOptions
    target: Target
    budget: Budget
    backend: Backend
    device: Device
    out: object  # the claimed output folder (a Path)
    key: bytes | None  # the manifest's signing key
    method: Method
    model: nn.Module  # adapted to the task's classes where --train asked for a new head
    example: torch.Tensor
    data: Dataset  # the task's data, its labels in the model's label space
    calib: Dataset | None  # unlabelled images beside --train
    aux: Dataset | None
    score_set: Dataset
    eval_set: Dataset
    pinned: Plan | None  # --plan: replayed instead of searching
    drop_blocks: int | str | list[str] | None  # as checked, or as the bank voted
    embedding: object  # the task's embedding for the mask bank, or None
    entries: list  # the bank's entries (vote)
    voted_blocks: list[str] | None
    adapted: dict | None
    unpickling: str | None  # what granted unpickling, for the report

    @property
    def counted(self) -> bool:
        """MACs, params and memory budgets are counted or computed on the model, not timed."""
        return self.budget.kind in ("macs_ratio", "params_ratio", "memory_mb")


@dataclass(frozen=True)
class Baseline:
    """The unpruned model, measured, and the latency the build must reach."""

    measurement: Measurement
    artifact: Artifact
    macs: int
    params: int
    size_bytes: int
    memory: dict
    budget_ms: float  # inf for counted budgets


@dataclass(frozen=True)
class Scoring:
    """What the score phase found besides the scores themselves (which it leaves in the search context)."""

    depth: DepthChoice | None = None
    start: Candidate | None = None  # the model without the removed blocks, measured: the search's round 0
    decomposed: tuple = ()  # layers in SVD form (lowrank, double)
    neighbours: tuple = ()  # the earlier tasks vote read


@dataclass(frozen=True)
class SearchResult:
    """What a budget's search found: the accepted candidate (None: none met the budget) and every one measured."""

    chosen: Candidate | None
    candidates: list[Candidate]
    unreachable: bool = False  # the most the allocation cuts is still over: more rounds would not help
    cost_model: dict | None = None  # the cost model it started from and the one it leaves for the next build


@dataclass(frozen=True)
class Shipped:
    """The final artifact: recovered, exported, checked against PyTorch and measured."""

    pruned: nn.Module
    recovery: dict
    artifact: Artifact
    inputs: torch.Tensor  # the reference inputs `edgeprune validate` checks on
    reference: torch.Tensor  # PyTorch's outputs for them
    validation: Validation
    finals: list[Measurement]  # every timing of the final artifact

    def best(self, baseline_p50: float) -> Measurement:
        """The final timing that counts: the quickest in the baseline's conditions."""
        return min(self.finals, key=lambda m: m.comparable_p50(baseline_p50))
