"""The judge every figure of a build is measured by (edgeprune/rewrite/judge.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny

from edgeprune.rewrite.judge import Judge, quality


def test_quality_accuracy_with_labels_fidelity_without():
    model, other = tiny(seed=0), tiny(seed=2)
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        predicted, reference = model(x).argmax(1), other(x).argmax(1)
    labels = predicted.clone()
    labels[:3] = (labels[:3] + 1) % 10  # 9 of 12 right
    metric, value = quality(model, other, [(x[:6], labels[:6]), (x[6:], labels[6:])])
    assert (metric, value) == ("accuracy", 9 / 12)
    metric, value = quality(model, other, [(x[:6], None), (x[6:], None)])
    assert metric == "fidelity"
    assert value == pytest.approx(float((predicted == reference).float().mean()))
    assert quality(model, model, [(x, None)]) == ("fidelity", 1.0)
    metric, value = quality(model, other, [])
    assert metric == "fidelity" and math.isnan(value)


def test_a_judge_runs_the_reference_once_for_every_model_it_scores():
    """A build judges each candidate, the recovery's before and after and every early-stopping check against the
    same unpruned model: its outputs are computed once, and the scores are those quality() gives."""
    reference, models = tiny(seed=0), [tiny(seed=s) for s in (2, 3, 4)]
    runs = []
    reference.register_forward_hook(lambda module, args, out: runs.append(len(args[0])))
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    for labels in (torch.arange(12) % 10, None):
        batches = [(x[:6], None if labels is None else labels[:6]), (x[6:], None if labels is None else labels[6:])]
        judge = Judge(reference, batches)
        scores = [judge(model) for model in models]
        runs.clear()
        assert scores == [quality(model, reference, batches) for model in models]
        assert len(runs) == 2 * len(models)  # quality() runs the reference on both batches for every model
        runs.clear()
        assert [judge(model) for model in models] == scores and runs == []  # the judge ran it once, before
        baseline = judge.baseline()  # the reference's own score, from its outputs: no run either
        assert runs == [] and baseline == quality(reference, reference, batches)[1]
        # The steepness choice's distance (cosine of the logits) reads the same outputs: 0 for the reference itself.
        runs.clear()
        distances = [judge.distance(model) for model in [reference, *models]]
        assert len(runs) == 2 and distances[0] < 1e-9 and min(distances[1:]) > 1e-4  # 2: the reference judged
