"""Printing a benchmark's table: markdown for docs/benchmarks/ (--markdown), or plain columns for a terminal."""

from __future__ import annotations


def print_rows(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    else:
        for row in [head, *rows]:
            print("  ".join(row))
