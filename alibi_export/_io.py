"""Safe file writes: a reader never sees a half-written file, a failure leaves the previous good output
intact, and nothing this tool did not write is ever deleted or replaced.

Every output is first written under a hidden temporary name beside its target, then renamed over it. A
target that already exists is replaced only when its owner check says this tool wrote it.

Temporaries are named ``.TARGET.PID.XXXXXXXX.tmp`` (a file or a staging folder): the target they stand
for, and the process that owns them. A process killed with SIGKILL (or a machine that lost power) cannot
remove its own, so the next write of the same target removes those whose owner process is gone
(:func:`remove_stale`), and only those: a live owner's temporaries, and every other name, are left alone.
While temporaries exist, SIGTERM (what ``timeout``, ``docker stop`` and CI cancellation send) is handled
like Ctrl-C (:func:`sigterm_as_interrupt`), so the usual clean-up runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .errors import AlibiExportError

__all__ = ["atomic_path", "atomic_files", "check_writable_dir", "check_replaceable", "sha256_file",
           "sigterm_as_interrupt", "handle_sigterm", "interrupts_deferred", "temp_name", "temp_file", "remove_stale", "stale", "is_temporary",
           "exchange", "process_alive"]


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


# ----------------------------------------------------------------------------- SIGTERM
_deferring = 0  # depth of interrupts_deferred blocks (main thread only: Python runs signal handlers there)
_pending: list[int] = []  # signals received while deferring, raised when the outermost block ends


def _interrupt_once() -> Callable:
    raised = []

    def interrupt(signum, frame):
        if raised:  # a second SIGTERM during the clean-up is ignored
            return
        raised.append(signum)
        if _deferring:
            _pending.append(signum)
            return
        raise KeyboardInterrupt(f"terminated by signal {signum}")
    return interrupt


def _ctrl_c(signum, frame):
    """Ctrl-C as Python's own handler raises it, held while interrupts are deferred."""
    if _deferring:
        _pending.append(signum)
        return
    raise KeyboardInterrupt


def _install() -> Callable[[], None] | None:
    """Our handlers for SIGTERM (over the default action only) and Ctrl-C (over Python's default only), from
    the main thread; returns what puts the previous ones back, or None where nothing was installed."""
    if not _may_install():
        return None
    ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ctrl_c:
        signal.signal(signal.SIGINT, _ctrl_c)
    signal.signal(signal.SIGTERM, _interrupt_once())

    def restore() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ctrl_c and signal.getsignal(signal.SIGINT) is _ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return restore


def _may_install() -> bool:
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)


def handle_sigterm() -> None:
    """From now on, SIGTERM raises KeyboardInterrupt in this process, as Ctrl-C does (the command line's
    choice, made once at start-up). Only from the main thread, and only over the default action."""
    _install()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so ``finally`` clean-up runs.

    For library callers: installed only from the main thread and only over the default action (a program
    that set its own SIGTERM handler, the command line included, keeps it); nested uses are free. A second
    SIGTERM during the clean-up is ignored; after the block the default action is back."""
    restore = _install()
    try:
        yield
    finally:
        if restore is not None:
            restore()


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C that arrive during the block are raised when it ends (under our handlers, see
    :func:`sigterm_as_interrupt`). For the steps that must run to their end once begun: a switch and its
    bookkeeping (the links of a checkpoint set, the removal of the set it replaced), a clean-up in a
    ``finally``. An interrupt then lands before or after them, never between two of their steps; a kill
    still can, which is what the stale clean-up of the next write is for."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise KeyboardInterrupt(f"interrupted by signal {signum}")


# ----------------------------------------------------------------------------- owned temporaries
def _pattern(target: str, *, regex: bool = False) -> re.Pattern:
    """Temporaries of ``target`` (a name, or with ``regex`` a pattern of names); group 1 is the owner's pid."""
    return re.compile(r"\." + (target if regex else re.escape(target)) + r"\.(\d+)\.[a-z0-9_]{8}\.tmp")


def _legacy_pattern(target: str) -> re.Pattern:
    """mkstemp's names of alibi-export 0.2 and earlier, which name no owner."""
    return re.compile(re.escape(f".{target}.") + r"[a-z0-9_]{8}\.tmp")


def temp_name(target: Path) -> Path:
    """A new temporary name beside ``target``, named for it and for this process; nothing is created.

    Callers take the name before their ``try`` and create the file or folder inside it, so that an interrupt
    at any instant leaves nothing, or a path their ``finally`` removes."""
    return _folder(target) / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def temp_file(target: Path) -> Path:
    """A new empty temporary file beside ``target`` (for a caller that removes it however it exits)."""
    path = temp_name(target)
    _create_private(path)
    return path


def _create_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _folder(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def is_temporary(name: str, targets: Iterable[str]) -> bool:
    """``name`` is a temporary of this tool (this version's or an earlier one's) for one of ``targets``."""
    return any(_pattern(t).fullmatch(name) or _legacy_pattern(t).fullmatch(name) for t in targets)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stale(folder: Path, target: str, *, regex: bool = False) -> list[Path]:
    """The temporaries of ``target`` (a name, or with ``regex`` a pattern) in ``folder`` whose owner is gone."""
    pattern = _pattern(target, regex=regex)
    found = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            m = pattern.fullmatch(entry.name)
            if m and not process_alive(int(m.group(1))):
                found.append(entry)
    return sorted(found)


def remove_stale(folder: str | os.PathLike, targets: Iterable[str], *, regex: bool = False) -> list[Path]:
    """Remove the temporaries (files or staging folders) that dead processes left for ``targets`` (names,
    or with ``regex`` patterns of names) in ``folder``; returns what was removed. Temporaries of a live
    process and any other name are kept."""
    folder = Path(folder) if str(folder) else Path(".")
    removed = []
    for target in targets:
        for entry in stale(folder, target, regex=regex):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; if the block succeeds, rename each over its target
    in the order given (put the file that vouches for the others last), else remove them all."""
    paths = [Path(p) for p in paths]
    for p in paths:
        check_writable_dir(_folder(p))
    tmps: list[Path] = []
    with sigterm_as_interrupt():
        try:
            for p in paths:
                remove_stale(_folder(p), [p.name])
                tmps.append(temp_name(p))  # named first: whenever an interrupt lands, the finally knows it
                _create_private(tmps[-1])
            yield tmps
            for tmp in tmps:
                os.chmod(tmp, 0o644)  # temporaries are private; outputs are ordinary files
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())  # the data is on disk before a rename makes it visible
            with interrupts_deferred():  # all renamed or none: never a mixed set
                for tmp, p in zip(tmps, paths):
                    os.replace(tmp, p)
        finally:
            with interrupts_deferred():
                for tmp in tmps:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)  # only our own temporaries: renamed ones are gone already


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    with atomic_files([path]) as (tmp,):
        yield tmp


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): at every instant each name holds one of
    the two. False where the system or the file system cannot (then nothing was changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
