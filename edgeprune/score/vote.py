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

Bank entries are plain JSON files named by their content hash; one that cannot be read is skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.score.importance import ScoredGroup, build_graph, output_layers

K_NEAREST = 3
TIE_BREAK = 1e-3  # weight of the normalised magnitude score against the votes


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
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def load_entries(bank: Path, spec: str, shape: tuple[int, ...]) -> list[dict]:
    """The bank's entries for this model and input shape; unreadable files are skipped."""
    entries = []
    for path in sorted(Path(bank).glob("*.json")) if Path(bank).is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("model") == spec and tuple(entry.get("input_shape", ())) == tuple(shape):
            entries.append(entry)
    return entries


def nearest(entries: list[dict], embedding: torch.Tensor, k: int = K_NEAREST) -> dict[int, float]:
    """The indices of the ``k`` entries nearest to ``embedding``, with their cosine similarity to it; BadInput
    where there is none."""
    if not entries:
        raise BadInput("--method vote found no earlier build of this model and input shape in the bank; build some"
                       " tasks with --bank DIR first (any method), or use another method")  # fmt: skip
    similarity = [float(torch.dot(embedding, torch.tensor(e["embedding"], dtype=embedding.dtype))) for e in entries]
    return {i: similarity[i] for i in sorted(range(len(entries)), key=lambda i: -similarity[i])[:k]}


def weight(similarity: float) -> float:
    """A neighbour's vote: its similarity, never negative, never quite zero."""
    return max(similarity, 0.0) + 1e-6


def vote_blocks(entries: list[dict], embedding: torch.Tensor, k: int = K_NEAREST) -> list[str] | None:
    """The residual blocks removed by at least half the similarity weight of the ``k`` nearest entries that record
    their blocks, most removed first (then by name); None where none of them does (entries written before the
    thirty-first session stored channels only)."""
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
        # (vote lost 4 points to taylor with them: README, issue 4).
        scale = group.scores.abs().mean() if group.comparable else 1.0
        voted.append(replace(group, scores=shares * scale))
    used = [{"similarity": similarity, **entries[i].get("info", {})} for i, similarity in near.items()]
    return voted, used
