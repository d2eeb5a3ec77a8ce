"""A real English text task that needs no download: sentences from the Python standard library's own docstrings,
labelled by the library package they document (email, http, logging, ...).

Nothing here is generated: every sentence was written by a person, to explain code, and ships with Python. It serves
two purposes for the transformer benchmark and tests: unlabelled sentences for calibration and distillation
(``.txt``), and a small labelled classification task ("which library is this sentence about?", ``.tsv``).

A larger unlabelled corpus of the same kind of text, for distillation: the docstrings of installed packages that
edgeprune's dev install brings (torch, numpy, scipy, ...), read from their source with ``ast`` (nothing imported,
so nothing runs), about 80,000 sentences.

    python tools/text_task.py OUT_DIR [--per-class N] [--corpus]   writes sentences.txt, train.tsv, test.tsv
                                                                    (and corpus.txt)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import pkgutil
import random
import re
import sysconfig
from pathlib import Path

# Packages with many documented functions and a vocabulary of their own.
PACKAGES = ("email", "http", "logging", "unittest", "asyncio", "xml", "importlib", "mailbox", "multiprocessing",
            "urllib")  # fmt: skip
MIN_WORDS, MAX_WORDS = 6, 40
# Installed with edgeprune[dev] (scipy with scikit-learn): the corpus is the same wherever the dev install is.
CORPUS_PACKAGES = ("torch", "numpy", "scipy", "sklearn", "transformers", "ray", "onnx", "openvino", "timm")


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
            _add_sentences(text, seen)
    return list(seen)


def _add_sentences(docstring: str, seen: dict[str, None]) -> None:
    for paragraph in re.split(r"\n\s*\n", docstring):
        if re.search(r">>>|^\s{4}|[{}=|]{2}", paragraph, re.M):
            continue
        flat = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence[-1] in ".!?":
                seen.setdefault(sentence, None)


def corpus_sentences(packages=CORPUS_PACKAGES) -> list[str]:
    """The distinct prose sentences of the docstrings of the installed ``packages`` (those not installed are
    skipped), parsed from source, in a fixed order."""
    root, seen = Path(sysconfig.get_paths()["purelib"]), {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root).parts[1:-1]:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a template or a file of another Python: not prose we need
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    _add_sentences(ast.get_docstring(node) or "", seen)
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


def write_corpus(out: Path, exclude: set[str], seed: int = 0) -> int:
    """Write ``corpus.txt``: the installed packages' docstring sentences, shuffled, none of ``exclude`` (held-out
    sentences); return how many."""
    sentences = [s for s in corpus_sentences() if s not in exclude]
    random.Random(seed).shuffle(sentences)
    (out / "corpus.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return len(sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--corpus", action="store_true", help="also write corpus.txt (installed packages' docstrings)")
    args = parser.parse_args()
    counts = write_task(args.out, args.per_class)
    print(f"{sum(counts.values())} sentences in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.corpus:
        print(f"{write_corpus(args.out, set())} sentences in {args.out / 'corpus.txt'}")


if __name__ == "__main__":
    main()
