"""Safe file writes: a reader never sees a half-written file, a failure leaves the previous good output
intact, and nothing this tool did not write is ever deleted or replaced.

Every output is first written under a hidden temporary name beside its target, then renamed over it. A
target that already exists is replaced only when its owner check says this tool wrote it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import AlibiExportError

__all__ = ["atomic_path", "atomic_files", "check_writable_dir", "check_replaceable", "sha256_file"]


def check_writable_dir(directory: str | os.PathLike) -> None:
    directory = Path(directory) if str(directory) else Path(".")
    if not directory.is_dir():
        raise AlibiExportError(f"output directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise AlibiExportError(f"output directory {str(directory)!r} is not writable")


def check_replaceable(path: str | os.PathLike, written_by_us: Callable[[Path], bool], what: str) -> None:
    """Refuse to write ``path`` when it exists and ``written_by_us(path)`` says this tool did not write it."""
    path = Path(path)
    if path.is_dir():
        raise AlibiExportError(f"{str(path)!r} is a directory. Note: expected a path for the {what}")
    if path.exists() and not written_by_us(path):
        raise AlibiExportError(f"{str(path)!r} exists and was not written by alibi-export: refusing to replace it. "
                               f"Note: choose another path for the {what}, or move that file away")


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; if the block succeeds, rename each over its target
    in the order given (put the file that vouches for the others last), else remove them all."""
    paths = [Path(p) for p in paths]
    for p in paths:
        check_writable_dir(p.parent)
    tmps: list[Path] = []
    try:
        for p in paths:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield tmps
        for tmp in tmps:
            os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the data is on disk before a rename makes it visible
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # only our own temporaries: renamed ones are gone already


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    with atomic_files([path]) as (tmp,):
        yield tmp


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
