"""The search's context: what a build hands its search (the model, its scores, the target, the backend, the
device, the executor) and the state the search changes as it goes (the cost model, the steepness choice, the groups
kept whole, the reference's quiet level). loop.py and rounds.py both work on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.backends import Artifact, Backend, Measurement
from edgeprune.device import Device
from edgeprune.errors import BadInput
from edgeprune.farm.executor import LocalExecutor
from edgeprune.farm.work import BuildShare, export_and_measure
from edgeprune.graph.plan import Plan
from edgeprune.rewrite.prune import apply_plan, count_macs_params
from edgeprune.score.allocate import allocate, rechoose_channels, uniform_plan
from edgeprune.score.costmodel import LatencyModel
from edgeprune.score.importance import ScoredGroup
from edgeprune.score.structure import Structure
from edgeprune.search.probe import find_unprunable
from edgeprune.search.steepness import IMPORTANCE, SteepnessChoice, choose_steepness
from edgeprune.target import Target

Say = Callable[[str], None]
MAX_REPROBES = 4  # plans re-made after keeping newly found culprits whole, before the build gives up


@dataclass
class SearchMemo:
    """What a search computes once and reuses: uniform plans by ratio (with their MACs and params), and the
    executor's handle of the shared inputs with what it was made from. Cleared, never chosen."""

    plans: dict[float, tuple[Plan, int, int]] = field(default_factory=dict)
    shared: tuple | None = None


