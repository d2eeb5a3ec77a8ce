"""The build's output folder: claimed before any work, written beside it, published whole, replaced only when safe.

The rules (docs/reliability.md says the same):
- ``--out`` is never the file system's root, the home folder or a folder above it, the working folder or a folder
  above it, nor a folder that holds an input of the build (model file, weights, data, plan, bank, config, profile,
  cost-model cache): replacing it would delete what the build reads.
- ``--out`` itself may not be a symbolic link (the link would be replaced by a folder and its target left behind);
  the folders above it may be, and the output is written where they lead.
- A folder that holds files is replaced only with ``--force``, and only when it is an earlier build's output: its
  manifest.json lists exactly the files it holds, with their sizes and sha256. A file name alone proves nothing.
- A build writes into a temporary folder beside the output and renames it into place when everything is written, so
  a failed or interrupted build leaves no partial output. Publishing locks the parent folder and checks that the
  output is still what was claimed: a build that finished there meanwhile is never silently replaced.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import BadInput, raise_if_stopped
from edgeprune.score.costmodel import cache_dir
from edgeprune.validate import check_files, read_folder


@dataclass(frozen=True)
class OutputFolder:
    """Where a build publishes (symbolic links above it resolved), as the user named it, and what was there when it
    was claimed."""

    path: Path
    given: str
    seen: tuple | None


def claim_output(out: Path, force: bool, inputs: Iterable[str | os.PathLike]) -> OutputFolder:
    """Check ``out`` before any work starts, against the rules above; ``inputs`` are the paths the build reads."""
    given = Path(out)
    if given.is_symlink():
        raise BadInput(f"--out '{out}' is a symbolic link; give the folder it leads to ({given.resolve()}) instead")
    path = given.resolve()
    _refuse_protected(out, path, inputs)
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise BadInput(f"--out '{out}' already holds files; pass --force to replace them, or choose another folder")
        why = not_an_output(path)
        if why:
            raise BadInput(f"--out '{out}' is not an earlier build's output ({why}); --force replaces only an empty"
                           " folder or a build's output: choose another folder")  # fmt: skip
    return OutputFolder(path, str(out), _fingerprint(path))


def _refuse_protected(out: Path, path: Path, inputs: Iterable[str | os.PathLike]) -> None:
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry: there is no home folder to protect
        home = Path(path.anchor)
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor) or path == home or path in home.parents:
        raise BadInput(f"--out '{out}' is {path}, which holds far more than a build; choose a folder of its own")
    if path == cwd or path in cwd.parents:
        raise BadInput(f"--out '{out}' is the working folder or a folder above it; choose a folder of its own")
    for item in inputs:
        used = Path(item).expanduser().resolve()
        if used == path or path in used.parents:
            raise BadInput(f"--out '{out}' holds {item}, which the build reads; choose a folder of its own")


def not_an_output(folder: Path) -> str | None:
    """Why ``folder`` is not a build's output as the build left it (validate's check of the files against the
    manifest), or None when it is one."""
    try:
        manifest, report = read_folder(folder)
    except BadInput as exc:
        return str(exc).split(": ", 1)[-1]
    problems = check_files(folder, manifest, report)
    return problems[0] if problems else None


def _fingerprint(path: Path) -> tuple | None:
    """What identifies the folder's state: its inode and the names it holds (None: absent)."""
    try:
        stat = path.stat()
        return stat.st_dev, stat.st_ino, tuple(sorted(p.name for p in path.iterdir()))
    except FileNotFoundError:
        return None


def new_workdir(folder: OutputFolder) -> Path:
    """A fresh temporary folder beside the output (same file system, so the final rename is atomic).

    Its name carries this process's id. A build killed outright (SIGKILL, power loss) cannot clean up after itself,
    so partial and set-aside folders of processes that no longer run are removed here: building again is enough.
    """
    out = folder.path
    out.parent.mkdir(parents=True, exist_ok=True)
    for prefix in (f".{out.name}.partial-", f".{out.name}.old-"):
        for stale in out.parent.glob(f"{glob.escape(prefix)}*"):
            pid = stale.name.removeprefix(prefix).split("-")[0]
            if pid.isdigit() and not _alive(int(pid)) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself, which every build publishing into it takes: no lock file is left."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def publish(workdir: Path, folder: OutputFolder) -> None:
    """Move the finished ``workdir`` to the output; an old output is set aside first and removed only afterwards."""
    raise_if_stopped()  # a stop signal whose exception a library swallowed still leaves no output
    out, old = folder.path, None
    with _locked(out.parent):
        if _fingerprint(out) != folder.seen:
            raise BadInput(f"--out '{folder.given}' changed while this build ran (another build finished there?);"
                           " this build's output was not written: build again, or choose another folder")  # fmt: skip
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        workdir.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; an output is as readable as any new folder
        workdir.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def input_paths(options, profile: str | os.PathLike | None) -> list[str]:
    """The paths a build (pipeline.BuildOptions) reads or writes besides its output, for claim_output: its files and
    folders, the model's source, the target profile's file and the cost-model cache."""
    given = (options.weights, options.calib, options.train, options.aux, options.plan, options.bank, options.config,
             options.key_file)  # fmt: skip
    paths = [str(p) for p in given if p]
    source, _, name = options.model.rpartition(":")
    if source.endswith(".py"):
        paths.append(source)
    elif source == "hf":
        paths.append(name)
    elif source and source != "timm":
        paths += _package_folders(source)
    if profile:
        paths.append(str(profile))
    return [*paths, str(cache_dir())]


def _package_folders(module: str) -> list[str]:
    """Where the top-level package of ``module`` lives, found without importing it (a user's package in --out)."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    folders = [str(p) for p in (spec.submodule_search_locations or [])]
    return folders or ([spec.origin] if spec.origin and os.path.isabs(spec.origin) else [])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
