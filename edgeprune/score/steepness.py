"""The steepness choice is part of the search (edgeprune/search/steepness.py); these names are importable here for
loop.py, pipeline.py and tools/, which still name this module (an upward import, allow-listed in
tests/test_layers.py)."""

from edgeprune.search.steepness import (
    IMPORTANCE,
    STEEPNESSES,
    SteepnessChoice,
    candidate_name,
    choose_steepness,
    other_channel_scores,
    output_distance,
)

__all__ = ["IMPORTANCE", "STEEPNESSES", "SteepnessChoice", "candidate_name", "choose_steepness",
           "other_channel_scores", "output_distance"]  # fmt: skip