@dataclass
class SearchContext:
    """What the search needs: the model, its scores, the target, the backend and where to put round artifacts.

    The build's inputs come first and stay as set (spec … compensating, calibration, executor, in_flight); the
    search changes the rest: the model and its scores (blocks removed, groups kept whole), the cost model, the
    steepness choice, the reference's quiet level, and what the depth choice measured.
    """

    model: nn.Module
    example: torch.Tensor
    scored: list[ScoredGroup]
    spec: str
    method: str
    target: Target
    backend: Backend
    device: Device
    workdir: Path
    say: Say = print
    reference: Artifact | None = None  # timed alongside every candidate (speedup budgets): the unpruned artifact
    # The quickest the reference ran on this machine (the baseline alone, or alongside any candidate since): a timing
    # whose reference ran far over it is taken again (lower_quiet_level).
    quiet_reference_ms: float | None = None
    unprunable: dict[str, str] = field(default_factory=dict)  # group root → why it is kept whole
    evaluate: Callable[[nn.Module], float] | None = None  # quality of a pruned model, for the report's trade-off plot
    structure: Structure | None = None  # the layers and groups as numbers: costs of a plan without pruning a copy
    latency_model: LatencyModel | None = None
    allocation: str = "global"
    # Task batches global allocation's steepness is chosen on (search/steepness.py), at the first plan it makes; without
    # them (synthetic data), steepness 0. The choice, once settled (made between different plans), holds for every
    # later plan of the build.
    steepness_batches: list | None = None
    steepness_unlabelled: list | None = None  # the task's unlabelled batches: a compensating build's refit uses them
    steepness: SteepnessChoice | None = None
    # The same groups scored for another choice of which channels a cut group keeps (the keys of
    # steepness.CHANNEL_CHOICES: "l2", "l1" magnitude, "energy"), judged beside the build's own scores on the steepness
    # batches (search/steepness.py). Empty: none offered.
    channel_scores: dict[str, list[ScoredGroup]] = field(default_factory=dict)
    compensating: bool = False  # the build refits by least squares after pruning (steepness is judged after it too)
    # The model with every block where the depth choice removed some (``model`` is then the model without them): the
    # build's final refit aims at it and its quality is judged against it, so the steepness choice's are too.
    unpruned: nn.Module | None = None
    calibration: torch.Tensor | None = None  # images a full-int8 export calibrates its ranges on
    executor: object = field(default_factory=LocalExecutor)  # where candidates are pruned, exported, measured
    nodes_device: Device | None = None  # where per-node times are taken (the build's device, not a pool); None: never
    in_flight: int = 1  # candidates per round, measured at once on an executor with workers
    # The depth choice's measured channel cuts of the model the search starts from: (structure key, widths, ms).
    measured_cuts: list[tuple[str, np.ndarray, float]] = field(default_factory=list)
    memo: SearchMemo = field(default_factory=SearchMemo)  # what is computed once, not chosen

    def shared(self) -> object:
        """The executor's handle of share(): sent to the workers once per build, not once per candidate, and again
        when what it holds changes (the model, the executor, the reference or its quiet level)."""
        key = (id(self.model), id(self.executor), self.reference, self.quiet_reference_ms)
        if self.memo.shared is None or self.memo.shared[0] != key:
            self.memo.shared = (key, self.executor.share(self.share()))
        return self.memo.shared[1]

    def keep_whole(self, groups: dict[str, str]) -> None:
        """Keep these groups unpruned from now on; MACs computed for earlier plans no longer apply."""
        self.unprunable.update(groups)
        self.scored = [replace(g, scores=None) if g.module in self.unprunable else g for g in self.scored]
        self.memo.plans.clear()

    def plan_at(self, ratio: float) -> tuple[Plan, int, int]:
        """The uniform plan for ``ratio`` with its MACs and params, computed once per ratio."""
        ratio = round(ratio, 4)
        if ratio not in self.memo.plans:
            self.memo.plans[ratio] = self.checked_plan(lambda: self._uniform(ratio))
        return self.memo.plans[ratio]

    def plan_for(self, goal: float, cost: Callable | None = None, choose: bool = True) -> tuple[Plan, int, int]:
        """The plan the allocator picks for a predicted ``cost`` (default: latency in ms) within ``goal``, with its
        MACs and params. With ``choose`` (default), a steepness not settled yet is chosen at this goal first."""

        def make(steepness: float | None = None, channels: str | None = None) -> Plan:
            if steepness is None:
                steepness = self.steepness.chosen if self.steepness else 0.0
                channels = self.steepness.channels if self.steepness else IMPORTANCE
            plan = allocate(self.scored, self.structure, cost or self.latency_model.predict, goal,
                            self.target.channel_multiple, self.allocation, self.spec, tuple(self.example.shape),
                            self.method, steepness)  # fmt: skip
            return plan if channels == IMPORTANCE else rechoose_channels(plan, self.channel_scores[channels])

        unsettled = self.steepness is None or not self.steepness.settled
        if self.allocation == "global" and unsettled and self.steepness_batches and choose:
            first = self.steepness is None
            predict = cost or self.latency_model.predict
            self.steepness = choose_steepness(self.model, self.example, self.steepness_batches, make,
                                              compensating=self.compensating, unlabelled=self.steepness_unlabelled,
                                              reference=self.unpruned,
                                              cost=lambda plan: predict(self.structure.widths_of(plan)),
                                              goal=goal, channels=self.channel_choices())  # fmt: skip
            if first or self.steepness.settled:
                self.say(f"global allocation: {self.steepness.describe()}")
        return self.checked_plan(make)

    def channel_choices(self) -> tuple[str, ...]:
        """Which channels a cut group may keep: the build's scores, and the other choices it has scores for."""
        return (IMPORTANCE, *self.channel_scores)

    def checked_plan(self, make: Callable[[], Plan]) -> tuple[Plan, int, int]:
        """Make a plan, prune a copy by it and count. torch-pruning's index mapping can fail at one width and not
        another (grouped convs, split/concat), so a plan that fails to prune or run is probed at its own widths;
        the culprits are kept whole and the plan is made again without them."""
        plan = make()
        for _ in range(MAX_REPROBES):
            try:
                return (plan, *count_macs_params(apply_plan(self.model, plan, self.example), self.example))
            except Exception as exc:  # whatever the model's own code raises at these widths
                failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            widths = {g.module: g.width for g in plan.groups}
            found = find_unprunable(self.model, self.example, self.scored, self.target.channel_multiple, widths=widths)
            if not found:
                break
            self.say(f"at the widths of this plan, {len(found)} more groups cannot be pruned safely: kept whole")
            self.keep_whole(found)
            # A plan made from fixed widths (edgeprune profile's samples) would cut them again: undo their cuts.
            plan = make()
            whole = [
                replace(g, kept=tuple(range(g.channels))) if g.module in self.unprunable else g for g in plan.groups
            ]
            plan = replace(plan, groups=tuple(whole))
        raise BadInput(f"torch-pruning cannot prune this model consistently at the widths the budget needs"
                       f" ({failure}); relax the budget, or pass --strict to list the groups")  # fmt: skip

    def _uniform(self, ratio: float) -> Plan:
        return uniform_plan(
            self.scored, ratio, self.target.channel_multiple, self.spec, tuple(self.example.shape), self.method
        )

    def share(self) -> BuildShare:
        """The inputs every candidate shares (farm/work.py)."""
        return BuildShare(self.model, self.example, self.target, self.backend.name, self.device, self.workdir,
                          self.reference, self.quiet_reference_ms, self.calibration)  # fmt: skip

    def measure(self, model: nn.Module, name: str) -> tuple[Measurement, Artifact]:
        """Export ``model`` into its own folder of the work dir and benchmark it on the device, in this process
        (beside the reference, with the slow state's retakes where a quiet level is set, as the rounds are)."""
        measurement, artifact = export_and_measure(self.share(), model, name)
        lower_quiet_level(self, measurement)
        return measurement, artifact


def lower_quiet_level(ctx: SearchContext, measurement: Measurement) -> None:
    """Lower the quiet level to the reference's p50 alongside this candidate where it ran quicker: contention only
    adds time. A baseline timed in the slow state had set the level ~1.45x high, where no timing could be told slow
    (2026-12-04: the demo failed its final check in two builds of three, its slow timings at 1.0x and 1.4x)."""
    if ctx.quiet_reference_ms and measurement.reference_p50:
        ctx.quiet_reference_ms = min(ctx.quiet_reference_ms, measurement.reference_p50)
