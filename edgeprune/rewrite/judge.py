"""How good a model is against a reference on held-out data: the one yardstick that the scorers (steepness, depth),
the build's candidates and recovery all use, so that every figure a build reports is judged the same way."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.text import is_embedding, trim_padding

Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


class Judge:
    """Scores models against ``reference`` on held-out ``batches``: accuracy where the batches have labels, else
    fidelity, the top-1 agreement with ``reference`` (1.0 = same), or for an embedding model the mean cosine
    similarity of its embeddings to ``reference``'s.

    The reference's outputs are computed once, at the first score: a build judges every candidate, the recovery's
    before and after and each early-stopping check against the same unpruned model, whose forward pass was half the
    cost of each (13.6 of the demo build's 55 s went to judging, its unpruned EfficientNet-Lite0 run five times)."""

    def __init__(self, reference: nn.Module, batches: Batches) -> None:
        self.reference, self.batches, self._outputs = reference, list(batches), None

    @torch.no_grad()
    def outputs(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """(input trimmed of padding, labels, the reference's output) for each batch."""
        if self._outputs is None:
            trimmed = [(trim_padding(self.reference, x), y) for x, y in self.batches]
            self._outputs = [(x, y, self.reference(x)) for x, y in trimmed]
        return self._outputs

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[str, float]:
        return self._score([(model(x), y, out) for x, y, out in self.outputs()], is_embedding(model))

    def baseline(self) -> float:
        """The reference's own score, from the outputs already computed: no forward pass."""
        return self._score([(out, y, out) for _, y, out in self.outputs()], is_embedding(self.reference))[1]

    @torch.no_grad()
    def distance(self, model: nn.Module) -> float:
        """Mean distance of ``model``'s outputs from the reference's: cosine distance of a classifier's logits or of
        embeddings, mean squared error otherwise. Unlike top-1 agreement it tells apart plans that agree on every one
        of a few samples. Bounded per sample (0-2), where the KL divergence of the softmax is not, so that a few
        confidently wrong samples of 128 can outweigh the rest: of the same candidates at 16 goals of four models, KL
        picked the plan that kept the most held-out top-1 at 6, the logits' cosine at 9, and a plan that kept more at
        7, less at 3 (README, "Which channels ...")."""
        model.eval()
        embedding, total, count = is_embedding(self.reference), 0.0, 0
        for x, _, reference in self.outputs():
            own = model(x)
            if embedding or own.dim() == 2:  # in float64: 1 - cos of two equal float32 vectors reads ~5e-8
                values = 1 - F.cosine_similarity(own.double(), reference.double(), dim=-1)
            else:
                values = (own - reference).pow(2).flatten(1).mean(dim=1)
            # Each is ≥ 0 in exact arithmetic; a plan that changes nothing can sum to -1e-8 in floating point.
            total, count = total + float(values.clamp_min(0).sum()), count + len(values)
        return total / max(count, 1)

    @staticmethod
    def _score(triples: list, embedding: bool) -> tuple[str, float]:
        """(metric, value) of (model's output, labels, reference's output) triples."""
        if embedding:
            if not triples:
                return "cosine", float("nan")
            return "cosine", float(torch.cat([F.cosine_similarity(own, ref, dim=-1) for own, _, ref in triples]).mean())
        total = sum(len(own) for own, _, _ in triples)
        if total == 0:
            return "fidelity", float("nan")
        if all(y is not None for _, y, _ in triples):
            return "accuracy", sum(int((own.argmax(dim=1) == y).sum()) for own, y, _ in triples) / total
        return "fidelity", sum(int((own.argmax(dim=1) == ref.argmax(dim=1)).sum()) for own, _, ref in triples) / total


def quality(model: nn.Module, reference: nn.Module, batches: Batches) -> tuple[str, float]:
    """``model`` judged against ``reference`` on ``batches`` once (see Judge, which keeps the reference's outputs)."""
    return Judge(reference, batches)(model)
