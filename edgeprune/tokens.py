"""Text data for token-id models: ``.txt`` and ``.tsv`` sentences tokenised with the model's tokenizer, or an
``.npz`` of token ids, as a Dataset (edgeprune/dataset.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from edgeprune.dataset import SYNTHETIC_SAMPLES, DataError, Dataset, check_labels, load_npz_arrays, subset

TEXT_SUFFIXES = (".txt", ".tsv")


@lru_cache(maxsize=4)
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tokenize(tokenizer_dir: str, sentences: list[str], length: int) -> torch.Tensor:
    """Token ids of ``sentences`` padded or truncated to ``length`` (int64, N × length, padding 0)."""
    if not tokenizer_dir:
        raise DataError("this model declares no tokenizer, so text files cannot be read; pass an .npz of token ids")
    encoded = _tokenizer(tokenizer_dir)(sentences, padding="max_length", truncation=True, max_length=length,
                                        return_tensors="pt")  # fmt: skip
    return encoded["input_ids"].to(torch.int64)


def read_text(path: Path) -> tuple[list[str], list[str] | None]:
    """Sentences of a text file: ``.txt`` one per line (unlabelled), ``.tsv`` ``label<TAB>sentence`` per line.
    Blank lines are skipped; a file with no sentence, or a .tsv line without a tab, is a one-line BadInput."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text: {' '.join(str(exc).split())[:120]}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: no sentences; write one sentence per line")
    if path.suffix.lower() != ".tsv":
        return lines, None
    labels, sentences = [], []
    for number, line in enumerate(lines, 1):
        label, tab, sentence = line.partition("\t")
        if not tab or not sentence.strip() or not label.strip():
            raise DataError(f"{path}: line {number} is not 'label<TAB>sentence'")
        labels.append(label.strip())
        sentences.append(sentence.strip())
    return sentences, labels


def load_token_dataset(path: str | None, shape: tuple[int, ...], vocab_size: int, tokenizer_dir: str,
                       limit: int | None, seed: int) -> Dataset:  # fmt: skip
    """Calibration or task data for a token-id model whose input is ``shape`` (1 × L): a ``.txt`` or ``.tsv`` file
    tokenised with the model's tokenizer, an ``.npz`` whose int ``x`` holds ids (N × L, optional int ``y``), or
    None for ``limit`` seeded random ids. At most ``limit`` samples, balanced over labels; every problem is a
    one-line DataError naming the file."""
    length = int(shape[-1])
    if len(shape) != 2:
        raise DataError(f"a token-id model takes input shape 1,L (sequence length L), not {','.join(map(str, shape))}")
    if path is None:
        generator = torch.Generator().manual_seed(seed)
        low = min(1000, max(vocab_size - 1, 1))  # above BERT's special and unused tokens
        x = torch.randint(low, max(vocab_size, low + 1), (limit or SYNTHETIC_SAMPLES, length), generator=generator)
        return Dataset(x=x, y=None, source="synthetic", synthetic=True)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file; text data is a .txt (one sentence per line), a .tsv"
                        " (label<TAB>sentence) or an .npz of token ids")  # fmt: skip
    class_names: tuple[str, ...] = ()
    if file.suffix.lower() in TEXT_SUFFIXES:
        sentences, names = read_text(file)
        labels = None
        if names is not None:
            class_names = tuple(sorted(set(names)))
            labels = np.array([class_names.index(n) for n in names], dtype=np.int64)
        keep = subset(len(sentences), labels, limit, seed)
        x = tokenize(tokenizer_dir, [sentences[i] for i in keep.tolist()], length)
        y = None if labels is None else torch.from_numpy(labels[keep])
        return Dataset(x=x, y=y, source=path, synthetic=False, class_names=class_names)
    if file.suffix.lower() != ".npz":
        raise DataError(f"{path}: unsupported text data '{file.suffix}'; use .txt, .tsv or an .npz of token ids")
    ids, y = load_npz_arrays(file, path)
    if ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape[1] != length or len(ids) == 0:
        raise DataError(f"{path}: 'x' must be integer token ids of shape N×{length}, not {ids.dtype} {ids.shape}")
    if int(ids.min()) < 0 or (vocab_size and int(ids.max()) >= vocab_size):
        raise DataError(f"{path}: token ids must lie in [0, {vocab_size}), the model's vocabulary")
    labels = check_labels(path, y, len(ids))
    keep = subset(len(ids), labels, limit, seed)
    y_t = None if labels is None else torch.from_numpy(labels[keep].copy())
    return Dataset(x=torch.from_numpy(ids[keep].astype(np.int64)), y=y_t, source=path, synthetic=False)
