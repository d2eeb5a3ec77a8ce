"""The attention heads of a transformer: which head each projection channel belongs to, so heads go whole.

torch-pruning's dependency graph already couples a layer's query, key and value projections with the output
projection's inputs (one group, rooted at one of them). Cutting single channels out of that group would change
``head_dim``, which the attention's reshape and its 1/√d scale both rely on: the model would run and be wrong, or
not run. So a group that holds attention projections is cut in whole heads (``head_of`` maps each of its channels
to its head), and after pruning each attention module's head-count attributes are set from its new widths
(rewrite/heads.py).

Known layouts: Hugging Face BERT-family self-attention (separate ``query``/``key``/``value``, ``attention_head_size``)
and timm's ``Attention`` (one fused ``qkv`` whose outputs are [3, heads, head_dim]).
"""

from __future__ import annotations

import torch
from torch import nn


def head_of(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """For each attention projection of ``model``, the head index of each of its output channels."""
    found: dict[nn.Module, torch.Tensor] = {}
    for module in model.modules():
        if is_hf_attention(module):
            for projection in (module.query, module.key, module.value):
                found[projection] = torch.arange(projection.out_features) // module.attention_head_size
        elif is_timm_attention(module):
            attn_dim = module.num_heads * module.head_dim
            found[module.qkv] = torch.arange(module.qkv.out_features) % attn_dim // module.head_dim
    return found


def head_scores(scores: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Per-channel scores made per-head: every channel gets its head's mean, so that keeping the best channels keeps
    whole heads. Heads with equal means are told apart by a tiny bias towards lower indices (in float64), so that a
    tie can never split a head between kept and removed."""
    count = int(heads.max()) + 1
    per_head = torch.zeros(count, dtype=torch.float64).index_add_(0, heads, scores.double())
    per_head = per_head / torch.bincount(heads, minlength=count).double()
    scale = float(per_head.abs().max()) or 1.0
    per_head = per_head - torch.arange(count, dtype=torch.float64) * scale * 1e-9
    return per_head[heads]


def is_hf_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("query", "key", "value")) and isinstance(
        getattr(module, "attention_head_size", None), int
    )


def is_timm_attention(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
        and module.qkv.out_features % (3 * module.head_dim) == 0  # after pruning: fewer heads than num_heads says
    )
