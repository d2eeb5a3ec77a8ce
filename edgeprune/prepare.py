"""The build's first phase: every input checked and loaded before the first slow step (target, backend, device,
output folder, model, data, pinned plan, mask bank), so that bad input fails in a second with one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune.adapt import adapt_to_task
from edgeprune.backends import get_backend
from edgeprune.data import Dataset, labels_in_label_space, load_dataset, split_held_out
from edgeprune.device import open_device
from edgeprune.errors import BadInput
from edgeprune.estimate import measuring_device
from edgeprune.graph.plan import Plan
from edgeprune.methods import BUILD_METHODS, Method, method_names, resolve_method
from edgeprune.model import load_model
from edgeprune.options import BATCH, IMAGE_SAMPLES, TRAIN_IMAGE_SAMPLES, BuildOptions
from edgeprune.outdir import claim_output, input_paths
from edgeprune.rewrite.depth import residual_blocks
from edgeprune.rewrite.plan import check_plan
from edgeprune.score.allocate import ALLOCATIONS
from edgeprune.score.importance import STRUCTURES
from edgeprune.score.vote import load_entries, nearest, task_embedding, vote_blocks
from edgeprune.search.depth import check_drop_blocks
from edgeprune.stages import Prepared
from edgeprune.target import load_target
from edgeprune.validate import read_key

SYNTHETIC_WARNING = (
    "no --calib data: using 64 synthetic random inputs. Importance falls back to magnitude, batch-norm"
    " recalibration and fine-tuning are skipped, and fidelity is measured on random inputs, which says"
    " little about accuracy on real images; pass --calib DATA (see calibration/README.md)"
)


@dataclass(frozen=True)
class TaskData:
    """The data sets a build reads: the task's (--train, else --calib), unlabelled --calib beside --train, --aux."""

    data: Dataset
    calib: Dataset | None
    aux: Dataset | None


@dataclass(frozen=True)
class Bank:
    """What the mask bank gives this task: its embedding, the earlier tasks' entries and their blocks (vote)."""

    embedding: object = None
    entries: tuple = ()
    voted_blocks: list[str] | None = None


def check_options(options: BuildOptions) -> None:
    """The settings that need nothing loaded."""
    if options.method not in method_names():
        raise BadInput(f"unknown --method '{options.method}'; known: {', '.join(method_names())}")
    if options.allocation not in ALLOCATIONS:
        raise BadInput(f"unknown --allocation '{options.allocation}'; known: {', '.join(ALLOCATIONS)}")
    if options.structures not in STRUCTURES:
        raise BadInput(f"unknown --structures '{options.structures}'; known: {', '.join(STRUCTURES)}")
    if options.max_rounds < 1:
        raise BadInput(f"--max-rounds must be at least 1, got {options.max_rounds}")
    if options.in_flight < 1:
        raise BadInput(f"--in-flight must be at least 1, got {options.in_flight}")
    if options.calib_limit is not None and options.calib_limit < 1:
        raise BadInput(f"--calib-limit must be at least 1, got {options.calib_limit}")


def load_task_data(options: BuildOptions, spec) -> TaskData:
    """--train: the task's labelled data; --calib: unlabelled images (int8 ranges, BN, compensation) where given."""
    shape, mean, std = spec.shape, spec.mean, spec.std
    limit = options.calib_limit or (None if spec.takes_ids else IMAGE_SAMPLES)
    train_limit = options.calib_limit or (None if spec.takes_ids else TRAIN_IMAGE_SAMPLES)
    data = load_dataset(options.train or options.calib, shape, mean, std, train_limit if options.train else limit,
                        spec=spec)  # fmt: skip
    calib = load_dataset(options.calib, shape, mean, std, limit, spec=spec) if options.train and options.calib else None
    aux = load_dataset(options.aux, shape, mean, std, limit, spec=spec) if options.aux else None
    return TaskData(data, calib, aux)


