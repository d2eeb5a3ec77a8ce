"""edgeprune: prune a PyTorch model to a measured latency budget on an edge target, export it, and check it.

The public API: ``build`` runs one build (see ``BuildOptions``), ``load_target`` and ``list_targets`` read the
hardware profiles under targets/.
"""

from __future__ import annotations

from edgeprune.target import list_targets, load_target

__version__ = "0.1.0"


def build(options=None, say=print, **kwargs):
    """Run one build and return its report dict; pass a ``BuildOptions`` or its fields as keyword arguments."""
    from edgeprune.pipeline import BuildOptions
    from edgeprune.pipeline import build as run_build

    return run_build(options or BuildOptions(**kwargs), say=say)


__all__ = ["build", "list_targets", "load_target", "__version__"]
