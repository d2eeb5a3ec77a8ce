"""The build's pruning methods (``--method``): what each scores channel groups with and what else it does.

Adding a method is one ``register(Method(...))`` here; the build reads only these fields, never the name. The
scorers themselves (magnitude, l2, taylor, fisher, energy) are score/importance.py's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One ``--method``: its scorer and what the build does around it."""

    name: str
    scores_with: str  # the scorer of score/importance.py its channel groups are scored with
    needs_data: bool = False  # the task's real data is required (synthetic inputs are refused)
    refits: bool = False  # the least-squares refit after pruning (rewrite/compensate.py)
    fine_tunes: bool = True  # recovery's gradient steps; False: the refit alone repairs the pruned model
    decomposes: bool = False  # layers go into SVD form first, their basis vectors pruned like channels
    basis_only: bool = False  # of a decomposed model, only the basis vectors are pruned, no channels
    votes: bool = False  # kept channels (and blocks) voted by the nearest earlier tasks of a mask bank (--bank)


BUILD_METHODS: dict[str, Method] = {}
AUTO = "auto"  # fisher on the task's data, magnitude without data (resolve_method)
# --method auto's scores with data: fisher's plans kept more than taylor's by top-1 or cosine at 8 of 11 goals (README).
AUTO_WITH_DATA = "fisher"
AUTO_WITHOUT_DATA = "magnitude"


def register(method: Method) -> Method:
    """Make ``method`` a ``--method`` of the build."""
    BUILD_METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every ``--method`` in the order they were registered, ``auto`` first."""
    return (AUTO, *BUILD_METHODS)


def resolve_method(name: str, synthetic: bool) -> Method:
    """The Method a ``--method`` name builds with; ``auto`` picks by whether the task's data is real."""
    if name == AUTO:
        name = AUTO_WITHOUT_DATA if synthetic else AUTO_WITH_DATA
    return BUILD_METHODS[name]


register(Method("magnitude", "magnitude"))
register(Method("taylor", "taylor"))
register(Method("fisher", "fisher"))
# Taylor selection (with magnitude, a 2x build stayed at chance: README), then the closed-form least-squares refit;
# no gradient step.
register(Method("compensate", "taylor", refits=True, fine_tunes=False))
# Prune SVD basis vectors; double: basis vectors and channels under one budget (rewrite/lowrank.py).
register(Method("lowrank", "l2", decomposes=True, basis_only=True))
register(Method("double", "l2", decomposes=True))
# The kept channels of the nearest earlier tasks in --bank, within each group's worth by fisher on this task.
register(Method("vote", "fisher", needs_data=True, votes=True))
