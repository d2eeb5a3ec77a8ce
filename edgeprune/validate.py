"""Check a built output folder on the target: `edgeprune validate OUT_DIR`.

Three checks, each against what the build recorded: every file's size and sha256 against manifest.json, the
artifact's outputs on the recorded inputs against PyTorch's recorded outputs, and the measured p50 against the budget.
Made for CI and on-device validation scripts: a verdict line, exit 0 or 1, and --json.

The folder is read as if an attacker wrote it. manifest.json and report.json may name only plain files of the folder
(no absolute path, no '..', no separator); a symbolic link is never followed; every artifact report.json names must be
listed in the manifest, and a file the manifest does not list makes the folder invalid. The reference arrays are
loaded as plain numbers, never unpickled.

What the manifest proves: it detects corruption and accidental edits (a truncated copy, a changed byte, a lost or an
added file). It does not stop a forger, who can rewrite manifest.json along with the files. A manifest signed with a
key file (``signature``: an HMAC-SHA256 of the rest of the manifest, keyed by the file's bytes) does: with
``--key-file``, validate requires that signature, and a changed file, a rewritten manifest or another key fails it,
for as long as the key stays secret.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import torch

from edgeprune.backends import get_backend
from edgeprune.device import open_device
from edgeprune.errors import BadInput
from edgeprune.estimate import measuring_device
from edgeprune.target import load_target

MANIFEST = "manifest.json"
REPORT = "report.json"
REFERENCE_INPUTS = "reference_inputs.npy"
REFERENCE_OUTPUTS = "reference_outputs.npy"
SIGNATURE = "signature"
MAX_JSON_BYTES = 64 << 20  # a build's manifest and report are a few kB; more is not a build's
MAX_KEY_BYTES = 1 << 16  # a key is a short secret; reading stops there (a wrong path such as /dev/zero)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    """The file's sha256, read in blocks."""
    with open(path, "rb") as handle:
        return _digest(handle)


def _digest(handle) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path, names: list[str] | None = None) -> dict:
    """Size and sha256 of the files of ``folder`` (or of ``names`` in it), the manifest itself excluded."""
    paths = [folder / n for n in names] if names is not None else sorted(folder.iterdir())
    kept = [p for p in paths if p.is_file() and p.name != MANIFEST]
    return {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in kept}


def input_hashes(options, data) -> dict:
    """What a build (pipeline.BuildOptions, data.Dataset) read, by content, for its manifest: the model spec, the
    weights file's, the data's and a pinned plan's sha256, and the seed."""
    weights = {"path": options.weights, "sha256": sha256(Path(options.weights))} if options.weights else None
    data_hash = hashlib.sha256(data.x.numpy().tobytes()).hexdigest()
    plan = {"path": options.plan, "sha256": sha256(Path(options.plan))} if options.plan else None
    return {"model": options.model, "weights": weights, "calib": {"source": data.source, "sha256": data_hash},
            "plan": plan, "seed": options.seed}  # fmt: skip


def write_manifest(folder: Path, files: dict, inputs: dict, versions: dict, key: bytes | None = None) -> dict:
    """Write manifest.json: every output file with its size and sha256, the build's inputs, versions, command; with
    a ``key`` (read_key), also its ``signature``."""
    manifest = {"files": dict(sorted(files.items())), "inputs": inputs, "versions": versions, "command": sys.argv[1:]}
    if key is not None:
        manifest[SIGNATURE] = manifest_signature(manifest, key)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_key(path: str | os.PathLike) -> bytes:
    """The bytes of a key file, which sign and check a manifest; a missing, unreadable or empty file is BadInput."""
    try:
        with open(path, "rb") as handle:
            key = handle.read(MAX_KEY_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise BadInput(f"--key-file '{path}': cannot read it ({_why(exc)}); give the file that holds the key") from None
    if not key:
        raise BadInput(f"--key-file '{path}' is empty; put a secret of at least 32 random bytes in it")
    if len(key) > MAX_KEY_BYTES:
        raise BadInput(f"--key-file '{path}' holds more than {MAX_KEY_BYTES} bytes; a key file holds a short secret")
    return key


def manifest_signature(manifest: dict, key: bytes) -> str:
    """HMAC-SHA256, keyed by ``key``, of the canonical JSON of the manifest without its signature."""
    if not key:
        raise BadInput("an empty key signs nothing; give a key file that holds a secret")
    body = {name: value for name, value in manifest.items() if name != SIGNATURE}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, text.encode("ascii"), hashlib.sha256).hexdigest()


