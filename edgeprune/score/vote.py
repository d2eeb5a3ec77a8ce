"""Stage 2: ``vote``, pruning that reuses the masks of similar earlier tasks (a mask bank).

Every build given ``--bank DIR`` stores what it kept (plan.json's kept channels per group) with an embedding of its
task: the mean of the pretrained model's penultimate features (the input of its output layer) over the task's
images, L2-normalised. A ``--method vote`` build embeds its own task the same way, takes the K nearest stored tasks
of the same model and input shape by cosine similarity, and scores each channel by the similarity-weighted share of
those tasks that kept it (a small term of the task's own score breaks ties), times the mean of the group's own fisher
scores on this task, so that groups stay comparable. Channels that similar tasks needed are kept, and channels they
all cut go first; the search, allocation and budget are the usual ones.

Entries also record the residual blocks their build removed whole (``dropped``). Where the build leaves the count to
edgeprune (no ``--drop-blocks``), a vote build removes the blocks that at least half of the nearest tasks' weight
removed (vote_blocks), instead of judging counts of blocks on its own few samples: the count each build chose was
the noisiest part of its plan (2 to 9 blocks across builds of one task). On EfficientNet-Lite0 and five seeds the
voted plans removed 5-8 blocks, kept the same test accuracy in the mean and built in 40% of the time (README,
"vote with the bank's blocks"). Its channels are then cut to the budget as usual. The neighbours' depth was
chosen for their own budget: with a bank built for another speedup, pass ``--drop-blocks auto`` to judge on this task.

Bank entries are plain JSON files named by their content hash; one that cannot be read or is malformed is skipped
with a warning, never fatal. Builds may share a bank: each entry is written under a temporary name of its own and
renamed into place, so that a reader sees it whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.graph.groups import build_graph, output_layers
from edgeprune.graph.plan import MAX_COUNT, read_int, read_list, read_name, short_repr
from edgeprune.score.costmodel import write_whole
from edgeprune.score.importance import ScoredGroup

K_NEAREST = 3
TIE_BREAK = 1e-3  # weight of the normalised magnitude score against the votes
MAX_ENTRY_BYTES = 16 << 20  # an entry takes a few kB to a few hundred kB: a larger file is skipped unread


def task_embedding(model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean penultimate features of ``model`` over the batches (the inputs of its output layers), L2-normalised."""
    heads = output_layers(build_graph(model, example))  # torch-pruning traces with autograd: not under no_grad
    if not heads:
        raise BadInput("vote needs a model with an output layer to embed a task; this model has none")
    total, count = None, 0
    captured: list[torch.Tensor] = []
    handle = heads[0].register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    try:
        model.eval()
        for x in batches:
            x = x.detach()
            captured.clear()
            with torch.no_grad():
                model(x)
            features = captured[-1].flatten(2).mean(2) if captured[-1].dim() > 2 else captured[-1]
            total = features.sum(0) if total is None else total + features.sum(0)
            count += len(features)
    finally:
        handle.remove()
    if not count:
        raise BadInput("vote needs task data to embed: pass --calib DATA (or --train)")
    mean = total / count
    return mean / mean.norm().clamp_min(1e-12)


def save_entry(bank: Path, spec: str, shape: tuple[int, ...], embedding: torch.Tensor, plan_dict: dict,
               info: dict) -> Path:  # fmt: skip
    """Store this build's kept channels and task embedding in ``bank``; the file is written whole or not at all."""
    bank.mkdir(parents=True, exist_ok=True)
    entry = {"model": spec, "input_shape": list(shape), "embedding": [float(v) for v in embedding],
             "kept": {g["module"]: g["kept"] for g in plan_dict["groups"]},
             "channels": {g["module"]: g["channels"] for g in plan_dict["groups"]},
             "dropped": plan_dict.get("notes", {}).get("dropped_blocks", []), "info": info}  # fmt: skip
    text = json.dumps(entry, sort_keys=True)
    path = bank / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    write_whole(path, text)  # the same name is the same content: a concurrent build writes the same bytes
    return path


def load_entries(bank: Path, spec: str, shape: tuple[int, ...], warn: Callable[[str], None] | None = None,
                 embedding_size: int | None = None, blocks: Collection[str] | None = None) -> list[dict]:  # fmt: skip
    """The bank's entries for this model and input shape. A file that cannot be read, is larger than
    MAX_ENTRY_BYTES, is a link that leaves the bank, or is not a well-formed entry is skipped, with one line to
    ``warn`` that names it; so is an entry whose embedding is not ``embedding_size`` long, or that removes blocks
    other than ``blocks`` (the model's residual blocks), where these are given."""
    entries = []
    root = Path(bank)
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            entry = _read_entry(root, path)
            if entry.get("model") == spec and entry.get("input_shape") == list(shape):
                entries.append(_checked_entry(entry, embedding_size, blocks))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not an entry
            if warn is not None:
                warn(f"bank entry {short_repr(path.name)} skipped: {' '.join(str(exc).split())[:200]}")
    return entries


def _read_entry(root: Path, path: Path) -> dict:
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise ValueError("it is a link to a file outside the bank")
    info = real.stat()
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
        raise ValueError(f"not a regular file of at most {MAX_ENTRY_BYTES >> 20} MiB")
    entry = json.loads(real.read_bytes(), parse_constant=_not_finite, parse_float=_finite)
    if not isinstance(entry, dict):
        raise ValueError(f"not a JSON object but {short_repr(entry)}")
    if not isinstance(entry.get("model"), str) or not isinstance(entry.get("input_shape"), list):
        raise ValueError("it names no model and input shape")
    return entry


