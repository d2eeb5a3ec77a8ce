"""A real English text task that needs no download: sentences from the Python standard library's own docstrings,
labelled by the library package they document (email, http, logging, ...).

Nothing here is generated: every sentence was written by a person, to explain code, and ships with Python. It serves
two purposes for the transformer benchmark and tests: unlabelled sentences for calibration and distillation
(``.txt``), and a small labelled classification task ("which library is this sentence about?", ``.tsv``).

    python tools/text_task.py OUT_DIR [--per-class N]   writes sentences.txt, train.tsv, test.tsv
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import random
import re
from pathlib import Path

# Packages with many documented functions and a vocabulary of their own.
PACKAGES = ("email", "http", "logging", "unittest", "asyncio", "xml", "importlib", "mailbox", "multiprocessing",
            "urllib")  # fmt: skip
MIN_WORDS, MAX_WORDS = 6, 40


def _modules(package: str) -> list:
    root = importlib.import_module(package)
    found = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        if info.name.endswith("__main__") or ".test" in info.name:
            continue  # __main__ runs on import; test modules document tests, not the library
        try:
            found.append(importlib.import_module(info.name))
        except Exception:  # optional parts (a missing C extension) are simply left out
            continue
    return found


def _docstrings(module) -> list[str]:
    texts = [inspect.getdoc(module) or ""]
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            texts.append(inspect.getdoc(obj) or "")
            texts += [inspect.getdoc(f) or "" for _, f in inspect.getmembers(obj, inspect.isfunction)]
        elif inspect.isfunction(obj):
            texts.append(inspect.getdoc(obj) or "")
    return texts


def sentences_of(package: str) -> list[str]:
    """The distinct prose sentences of ``package``'s docstrings (code, doctest and table lines left out)."""
    seen: dict[str, None] = {}
    for module in _modules(package):
        for text in _docstrings(module):
            for paragraph in re.split(r"\n\s*\n", text):
                if re.search(r">>>|^\s{4}|[{}=|]{2}", paragraph, re.M):
                    continue
                flat = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
                    if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence[-1] in ".!?":
                        seen.setdefault(sentence, None)
    return list(seen)


def write_task(out: Path, per_class: int = 60, test_per_class: int = 40, seed: int = 0) -> dict:
    """Write ``sentences.txt`` (all sentences, shuffled), ``train.tsv`` (``per_class`` per package) and
    ``test.tsv`` (``test_per_class`` others per package) under ``out``; return the counts."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    everything, train, test, counts = [], [], [], {}
    for package in PACKAGES:
        found = sentences_of(package)
        rng.shuffle(found)
        counts[package] = len(found)
        everything += found
        train += [f"{package}\t{s}" for s in found[:per_class]]
        test += [f"{package}\t{s}" for s in found[per_class : per_class + test_per_class]]
    rng.shuffle(everything)
    (out / "sentences.txt").write_text("\n".join(everything) + "\n", encoding="utf-8")
    (out / "train.tsv").write_text("\n".join(train) + "\n", encoding="utf-8")
    (out / "test.tsv").write_text("\n".join(test) + "\n", encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    counts = write_task(args.out, args.per_class)
    print(f"{sum(counts.values())} sentences in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