def sign_manifest(folder: str | os.PathLike, key_path: str | os.PathLike) -> dict:
    """Sign an output folder's manifest with the key file's bytes, once the folder is checked against it: a folder
    that does not match its manifest is BadInput, and nothing is written."""
    key, folder = read_key(key_path), Path(folder)
    manifest, report = read_folder(folder)
    problems = check_files(folder, manifest, report)
    if problems:
        raise BadInput(f"'{folder}' does not match its manifest ({'; '.join(problems)}); sign only a valid folder")
    manifest[SIGNATURE] = manifest_signature(manifest, key)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_folder(folder: Path) -> tuple[dict, dict]:
    """manifest.json and report.json of an output folder, checked before any other file is opened: every name they
    give is a plain file name, every manifest entry has a sha256 and a size. Otherwise BadInput."""
    manifest, report = _read_json(folder, MANIFEST), _read_json(folder, REPORT)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _not_output(folder, f"{MANIFEST} has no table of files")
    for name, entry in files.items():
        _plain(folder, name, MANIFEST)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and type(entry.get("bytes")) is int and entry["bytes"] >= 0):  # fmt: skip
            raise _not_output(folder, f"{MANIFEST} gives {_show(name)} no sha256 (64 hex digits) and size in bytes")
    signature = manifest.get(SIGNATURE)
    if signature is not None and not (isinstance(signature, str) and _SHA256.fullmatch(signature)):
        raise _not_output(folder, f"{MANIFEST}'s signature is not 64 hex digits")
    _check_report(folder, report)
    return manifest, report


def _check_report(folder: Path, report: dict) -> None:
    artifacts, target = report.get("artifacts"), report.get("target")
    if not isinstance(artifacts, dict) or "model" not in artifacts:
        raise _not_output(folder, f"{REPORT} names no model artifact")
    for name in artifacts.values():
        _plain(folder, name, REPORT)
    if not (isinstance(target, str) and target.isprintable() and target and not target.endswith(".toml")
            and not any(sep in target for sep in "/\\")):  # fmt: skip
        raise _not_output(folder, f"{REPORT}'s target {_show(target)} is not a target name")
    model, budget = report.get("model"), report.get("budget")
    shape = model.get("input_shape") if isinstance(model, dict) else None
    latency = budget.get("latency_ms") if isinstance(budget, dict) else "none"
    shape_ok = isinstance(shape, list) and 0 < len(shape) <= 8 and all(type(n) is int and n > 0 for n in shape)
    latency_ok = latency is None or (type(latency) in (int, float) and latency > 0)
    if not (isinstance(report.get("backend"), str) and shape_ok and latency_ok):
        raise _not_output(folder, f"{REPORT} lacks the backend, input shape or budget that a build records")


def check_files(folder: Path, manifest: dict, report: dict) -> list[str]:
    """What in the folder differs from a manifest read_folder checked: a listed file missing, not plain or altered
    (size first, then sha256), an artifact report.json names that the manifest does not list, an unlisted file."""
    files = manifest["files"]
    problems = [] if files else [f"{MANIFEST} lists no files"]
    problems += [problem for name, entry in files.items() if (problem := _file_problem(folder, name, entry))]
    required = set(report["artifacts"].values()) | {REPORT, REFERENCE_INPUTS, REFERENCE_OUTPUTS}
    unlisted = sorted(required - set(files) - {MANIFEST})
    problems += [f"{name}: named by {REPORT} but not listed in the manifest" for name in unlisted]
    held = sorted(set(os.listdir(folder)) - set(files) - required - {MANIFEST})
    return problems + [f"{_show(name)}: not listed in the manifest" for name in held]


