"""An .npz is read as an attacker may have written it: each member's header (dtype, shape, size) is checked before
anything is decompressed, against a size limit the message states."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
from test_data import HALF, SHAPE, data_error

from edgeprune.dataset import MAX_ARRAY_BYTES


def _npz_member(path: Path, shape: tuple[int, ...], dtype: str, body: bytes | int, level: int = 1) -> Path:
    """An .npz whose x.npy declares ``shape`` and ``dtype`` in its header and holds ``body`` after it (bytes, or that
    many zero bytes written in chunks), deflated: the archive a careless or hostile writer can make."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        with archive.open("x.npy", "w") as member:
            member.write(header.getvalue())
            if isinstance(body, bytes):
                member.write(body)
            else:
                chunk = bytes(1 << 24)
                for start in range(0, body, len(chunk)):
                    member.write(chunk[: body - start])
    return path


def _peak_bytes_of_failed_load(path: Path, shape: tuple[int, ...] = SHAPE) -> tuple[int, str]:
    tracemalloc.start()
    try:
        message = data_error(path, shape, HALF, HALF)
        return tracemalloc.get_traced_memory()[1], message
    finally:
        tracemalloc.stop()


def test_an_npz_declaring_more_than_the_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 1 kB archive whose header declares 15 GB: refused by the limit, which the message states, with nothing
    allocated for it."""
    path = _npz_member(tmp_path / "huge.npz", (100_000, 3, 224, 224), "|u1", bytes(1024))
    assert path.stat().st_size < 4096
    peak, message = _peak_bytes_of_failed_load(path, (1, 3, 224, 224))
    assert f"limit of {MAX_ARRAY_BYTES / 2**30:g} GiB" in message and "save fewer samples" in message, message
    assert peak < 32 << 20


def test_a_compressed_npz_of_the_wrong_shape_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    """256 MiB of zeros in a 1 MB archive, shaped for another model: the header says so, and the data is never
    inflated (decompressing it first took the whole 256 MiB)."""
    path = _npz_member(tmp_path / "bomb.npz", (21_845, 3, 64, 64), "|u1", 21_845 * 3 * 64 * 64)
    assert path.stat().st_size < 2 << 20
    peak, message = _peak_bytes_of_failed_load(path)
    assert "shape (21845, 3, 64, 64) but the model takes (3, 8, 8)" in message
    assert peak < 32 << 20


def test_an_npz_member_longer_or_shorter_than_its_header_declares_is_refused(tmp_path: Path) -> None:
    """The archive's own size of the member must be the header's shape times the item size: a file with trailing
    data, or one whose data stops short, is corrupt or crafted."""
    longer = _npz_member(tmp_path / "longer.npz", (4, 3, 8, 8), "<f4", bytes(3072 + (1 << 20)))
    assert "declares 3072 bytes of data but its archive member holds" in data_error(longer, SHAPE, HALF, HALF)
    shorter = _npz_member(tmp_path / "shorter.npz", (3000, 3, 8, 8), "<f4", bytes(64))
    assert "holds 64; the file is corrupt" in data_error(shorter, SHAPE, HALF, HALF)
