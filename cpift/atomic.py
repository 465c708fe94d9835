"""Atomic file-system writes: nothing cpift writes is ever seen half-written.

Two patterns cover every artifact cpift produces:

* :func:`atomic_dir` — build a whole directory (a saved model, a converted cache entry) in a
  hidden temporary sibling, then publish it with one ``rename``. Readers see either no directory
  or the complete one; an exception (or Ctrl-C) removes the temporary directory; a process killed
  outright leaves only a hidden ``.{name}.tmp-<pid>-<random>`` sibling, which
  :func:`remove_stale_temps` clears later.
* :func:`atomic_write_bytes` / :func:`atomic_write_text` — write a single file to a temporary
  file in the same directory, ``fsync`` it, then ``os.replace`` it over the target.

Both flush data to disk before the rename and ``fsync`` the parent directory afterwards, so even
a power cut leaves either the old state or the new one.

When two processes race to create the same directory (two test workers converting the same
cached model, say), exactly one rename wins; the loser gets a :class:`FileExistsError` naming the
target, its own temporary directory already removed, and can simply use the winner's result.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFullError, OutputExistsError

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_stale_temps",
]

_log = logging.getLogger(__name__)


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-"


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """``fsync`` every regular file under ``root`` and every directory in it."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree; missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _exists_error(final: Path) -> OutputExistsError:
    return OutputExistsError(final)


# A write that failed on a file system with less than this free was a full disk, whatever the
# writer reported: torch's zip writer, for one, says only "unexpected pos" and loses the errno.
_FULL_BELOW_BYTES = 1 << 20


def _disk_full(exc: BaseException, target: Path) -> bool:
    """Whether ``exc``, raised while writing ``target``, comes from a full file system."""
    if isinstance(exc, DiskFullError) or not isinstance(exc, Exception):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(target.parent).free < _FULL_BELOW_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, overwrite: bool = False,
               fsync: bool = True) -> Iterator[Path]:
    """Build a directory in a temporary sibling and publish it at ``final`` only on success.

    Usage::

        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)      # write everything into tmp
        # here `out` exists and is complete

    Args:
        final: where the finished directory must appear. Its parent is created if missing.
        overwrite: if ``final`` already exists, replace it: the old one is moved aside, the new
            one renamed in, then the old one deleted (so ``final`` is never missing for long and
            never partial). If ``False`` (the default) an existing ``final`` is an error.
        fsync: flush every written file and the parent directory to disk before/after the
            rename, so a power cut cannot publish a directory whose files are still empty.

    Yields:
        A fresh, empty directory in the same parent as ``final``, named
        ``.{final.name}.tmp-<pid>-<random>`` (hidden, and on the same file system, so the final
        rename is atomic).

    Raises:
        OutputExistsError: (a :class:`FileExistsError` and a :class:`~cpift.errors.CpiftError`)
            ``final`` exists and ``overwrite`` is false — either already on entry
            (nothing is created then) or because another process published it while the body
            ran (our temporary directory is discarded; the other process's ``final`` is kept).
        DiskFullError: the body or the publishing failed on a full file system (names ``final``).
        BaseException: anything else the body raises is re-raised after removing the temporary
            directory.
    """
    final = Path(final).expanduser().absolute()
    if not overwrite and _exists(final):
        raise _exists_error(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        # mkdtemp makes it 0o700; the published directory gets the usual mode instead.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        _publish(tmp, final, overwrite=overwrite)
    except BaseException as exc:
        _remove(tmp)
        if _disk_full(exc, final):
            raise DiskFullError(final) from exc
        raise
    if fsync:
        _fsync_dir(final.parent)


def _publish(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final`` (see :func:`atomic_dir` for the rules)."""
    if not overwrite:
        # os.rename onto an existing *empty* directory would silently succeed on POSIX, so check
        # first; the remaining window is covered by rename failing onto a non-empty directory.
        if _exists(final):
            raise _exists_error(final)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if _exists(final):
                raise _exists_error(final) from exc
            raise
        return

    old: Path | None = None
    if _exists(final):
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
        old.rmdir()  # we only wanted a unique name
        try:
            os.rename(final, old)
        except FileNotFoundError:  # someone else removed it meanwhile: nothing to move aside
            old = None
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if old is not None:  # put the previous version back where it was, if we still can
            with contextlib.suppress(OSError):
                os.rename(old, final)
            if _exists(old):
                _remove(old)
        if _exists(final):
            raise _exists_error(final) from exc
        raise
    if old is not None:
        _remove(old)


def remove_stale_temps(final: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary siblings of ``final`` left behind by processes that no longer run.

    :func:`atomic_dir` cleans up after exceptions itself, but a process killed with ``SIGKILL``
    (or a power cut) leaves its hidden ``.{name}.tmp-<pid>-*`` / ``.{name}.old-<pid>-*`` sibling.
    Those whose ``<pid>`` is not a live process on this machine are removed; those of running
    processes (possibly still writing) are left alone.

    Returns:
        The paths removed.
    """
    final = Path(final).expanduser().absolute()
    parent = final.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(r"^\." + re.escape(final.name) + r"\.(?:tmp|old)-(\d+)-")
    removed: list[Path] = []
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        _log.info("removing stale temporary %s", entry)
        _remove(entry)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or we cannot tell: keep it
    return True


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old content or the new, never part.

    The bytes go to a temporary file in the same directory (created if missing), which is
    flushed, ``fsync``-ed and then ``os.replace``-d over ``path``. On any error the temporary
    file is removed and ``path`` is untouched. The new file gets the usual permissions
    (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if _disk_full(exc, path):
            raise DiskFullError(path) from exc
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      fsync: bool = True) -> Path:
    """Write ``text`` (encoded with ``encoding``) to ``path`` atomically; see
    :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def _umask() -> int:
    """The process umask, read without changing it where possible (``os.umask`` is not
    thread-safe to query)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
