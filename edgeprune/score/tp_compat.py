"""Workarounds for torch-pruning bugs that stop it from tracing real models, each narrow and named.

Applied once, on import of the scorer; every one leaves torch-pruning's behaviour unchanged where it did not fail.
"""

from __future__ import annotations

from torch_pruning.dependency import index_mapping


def _tolerate_unknown_concat_widths() -> None:
    """torch-pruning 1.6 sums the inferred input widths of a concatenation before it looks for one it could not
    infer (None), and so raises a TypeError on DPN's dual-path blocks, where the graph cannot be built at all. A
    line later it skips such a concatenation anyway (no index mapping); here the TypeError ends in the same skip.
    The groups whose pruning crosses that concatenation are left to the probe, which keeps whole any that fail,
    so the rest of the model can still be pruned. (Not yet seen end to end: torch-pruning then takes minutes to
    list dpn68's groups, and the sweep's build timed out.)"""
    original = index_mapping.update_concat_index_mapping
    if getattr(original, "edgeprune_tolerant", False):
        return

    def update(graph, cat_node) -> None:
        try:
            original(graph, cat_node)
        except TypeError:
            if None not in (getattr(cat_node.module, "concat_sizes", None) or ()):
                raise  # not the bug this works around

    update.edgeprune_tolerant = True
    # update_index_mapping looks the function up in its module's globals on every call, so this reaches it.
    index_mapping.update_concat_index_mapping = update


_tolerate_unknown_concat_widths()
