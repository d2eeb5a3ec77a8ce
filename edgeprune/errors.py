"""The errors edgeprune reports to a user: each carries the exit code of the CLI contract (DESIGN.md).

A message is one line that says what is wrong and what to do about it; the CLI prints it on stderr, without a
traceback, and exits with the code.
"""

from __future__ import annotations


class EdgepruneError(Exception):
    """Base of the errors the CLI turns into a one-line message and an exit code."""

    exit_code = 2


class BadInput(EdgepruneError):
    """The user's input (a flag, a file, a profile, a model spec) is wrong: exit code 2."""

    exit_code = 2


class BudgetNotMet(EdgepruneError):
    """The budget or the validation was not met: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report
