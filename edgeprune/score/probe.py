"""The probe is part of the search (edgeprune/search/probe.py); these names are importable here for loop.py,
pipeline.py, profile.py and tools/, which still name this module (an upward import, allow-listed in
tests/test_layers.py)."""

from edgeprune.search.probe import find_unprunable, keep_unprunable_whole

__all__ = ["find_unprunable", "keep_unprunable_whole"]
