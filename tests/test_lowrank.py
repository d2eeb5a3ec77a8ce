"""SVD basis decomposition: exact at full rank, basis vectors prune like channels, plans replay on the original."""

from __future__ import annotations

import torch
from conftest import TinyDeeper
from torch import nn

from edgeprune.rewrite.lowrank import Decomposed, basis_only, decomposed_copy, with_decomposition
from edgeprune.rewrite.prune import apply_plan
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups

SHAPE = (1, 3, 16, 16)


def test_full_rank_decomposition_computes_the_same_function():
    torch.manual_seed(0)
    model = TinyDeeper().eval()
    decomposed, names = decomposed_copy(model, torch.zeros(SHAPE))
    assert "head" not in names  # the output layer keeps its form
    assert {"stem", "pw", "pwl", "pw2", "pwl2"} <= set(names) and "dw" not in names  # depthwise stays
    assert all(isinstance(dict(decomposed.named_modules())[n], Decomposed) for n in names)
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(decomposed(x), model(x), atol=1e-5)


def test_lowrank_prunes_basis_vectors_keeps_widths_and_replays_on_the_original():
    torch.manual_seed(0)
    model = TinyDeeper().eval()
    example = torch.zeros(SHAPE)
    decomposed, names = decomposed_copy(model, example)
    scored = basis_only(score_groups(decomposed, example, "l2"), names)
    assert {g.module for g in scored if g.scores is not None} == {f"{n}.0" for n in names}
    # Basis filters carry √s each: squared L2 ranks them by singular value, largest first.
    pw = next(g for g in scored if g.module == "pw.0")
    assert all(a >= b - 1e-6 for a, b in zip(pw.scores, pw.scores[1:], strict=False))
    plan = with_decomposition(uniform_plan(scored, 0.5, 4, "tiny", SHAPE, "lowrank"), names)
    pruned = apply_plan(decomposed, plan, example)
    assert pruned.pw[0].out_channels == 8 and pruned.pw[0].in_channels == 16 and pruned.pw[1].out_channels == 32
    kept = next(g for g in plan.groups if g.module == "pw.0").kept
    assert sorted(kept) == list(range(8))  # the 8 largest singular values
    replayed = apply_plan(model, plan, example)  # the original model: decomposed first, from the plan's notes
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()
    }
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(replayed(x), pruned(x), atol=1e-5)
        # A rank cut is an approximation of the unpruned layer: close to it, not equal.
        assert 0 < float((pruned(x) - model(x)).abs().max()) < float(model(x).abs().max())
    assert isinstance(pruned.pw, nn.Sequential)