def _file_problem(folder: Path, name: str, entry: dict) -> str | None:
    try:
        info = (folder / name).lstat()
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: cannot be read ({_why(exc)})"
    if stat.S_ISLNK(info.st_mode):
        return f"{name}: a symbolic link; an output folder holds its files, not links to them"
    if not stat.S_ISREG(info.st_mode):
        return f"{name}: not a plain file"
    if info.st_size != entry["bytes"]:
        return f"{name}: {info.st_size} bytes, the manifest says {entry['bytes']}"
    try:
        with _open_plain(folder / name) as handle:
            same = _digest(handle) == entry["sha256"]
    except OSError as exc:  # replaced since lstat: by a link (O_NOFOLLOW) or a FIFO
        return f"{name}: cannot be read ({_why(exc)})"
    return None if same else f"{name}: sha256 differs from the manifest"


def _signature_problem(manifest: dict, key: bytes) -> str | None:
    signature = manifest.get(SIGNATURE)
    if signature is None:
        return f"{MANIFEST} is not signed; sign it at build time with the same --key-file"
    if not hmac.compare_digest(signature, manifest_signature(manifest, key)):
        return f"{MANIFEST}: the signature does not match --key-file (altered, or signed with another key)"
    return None


def validate(
    folder: Path,
    device_url: str | None = None,
    latency_ms: float | None = None,
    key_file: str | os.PathLike | None = None,
) -> dict:
    """Run the three checks on a build's output folder; the result has ``ok`` and a one-line ``verdict``.

    ``latency_ms`` replaces the budget the build recorded (to check against a tighter one). With ``key_file``, the
    manifest must carry a signature made with that key. A folder that is not a well-formed edgeprune output is a
    BadInput.
    """
    folder = Path(folder)
    key = read_key(key_file) if key_file is not None else None
    manifest, report = read_folder(folder)
    unsigned = _signature_problem(manifest, key) if key is not None else None
    problems = check_files(folder, manifest, report)
    result: dict = {"folder": str(folder), "hashes_ok": not problems,
                    "signature_ok": None if key is None else unsigned is None}  # fmt: skip
    problems = ([unsigned] if unsigned else []) + problems
    if problems:
        result.update(ok=False, verdict="invalid: " + "; ".join(problems))
        return result

    inputs, expected = _reference_arrays(folder, report)
    target = load_target(report["target"])
    backend = get_backend(report["backend"])
    backend.require()
    device = measuring_device(open_device(device_url), backend, target)
    artifact = _artifact(backend.name, folder, report)
    outputs = backend.validate(artifact, inputs, expected, target, device)
    measured = backend.benchmark(artifact, tuple(report["model"]["input_shape"]), target, device)
    budget = latency_ms if latency_ms is not None else report["budget"].get("latency_ms")
    budget = math.inf if budget is None else budget  # a MACs or params budget: counted at build time, not timed
    result.update(
        outputs=outputs.to_dict(), latency_ms=measured.latency(), budget_ms=budget if math.isfinite(budget) else None,
        measured_on=device.label, within_budget=measured.p50 <= budget,
    )  # fmt: skip
    if not outputs.ok:
        problems.append(f"outputs differ from the recorded PyTorch outputs by {outputs.max_abs_err:.3g} (atol"
                        f" {outputs.atol:.3g})")  # fmt: skip
    if measured.p50 > budget:
        problems.append(f"p50 {measured.p50:.3f} ms on {device.label} is over the budget of {budget:.3g} ms")
    result["ok"] = not problems
    result["verdict"] = (
        ("invalid: " + "; ".join(problems))
        if problems
        else (
            "valid: hashes match"
            + (", signature verified" if key is not None else "")
            + f", outputs within {outputs.max_abs_err:.2g} of PyTorch (atol {outputs.atol:.2g}),"
            f" p50 {measured.p50:.3f} ms"
            + (f" <= {budget:.3f} ms" if math.isfinite(budget) else "")
            + f" on {device.label}"
        )
    )
    return result


