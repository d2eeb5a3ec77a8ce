"""Tests of edgeprune.data: ImageFolder and .npz loading, the seeded subset, synthetic data and every bad-input case."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from edgeprune.data import DataError, Dataset, load_dataset
from edgeprune.errors import BadInput

SHAPE = (1, 3, 8, 8)
HALF = (0.5, 0.5, 0.5)
UNIT = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _image(path: Path, color: object = (255, 255, 255), size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def data_error(path: Path | str, *args: object, **kwargs: object) -> str:
    # Every bad-data case must be a DataError (exit code 2) with a one-line message that names the file.
    with pytest.raises(DataError) as info:
        load_dataset(str(path), *args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2
    return message


# ImageFolder


def test_image_folder_shapes_labels_and_sorted_classes(tmp_path: Path) -> None:
    _image(tmp_path / "zebra" / "b.png", mode="L", color=255)
    _image(tmp_path / "zebra" / "a.JPG", size=(30, 7))
    _image(tmp_path / "ant" / "x.bmp", mode="RGBA", color=(255, 255, 255, 255))
    _image(tmp_path / "ant" / "nested" / "y.webp")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    data = load_dataset(str(tmp_path), SHAPE, *UNIT, limit=None)
    assert isinstance(data, Dataset) and not data.synthetic and data.source == str(tmp_path)
    assert data.class_names == ("ant", "zebra")
    assert data.x.shape == (4, 3, 8, 8) and data.x.dtype == torch.float32
    assert data.y is not None and data.y.dtype == torch.int64 and data.y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(data.x, torch.ones_like(data.x), atol=1e-6)  # all white, mean 0, std 1: scaled to [0, 1]


def test_normalisation_is_applied(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "white.png", (255, 255, 255))
    _image(tmp_path / "b" / "black.png", (0, 0, 0))
    data = load_dataset(str(tmp_path), SHAPE, HALF, HALF)
    assert torch.equal(data.x[0], torch.ones(3, 8, 8)) and torch.equal(data.x[1], -torch.ones(3, 8, 8))
    per_channel = load_dataset(str(tmp_path), SHAPE, (0.0, 0.5, 1.0), (1.0, 0.5, 0.25))
    assert per_channel.x[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    # 300×100 with only the middle third white: the shorter side goes to 32, the centre crop is that third.
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, 100:200] = 255
    Image.fromarray(pixels).save(_image(tmp_path / "c" / "wide.png"))
    data = load_dataset(str(tmp_path), (1, 3, 32, 32), *UNIT)
    assert torch.allclose(data.x[0, :, :, 2:-2], torch.ones(3, 32, 28), atol=1e-6)


def test_grayscale_model_gets_one_channel(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "rgb.png", (255, 0, 0))
    data = load_dataset(str(tmp_path), (1, 1, 6, 5), (0.0,), (1.0,))
    assert data.x.shape == (1, 1, 6, 5) and 0.2 < float(data.x.mean()) < 0.4  # PIL's luma of pure red is 76/255


def test_class_balanced_seeded_limit(tmp_path: Path) -> None:
    for cls, count in (("a", 6), ("b", 2), ("c", 4)):
        for i in range(count):
            _image(tmp_path / cls / f"{i}.png", (i * 20, 0, 0), size=(8, 8))
    six = load_dataset(str(tmp_path), SHAPE, *UNIT, limit=6, seed=3)
    assert sorted(six.y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(load_dataset(str(tmp_path), SHAPE, *UNIT, limit=3).y.tolist()) == [0, 1, 2]
    eight = load_dataset(str(tmp_path), SHAPE, *UNIT, limit=8).y.tolist()
    assert eight.count(1) == 2 and eight.count(0) == 3 and eight.count(2) == 3  # b runs out, the rest round-robin
    again = load_dataset(str(tmp_path), SHAPE, *UNIT, limit=6, seed=3)
    assert torch.equal(six.x, again.x) and torch.equal(six.y, again.y)
    picks = {tuple(load_dataset(str(tmp_path), SHAPE, *UNIT, limit=6, seed=s).x[:, 0, 0, 0].tolist()) for s in range(6)}
    assert len(picks) > 1  # the seed does choose


def test_make_sample_writes_a_loadable_image_folder(tmp_path: Path) -> None:
    module = make_sample()
    root = module.make_image_folder(tmp_path / "sample", classes=3, per_class=4, size=16, seed=1)
    data = load_dataset(str(root), (1, 3, 16, 16), HALF, HALF)
    assert len(data) == 12 and len(data.class_names) == 3 and data.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    again = module.make_image_folder(tmp_path / "again", classes=3, per_class=4, size=16, seed=1)
    assert (root / "00_gradient" / "000.png").read_bytes() == (again / "00_gradient" / "000.png").read_bytes()


# .npz


def test_npz_float_is_used_as_is_and_limited(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3, 8, 8))
    path = _npz(tmp_path / "calib.npz", x=x)
    data = load_dataset(str(path), SHAPE, HALF, HALF, limit=None)
    assert data.y is None and data.x.dtype == torch.float32 and data.class_names == ()
    assert torch.equal(data.x, torch.from_numpy(x.astype(np.float32)))
    sub = load_dataset(str(path), SHAPE, HALF, HALF, limit=4, seed=7)
    assert len(sub) == 4 and torch.equal(sub.x, load_dataset(str(path), SHAPE, HALF, HALF, limit=4, seed=7).x)
    rows = [int(np.flatnonzero((x.astype(np.float32) == r.numpy()).all(axis=(1, 2, 3)))[0]) for r in sub.x]
    assert rows == sorted(rows)  # the subset keeps the file's order


def test_npz_uint8_layouts_are_scaled_and_normalised(tmp_path: Path) -> None:
    nchw = np.random.default_rng(1).integers(0, 256, size=(5, 3, 8, 8), dtype=np.uint8)
    a = load_dataset(str(_npz(tmp_path / "nchw.npz", x=nchw)), SHAPE, HALF, HALF)
    b = load_dataset(str(_npz(tmp_path / "nhwc.npz", x=nchw.transpose(0, 2, 3, 1))), SHAPE, HALF, HALF)
    expected = torch.from_numpy((nchw.astype(np.float32) / 255 - 0.5) / 0.5)
    assert torch.allclose(a.x, expected) and torch.equal(a.x, b.x)
    gray = np.full((2, 4, 4), 255, dtype=np.uint8)
    g = load_dataset(str(_npz(tmp_path / "gray.npz", x=gray)), (1, 1, 4, 4), (0.5,), (0.5,))
    assert g.x.shape == (2, 1, 4, 4) and torch.equal(g.x, torch.ones(2, 1, 4, 4))


def test_npz_labels_and_balanced_limit(tmp_path: Path) -> None:
    x = np.zeros((12, 3, 8, 8), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(12)
    y = np.array([0] * 8 + [1] * 2 + [5] * 2, dtype=np.int32)
    path = _npz(tmp_path / "task.npz", x=x, y=y)
    full = load_dataset(str(path), SHAPE, *UNIT, limit=None)
    assert full.y.dtype == torch.int64 and full.y.tolist() == y.tolist()
    sub = load_dataset(str(path), SHAPE, *UNIT, limit=6)
    assert sorted(sub.y.tolist()) == [0, 0, 1, 1, 5, 5]
    assert all(y[int(v)] == label for v, label in zip(sub.x[:, 0, 0, 0], sub.y.tolist(), strict=True))


# synthetic and batches


def test_synthetic_is_reproducible() -> None:
    a = load_dataset(None, SHAPE, HALF, HALF, limit=10, seed=4)
    assert a.synthetic and a.source == "synthetic" and a.y is None and a.x.shape == (10, 3, 8, 8)
    assert torch.equal(a.x, load_dataset(None, SHAPE, HALF, HALF, limit=10, seed=4).x)
    assert not torch.equal(a.x, load_dataset(None, SHAPE, HALF, HALF, limit=10, seed=5).x)
    assert len(load_dataset(None, (1, 16), HALF, HALF, limit=None)) == 64


def test_batches_in_order() -> None:
    x, y = torch.arange(5.0).reshape(5, 1), torch.arange(5)
    batches = list(Dataset(x, y, "t", False).batches(2))
    assert [b[0].flatten().tolist() for b in batches] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    assert [b[1].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert all(b[1] is None for b in Dataset(x, None, "t", False).batches(3))


# bad input: one DataError per case, one line, naming the file


def test_missing_path_and_unsupported_format(tmp_path: Path) -> None:
    assert "ImageFolder" in data_error(tmp_path / "nope.npz", SHAPE, HALF, HALF)
    csv = tmp_path / "data.csv"
    csv.write_text("1,2,3\n")
    assert ".npz" in data_error(csv, SHAPE, HALF, HALF)


def test_corrupt_and_non_zip_npz(tmp_path: Path) -> None:
    text = tmp_path / "text.npz"
    text.write_text("hello\nworld\n")
    data_error(text, SHAPE, HALF, HALF)
    good = _npz(tmp_path / "good.npz", x=np.zeros((4, 3, 8, 8), np.float32)).read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    data_error(truncated, SHAPE, HALF, HALF)
    npy = tmp_path / "single.npz"
    with npy.open("wb") as f:
        np.save(f, np.zeros((4, 3, 8, 8), np.float32))
    assert ".npy" in data_error(npy, SHAPE, HALF, HALF)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY garbage")
    broken = tmp_path / "broken_member.npz"
    broken.write_bytes(buf.getvalue())
    data_error(broken, SHAPE, HALF, HALF)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))
    assert "pickle" in data_error(path, SHAPE, HALF, HALF)


def test_missing_x(tmp_path: Path) -> None:
    assert "'x'" in data_error(_npz(tmp_path / "nox.npz", inputs=np.zeros(3)), SHAPE, HALF, HALF)


def test_unreadable_image(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "fine.png")
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    message = data_error(tmp_path, SHAPE, HALF, HALF)
    assert str(bad) in message


def test_empty_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    data_error(empty, SHAPE, HALF, HALF)
    loose = tmp_path / "loose"
    _image(loose / "img.png")
    assert "class folder" in data_error(loose, SHAPE, HALF, HALF)
    no_images = tmp_path / "no_images"
    _image(no_images / "cat" / "img.png")
    (no_images / "dog").mkdir()
    (no_images / "dog" / "readme.txt").write_text("x")
    assert "'dog'" in data_error(no_images, SHAPE, HALF, HALF)


def test_image_folder_needs_an_image_input_shape(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "img.png")
    data_error(tmp_path, (1, 5, 8, 8), (0.0,), (1.0,))
    data_error(tmp_path, (1, 16), (0.0,), (1.0,))
    data_error(tmp_path, SHAPE, (0.5, 0.5), HALF)
    data_error(tmp_path, SHAPE, HALF, (0.5, 0.0, 0.5))


@pytest.mark.parametrize(
    "x, word",
    [
        (np.zeros((2, 3, 8, 8), dtype=np.int64), "dtype"),
        (np.zeros((2, 3, 8, 8), dtype=bool), "dtype"),
        (np.zeros((2, 3, 8, 8), dtype=np.complex64), "dtype"),
        (np.array(["a", "b"]), "dtype"),
        (np.zeros((0, 3, 8, 8), dtype=np.float32), "no samples"),
        (np.zeros((2, 3, 8, 8), dtype=np.float32) + np.array([np.nan, 0]).reshape(2, 1, 1, 1), "NaN"),
        (np.full((2, 3, 8, 8), np.inf, dtype=np.float32), "infinite"),
        (np.full((2, 3, 8, 8), 1e300), "float32 range"),
        (np.zeros((2, 8, 8, 3), dtype=np.float32), "transpose"),
        (np.zeros((2, 3, 8, 9), dtype=np.uint8), "--input-shape 1,3,8,9"),
        (np.zeros((3,), dtype=np.float32), "shape"),
    ],
)
def test_bad_x(tmp_path: Path, x: np.ndarray, word: str) -> None:
    assert word in data_error(_npz(tmp_path / "calib.npz", x=x), SHAPE, HALF, HALF)


def test_shape_mismatch_message(tmp_path: Path) -> None:
    path = _npz(tmp_path / "calib.npz", x=np.zeros((10, 3, 32, 32), np.float32))
    assert data_error(path, (1, 3, 224, 224), HALF, HALF) == (
        f"{path}: 'x' has shape (10, 3, 32, 32) but the model takes (3, 224, 224); "
        "resize the data or pass --input-shape 1,3,32,32"
    )


@pytest.mark.parametrize(
    "y, word",
    [
        (np.zeros(3, dtype=np.int64), "4 samples"),
        (np.zeros((4, 1), dtype=np.int64), "shape"),
        (np.array([0, 1, -1, 2]), "negative"),
        (np.array([0.0, 1.0, 0.0, 1.0]), "integers"),
        (np.array([0, 1, 2**64 - 1, 0], dtype=np.uint64), "too large"),
    ],
)
def test_bad_y(tmp_path: Path, y: np.ndarray, word: str) -> None:
    path = _npz(tmp_path / "task.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=y)
    assert word in data_error(path, SHAPE, HALF, HALF)


def test_bad_limit_and_input_shape(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        load_dataset(None, SHAPE, HALF, HALF, limit=0)
    with pytest.raises(DataError):
        load_dataset(None, (1, 0, 4), HALF, HALF)


# property: nothing but a Dataset or a DataError


def _load_ordata_error(path: Path) -> None:
    try:
        data = load_dataset(str(path), SHAPE, HALF, HALF, limit=3)
    except DataError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert data.x.dtype == torch.float32 and data.x.shape[1:] == SHAPE[1:] and torch.isfinite(data.x).all()
        assert data.y is None or (data.y.dtype == torch.int64 and len(data.y) == len(data))


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_DTYPES = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes())
_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    st.tuples(st.integers(0, 4), st.just(3), st.just(8), st.just(8)),
    st.tuples(st.integers(0, 4), st.just(8), st.just(8), st.just(3)),
)


def _valid_npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((4, 3, 8, 8), np.uint8), y=np.arange(4))
    return buf.getvalue()


_VALID = _valid_npz_bytes()


# A valid archive with a few bytes overwritten and perhaps cut short reaches the zip and npy parsers' deeper paths.
def _mutate(edits: list[tuple[int, int]], length: int) -> bytes:
    data = bytearray(_VALID)
    for index, value in edits:
        data[index] = value
    return bytes(data[:length])


_MUTATED = st.builds(
    _mutate,
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(1, len(_VALID)),
)


@_SETTINGS
@given(payload=st.binary(max_size=512) | st.binary(max_size=512).map(lambda b: b"PK\x03\x04" + b) | _MUTATED)
def test_arbitrary_bytes_never_escape(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "fuzz.npz"
    path.write_bytes(payload)
    _load_ordata_error(path)


@_SETTINGS
@given(
    x=_SHAPES.flatmap(lambda shape: hnp.arrays(_DTYPES, shape)),
    y=st.none() | hnp.arrays(hnp.integer_dtypes() | hnp.floating_dtypes(), hnp.array_shapes(min_dims=0, max_dims=2)),
)
def test_arbitrary_arrays_never_escape(tmp_path: Path, x: np.ndarray, y: np.ndarray | None) -> None:
    path = tmp_path / "fuzz.npz"
    np.savez(path, x=x) if y is None else np.savez(path, x=x, y=y)
    _load_ordata_error(path)


def test_the_held_out_split_is_stratified_and_every_batch_mixes_the_classes():
    """A class-ordered dataset (an ImageFolder, or an .npz written class by class): each class keeps its share of
    the held-out part, and the training part comes class-interleaved, since fine-tuning reads its batches in order
    (batches of one class each left a new head at chance)."""
    from edgeprune.data import split_held_out

    y = torch.arange(10).repeat_interleave(10)  # 0,0,...,1,1,...
    data = Dataset(
        x=torch.arange(100, dtype=torch.float32).reshape(100, 1, 1, 1), y=y, source="sorted", synthetic=False
    )
    train, held = split_held_out(data)
    assert len(train) == 75 and len(held) == 25
    assert sorted(torch.bincount(held.y, minlength=10).tolist()) == [2] * 5 + [3] * 5
    for x, labels in train.batches(16):
        assert len(set(labels.tolist())) >= min(len(labels), 10) * 0.8
        assert all(int(data.y[int(v)]) == int(label) for v, label in zip(x.flatten(), labels, strict=True))
    assert sorted(torch.cat([train.x, held.x]).flatten().tolist()) == list(range(100))  # nothing lost or repeated


def test_a_large_data_set_holds_out_at_most_held_out_max():
    from edgeprune.data import HELD_OUT_MAX, split_held_out

    data = Dataset(x=torch.zeros(10_000, 4, dtype=torch.int64), y=None, source="corpus", synthetic=False)
    train, held = split_held_out(data)
    assert len(held) == HELD_OUT_MAX and len(train) == 10_000 - HELD_OUT_MAX  # not a quarter: 2,500