def check_method(options: BuildOptions, data: Dataset) -> None:
    """What the chosen method needs of the inputs, before anything is resolved."""
    chosen = BUILD_METHODS.get(options.method)
    if chosen is None:  # auto: whatever the data allows
        return
    if chosen.votes and (not options.bank or data.synthetic):
        raise BadInput(f"--method {chosen.name} needs --bank DIR (earlier builds' kept channels) and the task's"
                       " --calib DATA")  # fmt: skip
    if chosen.needs_data and data.synthetic:
        raise BadInput(f"--method {chosen.name} needs the task's --calib DATA")


def read_bank(options: BuildOptions, method: Method, model: nn.Module, example: torch.Tensor, data: Dataset,
              drop_blocks, say) -> Bank:  # fmt: skip
    """The task's embedding for the mask bank (the *pretrained* model's features, comparable across tasks), and for
    vote the nearest earlier tasks; where the count is left open, the blocks they removed (score/vote.py)."""
    if not options.bank or data.synthetic:
        return Bank()
    embedding = task_embedding(model, example, (x for x, _ in data.batches(BATCH)))
    if not method.votes:
        return Bank(embedding)
    entries = load_entries(Path(options.bank), options.model, tuple(example.shape), warn=say,
                           embedding_size=len(embedding), blocks=residual_blocks(model, example))  # fmt: skip
    nearest(entries, embedding)  # an empty bank is bad input now, not after the baseline is measured
    voted = vote_blocks(entries, embedding) if options.drop_blocks is None and drop_blocks else None
    return Bank(embedding, tuple(entries), voted)


def prepare(options: BuildOptions, say) -> Prepared:
    """Check and load everything a build takes; the output folder is claimed here (outdir.py)."""
    unpickling = (options.trust_pickle_from or "trust_pickle") if options.trust_pickle else None
    torch.manual_seed(options.seed)
    target = load_target(options.target)
    budget = options.budget or target.budget
    check_options(options)
    backend = get_backend(target.backend)
    backend.require()
    device = measuring_device(open_device(options.device or target.device), backend, target, say)
    out = claim_output(Path(options.out), options.force, input_paths(options, target.path))
    key = read_key(options.key_file) if options.key_file else None
    loaded = load_model(options.model, options.weights, options.input_shape, options.trust_pickle)
    task = load_task_data(options, loaded.input)
    data = task.data
    check_method(options, data)
    drop_blocks = check_drop_blocks(options.drop_blocks, options.plan,
                                    budget.kind in ("macs_ratio", "params_ratio", "memory_mb"), data.synthetic,
                                    options.allocation)  # fmt: skip
    if target.precision == "int8" and data.synthetic:
        raise BadInput(f"target '{target.name}' is int8, whose ranges are calibrated on real images: pass --calib DATA")
    method = resolve_method(options.method, data.synthetic)
    if data.synthetic:
        say(SYNTHETIC_WARNING)
    model, example = loaded.module, loaded.input.example()
    pinned = None
    if options.plan:  # checked whole against the model before anything slow
        pinned = Plan.load_pinned(options.plan, tuple(example.shape))
        check_plan(pinned, model, example)
    bank = read_bank(options, method, model, example, data, drop_blocks, say)
    drop_blocks = drop_blocks if bank.voted_blocks is None else bank.voted_blocks
    adapted = adapt_to_task(model, example, data, options.adapt_steps, BATCH, say) if options.train else None
    data = labels_in_label_space(data, model, example, say)
    aux = labels_in_label_space(task.aux, model, example, say) if task.aux is not None else None
    score_set, eval_set = split_held_out(data)
    return Prepared(options, target, budget, backend, device, out, key, method, model, example, data, task.calib, aux,
                    score_set, eval_set, pinned, drop_blocks, bank.embedding, list(bank.entries), bank.voted_blocks,
                    adapted, unpickling)  # fmt: skip