def _reference_arrays(folder: Path, report: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, expected = _load_array(folder, REFERENCE_INPUTS), _load_array(folder, REFERENCE_OUTPUTS)
    shape = report["model"]["input_shape"]
    if inputs.ndim != len(shape) or list(inputs.shape[1:]) != shape[1:] or not len(inputs) or expected.ndim == 0 \
            or len(expected) != len(inputs):  # fmt: skip
        raise _not_output(folder, f"the reference arrays (inputs {list(inputs.shape)}, outputs"
                                  f" {list(expected.shape)}) do not fit {REPORT}'s input shape {shape}")  # fmt: skip
    return inputs, expected


def _load_array(folder: Path, name: str) -> torch.Tensor:
    """A numeric .npy array of the folder, its header checked against the file's size before the data is read."""
    try:
        with _open_plain(folder / name) as handle:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}, not one that numbers are saved in")
            npy = np.lib.format
            shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(handle)
            if dtype.hasobject or dtype.kind not in "fiu":
                raise ValueError(f"it holds {dtype} values, not numbers")
            if math.prod(shape) * dtype.itemsize != os.fstat(handle.fileno()).st_size - handle.tell():
                raise ValueError(f"its header's shape {shape} does not fit the file's size")
            handle.seek(0)
            array = np.load(handle, allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError) as exc:
        raise _not_output(folder, f"{name} is not a numeric .npy array ({_why(exc)})") from None
    return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


def _artifact(backend: str, folder: Path, report: dict):
    from edgeprune.backends import Artifact

    files = {role: folder / name for role, name in report["artifacts"].items()}
    return Artifact(backend=backend, model=files["model"], files=files)


def _read_json(folder: Path, name: str) -> dict:
    try:
        with _open_plain(folder / name) as handle:
            text = handle.read(MAX_JSON_BYTES + 1)
        if len(text) > MAX_JSON_BYTES:
            raise ValueError(f"over {MAX_JSON_BYTES >> 20} MB")
        data = json.loads(text)
    except OSError as exc:
        raise _not_output(folder, f"{name} is a symbolic link" if exc.errno == errno.ELOOP
                          else f"{name} cannot be read ({_why(exc)})") from None  # fmt: skip
    except (ValueError, RecursionError) as exc:
        raise _not_output(folder, f"{name} is not JSON ({_why(exc)})") from None
    if not isinstance(data, dict):
        raise _not_output(folder, f"{name} is not a JSON object")
    return data


def _open_plain(path: Path):
    """Open a regular file to read, never through a symbolic link, never waiting on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise OSError(errno.EINVAL, "not a plain file")
    return handle


def _plain(folder: Path, name, where: str) -> str:
    """``name`` when it is a plain file name: no separator, not '.', '..' or empty; checked before any file access,
    so the message says nothing of a file outside the folder."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and name.isprintable()
            and not any(sep in name for sep in "/\\")):  # fmt: skip
        raise _not_output(folder, f"{where} names {_show(name)}, which is not a plain file name in the folder")
    return name


def _not_output(folder: Path, why: str) -> BadInput:
    return BadInput(f"'{folder}' is not an edgeprune output folder: {why}; validate the folder a build wrote")


def _show(name) -> str:
    text = name if isinstance(name, str) and name.isprintable() else repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200] if text.strip() else type(exc).__name__
