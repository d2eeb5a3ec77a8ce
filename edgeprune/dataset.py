"""The Dataset every loader returns (data.py for images and arrays, tokens.py for text), the DataError they raise,
and what they share: the seeded, class-balanced subset, and the .npz reader that checks each array before reading it.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeprune.errors import BadInput

SYNTHETIC_SAMPLES = 64


class DataError(BadInput):
    """The calibration or task data is unusable; the message names the file, what is wrong and what to do."""


@dataclass(frozen=True)
class Dataset:
    """Samples ready for the model: x float32 N×C×H×W already normalised, y int64 labels (N,) or None."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str
    synthetic: bool
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        """The number of samples."""
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield (x, y) batches of at most ``batch_size`` samples, in order; y is None when there are no labels."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], None if self.y is None else self.y[start : start + batch_size]


def subset(n: int, labels: np.ndarray | None, limit: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` samples, chosen with ``seed`` and balanced over ``labels`` when given,
    ascending so the set keeps the file's (or the sorted folder's) order."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, size=limit, replace=False))
    # Round-robin over classes: each class is shuffled, then the r-th pick of every class comes before any
    # (r+1)-th pick, so a small limit still covers every class. Class order within a round is shuffled too, so the
    # leftover picks do not always favour the lowest labels.
    classes = np.unique(labels)
    class_rank = dict(zip(classes.tolist(), rng.permutation(len(classes)).tolist(), strict=True))
    idx, rank, cls = [], [], []
    for c in classes.tolist():
        members = rng.permutation(np.flatnonzero(labels == c))
        idx.append(members)
        rank.append(np.arange(members.size))
        cls.append(np.full(members.size, class_rank[c]))
    order = np.lexsort((np.concatenate(cls), np.concatenate(rank)))[:limit]
    return np.sort(np.concatenate(idx)[order])


# An array is refused from its header, before anything is decompressed, when it would take more than this.
MAX_ARRAY_BYTES = 4 << 30
_SAVE_WITH = "save with np.savez(path, x=inputs, y=labels)"


def load_npz_arrays(p: Path, name: str, check=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays x and (when present) y of an .npz file; any problem is a one-line DataError. Each array's header is
    read first, and ``check(key, shape, dtype)`` may refuse it, before its data is decompressed."""
    try:
        with p.open("rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise DataError(f"{name}: is a .npy array, not an .npz archive; {_SAVE_WITH}")
        with zipfile.ZipFile(p) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            if "x" not in members:
                found = ", ".join(map(repr, members)) or "none"  # repr: a member's name may hold a newline
                raise DataError(f"{name}: no array 'x' (found: {found[:200]}); {_SAVE_WITH}")
            keys = [key for key in ("x", "y") if key in members]
            for key in keys:
                shape, dtype = _npy_header(archive, members[key], name, key)
                if check is not None:
                    check(key, shape, dtype)
            arrays = {}
            for key in keys:
                with archive.open(members[key]) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise many exception types on a corrupt archive
        raise DataError(f"{name}: cannot read the .npz file ({one_line(exc)}); write it again with np.savez") from None
    return arrays["x"], arrays.get("y")


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, key: str) -> tuple[tuple, np.dtype]:
    """The shape and dtype an archive member declares, read without decompressing its data; DataError for object
    arrays (unpickling them could run code), arrays over MAX_ARRAY_BYTES, and members whose size disagrees."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(member)
        header_bytes = member.tell()
    if dtype.hasobject:
        raise DataError(f"{name}: '{key}' holds pickled object arrays, which are refused (loading them could run"
                        f" code); save numeric arrays: {_SAVE_WITH}")  # fmt: skip
    if any(d < 0 for d in shape):
        raise DataError(f"{name}: '{key}' declares the impossible shape {shape}; write the file again with np.savez")
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{name}: '{key}' declares an array of shape {shape} and dtype {dtype}, over the limit of"
                        f" {MAX_ARRAY_BYTES / 2**30:g} GiB; save fewer samples (a few thousand calibrate"
                        " well)")  # fmt: skip
    if info.file_size != header_bytes + size:
        raise DataError(f"{name}: '{key}' declares {size} bytes of data but its archive member holds"
                        f" {info.file_size - header_bytes}; the file is corrupt: write it again with"
                        " np.savez")  # fmt: skip
    return shape, dtype


def check_labels(name: str, y: np.ndarray | None, n: int) -> np.ndarray | None:
    """``y`` as int64 class indices, one per sample of ``n``; None without labels; else a DataError naming ``name``."""
    if y is None:
        return None
    if y.dtype.kind not in "iu":
        raise DataError(f"{name}: 'y' has dtype {y.dtype}; labels must be integers: save y.astype(np.int64)")
    if y.shape != (n,):
        raise DataError(f"{name}: 'y' has shape {y.shape} but 'x' has {n} samples; save one label per sample")
    if n and int(y.min()) < 0:
        raise DataError(f"{name}: 'y' has negative labels (min {int(y.min())}); labels are class indices 0, 1, ...")
    if n and int(y.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{name}: 'y' has labels too large for int64 (max {int(y.max())}); use class indices 0, 1, ...")
    return y.astype(np.int64)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most 160 characters, for a DataError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
