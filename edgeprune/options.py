"""What a build takes (``BuildOptions``: the CLI and the Python API both fill it in), and how much data each of its
steps reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeprune.model import DEFAULT_MODEL
from edgeprune.target import Budget

BATCH = 16
# Images are read into memory whole, and a few hundred pin down BN statistics, int8 ranges and a refit; token ids are
# small, and distilling a pruned encoder wants every sentence there is (README).
IMAGE_SAMPLES = 256
# Labels are what this tool's users lack: every one counts (at the cap of 256, a 50-per-class task lost half of its).
TRAIN_IMAGE_SAMPLES = 1024  # 50 per class for 20 classes; 600 MB at 224×224
STEEPNESS_BATCHES = 8  # of BATCH samples: global allocation's steepness is chosen on their outputs
# Batches of BATCH samples the channels are scored on (4 unless listed). Fisher sums per-sample squares, which need
# more samples to settle: on ConvNeXt-atto (digits), at one uniform ratio, its channels from 64 samples kept 0.752
# top-1 agreement, from 256 0.831 (L1 magnitude 0.856; README, Scorer benchmark).
SCORE_BATCHES = {"fisher": 16}
VALIDATION_SAMPLES = 16


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build takes; the CLI and the Python API both fill this in."""

    target: str = "x86-openvino"
    model: str = DEFAULT_MODEL
    weights: str | None = None
    budget: Budget | None = None
    input_shape: tuple[int, ...] | None = None
    calib: str | None = None
    method: str = "auto"
    compensate: bool = False  # the least-squares refit after pruning, for any method
    bank: str | None = None  # mask bank folder: store this build's kept channels; vote reads it
    train: str | None = None  # the task's labelled data: a new head when its classes are not the model's outputs
    aux: str | None = None  # auxiliary data for recovery (labelled or not)
    adapt_steps: int = 100
    device: str | None = None
    out: Path = Path("out")
    force: bool = False
    max_rounds: int = 4
    recover_steps: int = 20
    calib_limit: int | None = None  # most samples read per data set; None: (TRAIN_)IMAGE_SAMPLES, or every sentence
    seed: int = 0
    trust_pickle: bool = False
    trust_pickle_from: str | None = None  # what turned unpickling on: "--trust-pickle" or a config file's path
    strict: bool = False  # a group that cannot be pruned safely is an error, not kept whole
    plan: str | None = None  # replay this plan.json instead of searching (reproducible builds)
    config: str | None = None  # the project config the settings came from, if any
    key_file: str | None = None  # manifest.json is signed with this key (HMAC-SHA256; validate --key-file checks it)
    allocation: str = "global"  # or "uniform": the same fraction of every group (for comparison)
    steepness: float | None = None  # global allocation's; None: chosen on the task's data (search/steepness.py)
    structures: str = "all"  # or "heads" / "neurons": only attention heads, or all but them (score/importance.py)
    executor: str | None = None  # where candidates run: this process (None, "local") or Ray (farm/executor.py)
    in_flight: int = 1  # candidates per round
    drop_blocks: int | str | None = None  # residual blocks removed whole first, or "auto"; None: auto where it can
