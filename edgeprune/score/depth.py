"""Depth choice is part of the search (edgeprune/search/depth.py); these names are importable here for loop.py,
pipeline.py and tools/, which still name this module (an upward import, allow-listed in tests/test_layers.py)."""

from edgeprune.search.depth import AUTO, DepthChoice, check_drop_blocks, choose_blocks, choose_depth, without_blocks

__all__ = ["AUTO", "DepthChoice", "check_drop_blocks", "choose_blocks", "choose_depth", "without_blocks"]
