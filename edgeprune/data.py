"""Calibration and task data: ImageFolder directories and .npz files, or synthetic inputs when none is given.

Every problem with the user's data is a one-line DataError (exit code 2) that names the file; the formats are
documented in calibration/README.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgeprune.dataset import (
    SYNTHETIC_SAMPLES,
    DataError,
    Dataset,
    check_labels,
    load_npz_arrays,
    one_line,
    subset,
)
from edgeprune.text import is_embedding
from edgeprune.tokens import load_token_dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
Floats = tuple[float, ...]
_FORMATS = "pass an ImageFolder directory (root/<class>/<image>) or an .npz file with arrays x and optional y"


def load_dataset(
    path: str | None,
    input_shape: tuple[int, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    limit: int | None = 256,
    seed: int = 0,
    spec=None,
) -> Dataset:
    """Load calibration or task data for a model whose input (batch included) is ``input_shape``. ``path`` is an
    ImageFolder directory (images resized, centre-cropped, scaled to [0, 1], normalised with mean/std; labels by
    sorted class name), an .npz file (float x used as is, uint8 x scaled and normalised, optional integer y), or None
    for ``limit`` (default 64) seeded standard-normal samples. At most ``limit`` samples are kept (None keeps all),
    chosen with ``seed`` and balanced over classes when there are labels. For a token-id model (``spec``, an
    InputSpec that takes ids): text files or ids instead (edgeprune/tokens.py). Raises DataError for any bad data."""
    if len(input_shape) < 2 or any(int(d) < 1 for d in input_shape):
        raise DataError(f"input shape {tuple(input_shape)} is not a batch shape; pass --input-shape like 1,3,224,224")
    if limit is not None and limit < 1:
        raise DataError(f"the sample limit must be at least 1, got {limit}")
    if spec is not None and spec.takes_ids:  # a text model: sentences or token ids (edgeprune/tokens.py)
        return load_token_dataset(path, tuple(input_shape), spec.vocab_size, spec.tokenizer, limit, seed)
    sample = tuple(int(d) for d in input_shape[1:])
    if path is None:
        # A torch.Generator of its own keeps the set reproducible without touching the global RNG.
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((limit or SYNTHETIC_SAMPLES, *sample), generator=gen, dtype=torch.float32)
        return Dataset(x=x, y=None, source="synthetic", synthetic=True)
    p = Path(path)
    if p.is_dir():
        return _load_image_folder(p, path, sample, mean, std, limit, seed)
    if not p.exists():
        raise DataError(f"{path}: no such file or directory; {_FORMATS}")
    if p.suffix.lower() == ".npz":
        return _load_npz(p, path, sample, mean, std, limit, seed)
    raise DataError(f"{path}: unsupported data format '{p.suffix or p.name}'; {_FORMATS}")


def _norm_arrays(name: str, channels: int, mean: Floats, std: Floats) -> tuple[np.ndarray, np.ndarray]:
    # One value per channel, or one value for all of them; a zero std would turn every sample into inf.
    m, s = np.asarray(mean, dtype=np.float32).reshape(-1), np.asarray(std, dtype=np.float32).reshape(-1)
    if m.size not in (1, channels) or s.size not in (1, channels) or not np.isfinite(np.r_[m, s]).all():
        raise DataError(f"{name}: mean {mean} / std {std} do not fit {channels} channels; give 1 or {channels} values")
    if (s == 0).any():
        raise DataError(f"{name}: std {std} has a zero; give non-zero standard deviations")
    shape = (channels, 1, 1)
    return np.broadcast_to(m, (channels,)).reshape(shape), np.broadcast_to(s, (channels,)).reshape(shape)


def _image_mode(name: str, sample: tuple[int, ...]) -> str:
    if len(sample) != 3 or sample[0] not in (1, 3):
        shape = ",".join(map(str, sample))
        raise DataError(f"{name}: images need an input shape 1,3,H,W or 1,1,H,W, not 1,{shape}; use an .npz file")
    return "L" if sample[0] == 1 else "RGB"


def _load_image_folder(
    root: Path, name: str, sample: tuple[int, ...], mean: Floats, std: Floats, limit: int | None, seed: int
) -> Dataset:
    mode = _image_mode(name, sample)
    m, s = _norm_arrays(name, sample[0], mean, std)
    try:
        dirs, files, labels = _scan_folder(root, name)
    except OSError as exc:  # an unreadable folder or a broken link is the user's data too
        raise DataError(f"{name}: cannot list the folder ({one_line(exc)}); check its permissions") from None
    keep = subset(len(files), np.asarray(labels), limit, seed)
    height, width = sample[1], sample[2]
    x = np.empty((len(keep), *sample), dtype=np.float32)
    for row, i in enumerate(keep.tolist()):
        x[row] = _read_image(files[i], mode, height, width)
    x = (x - m) / s
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)[keep])
    return Dataset(torch.from_numpy(x), y, name, False, tuple(d.name for d in dirs))


def _scan_folder(root: Path, name: str) -> tuple[list[Path], list[Path], list[int]]:
    # Hidden entries (.git, .ipynb_checkpoints, macOS "._x.jpg" forks) are never data.
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not dirs:
        loose = any(f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir() if f.is_file())
        what = "has images but no class folders" if loose else "is empty"
        raise DataError(f"{name}: the folder {what}; put images in one folder per class: {name}/<class>/<image>")
    files: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(dirs):
        found = [f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
        found = sorted((f for f in found if f.is_file()), key=lambda f: f.relative_to(d).as_posix())
        if not found:
            suffixes = ", ".join(IMAGE_SUFFIXES)
            raise DataError(f"{name}: class folder '{d.name}' has no images ({suffixes}); add some or remove it")
        files += found
        labels += [label] * len(found)
    return dirs, files, labels


def _read_image(file: Path, mode: str, height: int, width: int) -> np.ndarray:
    # Resize the shorter side to max(H, W), then centre-crop: the usual evaluation preprocessing of image models.
    try:
        with Image.open(file) as im:
            img = im.convert(mode)
            w, h = img.size
            target = max(height, width)
            scale = target / min(w, h)
            nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - width) // 2, (nh - height) // 2
            arr = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on bad files
        raise DataError(f"{file}: cannot read the image ({one_line(exc)}); replace or remove the file") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_npz(
    p: Path, name: str, sample: tuple[int, ...], mean: Floats, std: Floats, limit: int | None, seed: int
) -> Dataset:
    def check(key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if key == "x":
            _check_x_header(name, shape, dtype, sample)

    x, y = load_npz_arrays(p, name, check)
    n = _check_x(name, x)
    labels = check_labels(name, y, n)
    keep = subset(n, labels, limit, seed)
    if x.dtype == np.uint8:
        m, s = _norm_arrays(name, sample[0], mean, std)
        xs = x[keep]
        xs = xs if xs.shape[1:] == sample else xs[:, None] if xs.ndim == 3 else xs.transpose(0, 3, 1, 2)
        data = (xs.astype(np.float32) / 255.0 - m) / s
    else:
        with np.errstate(over="ignore"):
            data = x[keep].astype(np.float32)
        if not np.isfinite(data).all():
            raise DataError(f"{name}: 'x' has values beyond the float32 range; rescale the data")
    y_t = None if labels is None else torch.from_numpy(labels[keep].copy())
    return Dataset(torch.from_numpy(np.ascontiguousarray(data)), y_t, name, False)


def _check_x_header(name: str, shape: tuple[int, ...], dtype: np.dtype, sample: tuple[int, ...]) -> None:
    # From the header alone: a wrong layout is refused before gigabytes are decompressed.
    if dtype.kind != "f" and dtype != np.uint8:
        raise DataError(f"{name}: 'x' has dtype {dtype}; use float32 (preprocessed) or uint8 (images 0-255)")
    layouts = [sample]
    if dtype == np.uint8 and len(sample) == 3:
        # N×H×W×C is how images usually come; N×H×W is how single-channel images usually come.
        layouts += [(sample[1], sample[2], sample[0])] + ([sample[1:]] if sample[0] == 1 else [])
    if tuple(shape[1:]) not in layouts:
        got = tuple(shape[1:])
        if dtype == np.uint8 and len(got) == 3 and got[2] <= 4 < got[0]:
            got = (got[2], got[0], got[1])
        hint = f"pass --input-shape 1,{','.join(map(str, got))}" if got and all(got) else "save x as N samples"
        if dtype.kind == "f" and len(sample) == 3 and got == (sample[1], sample[2], sample[0]):
            hint = "float x must be N×C×H×W: save x.transpose(0, 3, 1, 2)"
        raise DataError(f"{name}: 'x' has shape {tuple(shape)} but the model takes {sample}; resize the data or {hint}")
    if shape[0] == 0:
        raise DataError(f"{name}: 'x' has no samples; save at least one")


def _check_x(name: str, x: np.ndarray) -> int:
    # Returns the number of samples; the layout of uint8 images is resolved again by the caller from the shape.
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(x.size - np.isfinite(x).sum())
        raise DataError(f"{name}: 'x' has {bad} NaN or infinite values; clean or drop those samples")
    return int(x.shape[0])


def labels_in_label_space(data: Dataset, model, example: torch.Tensor, say) -> Dataset:
    """Drop labels that cannot be the model's classes, saying so: they would make Taylor's loss and accuracy noise.

    ImageFolder labels count when there are as many classes as the model has outputs (folders in the model's class
    order); .npz labels count when every label is a valid output index.
    """
    if data.y is None:
        return data
    if is_embedding(model):
        say("the model outputs embeddings, not classes, so the data's labels are not used (--train adds a classifier):"
            " quality is the embeddings' cosine similarity to the unpruned model's")  # fmt: skip
        return replace(data, y=None)
    with torch.no_grad():
        output = model(example)
    outputs = output.shape[-1] if output.dim() == 2 else 0
    fits = len(data.class_names) == outputs if data.class_names else int(data.y.max()) < outputs
    if fits:
        return data
    classes = len(data.class_names) or int(data.y.max()) + 1
    say(f"the data's {classes} classes are not the model's {outputs} outputs, so its labels are not used:"
        " importance uses the model's own predictions and quality is fidelity to the unpruned model")  # fmt: skip
    return replace(data, y=None)


HELD_OUT_MAX = 1024


def split_held_out(data: Dataset) -> tuple[Dataset, Dataset]:
    """A scoring/recovery part and a held-out evaluation part (a quarter, at least 8 samples when possible, at most
    HELD_OUT_MAX: a thousand samples judge a recovery well enough, and a large text corpus is better spent on it).

    Stratified by label when there are labels (the same share of every class held out), shuffled with a fixed seed
    otherwise: an ImageFolder is read class by class, so its last quarter would otherwise be its last classes only.
    Both parts come in that order: with labels, round-robin over the classes, so every batch holds every class.
    """
    held = min(len(data) // 2, max(8, min(HELD_OUT_MAX, len(data) // 4))) if len(data) >= 2 else 0
    if held == 0:
        return data, data
    order = np.random.default_rng(0).permutation(len(data))
    if data.y is not None:
        # Round-robin over the classes, each in shuffled order: the tail of this order holds every class evenly.
        by_class = [[i for i in order if int(data.y[i]) == c] for c in sorted(set(data.y.tolist()))]
        rounds = max(len(members) for members in by_class)
        order = [members[r] for r in range(rounds) for members in by_class if r < len(members)]
    keep, hold = np.asarray(order[: len(data) - held]), np.asarray(order[len(data) - held :])

    def part(indices: np.ndarray) -> Dataset:
        # In that mixed order, not sorted back: fine-tuning, distillation and taylor scoring read batches in order,
        # and batches of one or two classes each (a class-ordered .npz or ImageFolder, sorted) left a new head at
        # chance: 12% held out after 120 steps of adaptation on 10 digits per class, 92% with mixed batches.
        index = torch.from_numpy(np.ascontiguousarray(indices))
        y = None if data.y is None else data.y[index]
        return Dataset(x=data.x[index], y=y, source=data.source, synthetic=data.synthetic, class_names=data.class_names)

    return part(keep), part(hold)
