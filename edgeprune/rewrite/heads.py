"""After attention heads are cut, each attention module's head count (and the widths derived from it) follows."""

from __future__ import annotations

from torch import nn

from edgeprune.graph.heads import (
    head_of,  # noqa: F401  (adapt.py imports it from here)
    is_hf_attention,
    is_timm_attention,
)


def sync_head_counts(model: nn.Module) -> None:
    """Set every attention module's head count (and the widths derived from it) from its pruned projections."""
    for module in model.modules():
        if is_hf_attention(module):
            module.num_attention_heads = module.query.out_features // module.attention_head_size
            module.all_head_size = module.num_attention_heads * module.attention_head_size
        elif is_timm_attention(module):
            module.num_heads = module.qkv.out_features // (3 * module.head_dim)
            if hasattr(module, "attn_dim"):
                module.attn_dim = module.num_heads * module.head_dim