def _checked_entry(entry: dict, embedding_size: int | None, blocks: Collection[str] | None) -> dict:
    """``entry`` where every value vote reads has the type and range it needs; ValueError otherwise."""
    embedding = read_list(entry.get("embedding"), "embedding", MAX_COUNT)
    if not embedding or any(isinstance(v, bool) or not isinstance(v, int | float) or abs(v) > 1e6 for v in embedding):
        raise ValueError("embedding is not a list of numbers")  # an L2-normalised mean: each within [-1, 1]
    if embedding_size is not None and len(embedding) != embedding_size:
        raise ValueError(f"embedding has {len(embedding)} values, this model's has {embedding_size}")
    kept, channels = entry.get("kept"), entry.get("channels")
    if not isinstance(kept, dict) or not isinstance(channels, dict) or set(kept) != set(channels):
        raise ValueError("kept and channels are not objects with the same groups")
    for module, indices in kept.items():
        width = read_int(channels[module], f"channels of {short_repr(module)}", 1, MAX_COUNT)
        for index in read_list(indices, f"kept of {short_repr(module)}", width):
            read_int(index, f"kept index of {short_repr(module)}", 0, width - 1)
    dropped = entry.get("dropped")
    if dropped is not None:
        names = [read_name(name, "dropped") for name in read_list(dropped, "dropped", MAX_COUNT)]
        unknown = [name for name in names if blocks is not None and name not in blocks]
        if unknown:
            raise ValueError(f"it removes {short_repr(unknown[0])}, which is not a residual block of this model")
    if not isinstance(entry.get("info", {}), dict):
        raise ValueError("info is not an object")
    return entry


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _not_finite(text: str) -> float:
    raise ValueError(f"{text} is not a number")


def nearest(entries: list[dict], embedding: torch.Tensor, k: int = K_NEAREST) -> dict[int, float]:
    """The indices of the ``k`` entries nearest to ``embedding``, with their cosine similarity to it; BadInput
    where there is none (entries whose embedding has another length are another model's: not counted)."""
    usable = [i for i, e in enumerate(entries) if len(e["embedding"]) == len(embedding)]
    if not usable:
        raise BadInput("--method vote found no earlier build of this model and input shape in the bank; build some"
                       " tasks with --bank DIR first (any method), or use another method")  # fmt: skip
    similarity = {i: float(torch.dot(embedding, torch.tensor(entries[i]["embedding"], dtype=embedding.dtype)))
                  for i in usable}  # fmt: skip
    return {i: similarity[i] for i in sorted(usable, key=lambda i: -similarity[i])[:k]}


def weight(similarity: float) -> float:
    """A neighbour's vote: its similarity, never negative, never quite zero."""
    return max(similarity, 0.0) + 1e-6


def vote_blocks(entries: list[dict], embedding: torch.Tensor, k: int = K_NEAREST) -> list[str] | None:
    """The residual blocks removed by at least half the similarity weight of the ``k`` nearest entries that record
    their blocks, most removed first (then by name); None where none of them does (an entry without ``dropped``
    records channels only)."""
    near = nearest(entries, embedding, k)
    weights = {i: weight(near[i]) for i in near if isinstance(entries[i].get("dropped"), list)}
    if not weights:
        return None
    total, share = sum(weights.values()), {}
    for i, vote in weights.items():
        for name in set(entries[i]["dropped"]):
            share[name] = share.get(name, 0.0) + vote / total
    return sorted((n for n, s in share.items() if s >= 0.5 - 1e-9), key=lambda n: (-share[n], n))


def vote_scores(scored: list[ScoredGroup], entries: list[dict], embedding: torch.Tensor,
                k: int = K_NEAREST) -> tuple[list[ScoredGroup], list[dict]]:  # fmt: skip
    """Scores from the K nearest entries' kept channels, weighted by similarity; returns the new scores and the
    neighbours used (similarity and info). Groups no neighbour covers keep their own scores."""
    near = nearest(entries, embedding, k)
    weights = {i: weight(similarity) for i, similarity in near.items()}
    voted = []
    for group in scored:
        votes = torch.zeros(group.channels)
        covered = 0.0
        for i, vote in weights.items():
            kept = entries[i]["kept"].get(group.module)
            if kept is not None and entries[i]["channels"].get(group.module) == group.channels:
                votes[kept] += vote
                covered += vote
        if group.scores is None or not covered:
            voted.append(group)
            continue
        own = group.scores / group.scores.abs().max().clamp_min(1e-12)
        shares = votes / covered + TIE_BREAK * own
        # With comparable scores (fisher's loss estimates on this task), each group's votes are scaled by what its
        # channels are worth to this task, so that global allocation still weighs groups against each other: a
        # channel no neighbour kept is nearly free to cut, one every neighbour kept costs its group's mean worth.
        # Shares alone, normalised per group, priced every group alike and cut where a channel saves most time
        # (vote lost 4 points to taylor with them: README).
        scale = group.scores.abs().mean() if group.comparable else 1.0
        voted.append(replace(group, scores=shares * scale))
    used = [{"similarity": similarity, **entries[i].get("info", {})} for i, similarity in near.items()]
    return voted, used
