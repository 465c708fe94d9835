"""Run model-written Python in a sandboxed subprocess with limits: the scorer for code tasks.

A code task asks the model to "write a Python function"; its answer is scored by running hidden
unit tests (plain ``assert`` statements) against it. That code is untrusted, so it never runs in
the calling process: :func:`run_python` runs it in a fresh interpreter and :func:`check_solution`
runs a solution together with its tests. Both return a :class:`SandboxResult`.

Layers of protection, outermost first:

1. **A separate process, its own session and process group.** The child is started with
   ``start_new_session=True``; once it exits or times out the whole group is sent ``SIGKILL``, so
   nothing it left behind in its group survives (the leader is not reaped until then, so its
   group id cannot have been reused). Nothing reaches the caller but the exit status and the
   captured output.
2. **A clean start.** The code is written into a fresh :func:`tempfile.TemporaryDirectory`,
   which is the child's working directory and is always removed afterwards. The interpreter runs
   the runner script with ``-S -s -B -u -P``: no ``site`` (so no site-packages: only the standard
   library can be imported, and not cpift), no user site, no ``.pyc`` writing, unbuffered output,
   and the runner's directory not on ``sys.path``. ``-I`` is not used because it would also ignore
   ``PYTHONHASHSEED``; the environment is built from scratch instead, so nothing of the caller's
   reaches the child: ``PATH=/usr/bin:/bin``, ``LANG=C.UTF-8``, ``PYTHONHASHSEED=0`` (set iteration
   order is deterministic) and ``HOME``/``TMPDIR`` pointing into the sandbox directory. Standard
   input is ``/dev/null``; standard output and error go to anonymous temporary files rather than
   pipes (a huge output cannot deadlock) and are read back capped to
   :attr:`Limits.max_output_bytes` (head and tail kept).
3. **Resource limits** set with ``setrlimit`` before ``exec``: address space (``RLIMIT_AS``, so a
   huge allocation raises ``MemoryError`` in the child instead of swapping the machine), CPU
   seconds (``SIGXCPU``, then ``SIGKILL`` one second later), the size of any file written
   (``RLIMIT_FSIZE``, which also caps the captured output), open files, no core dumps, and a
   process count (``RLIMIT_NPROC`` — which the kernel does not enforce for root). The wall-clock
   :attr:`Limits.timeout` is enforced by the parent.
4. **No network**, where the kernel permits: the child calls ``unshare(CLONE_NEWNET)`` (or, not
   as root, ``CLONE_NEWUSER | CLONE_NEWNET``) before ``exec`` and so lives in an empty network
   namespace with only a loopback interface that is down. If that fails it is silently skipped
   and layer 5 alone blocks sockets.
5. **An audit hook** (:pep:`578`), installed by a small trusted runner
   (:mod:`cpift.sandbox.runner`, started by path) *before* the untrusted code is compiled. Audit
   hooks cannot be removed once added. The hook ends the process at once (``os._exit(3)``, which
   ``try``/``except`` cannot catch), after writing ``blocked: <event>`` to standard error, on: every ``socket.*`` event (connecting, binding, sending to an address,
   resolving names, creating any socket but an ``AF_UNIX`` one — which ``socket.socketpair`` and so
   ``asyncio`` need, and which cannot reach anything without ``connect``/``bind``);
   starting programs or processes (``subprocess.Popen``, ``os.system``, ``os.exec*``,
   ``os.posix_spawn*``, ``os.fork``, ``os.forkpty``, ``pty.spawn``, ``webbrowser.open``); sending
   signals (``os.kill``, ``os.killpg``, ``signal.pthread_kill``); any ``ctypes`` use and importing
   ``ctypes``, the sub-interpreter modules or the ``_test*`` C modules; raising resource limits;
   ``gc.get_objects``/``get_referrers``/``get_referents`` (which would reach the hook itself);
   creating links (``os.link``, ``os.symlink``); opening a file for writing, or creating,
   removing, renaming, truncating, changing the mode, owner, times or extended attributes of
   anything outside the sandbox directory (``/dev/null`` excepted; paths are resolved through
   symbolic links first), ``shutil.rmtree`` outside it and ``os.chdir`` out of it; opening a
   directory outside it (whose descriptor would let ``dir_fd=`` calls escape the path checks);
   and reading another process's ``/proc/<pid>`` entries (such as the caller's environment). The
   runner also disables the unaudited ``_posixsubprocess.fork_exec`` and
   ``signal.pidfd_send_signal``, and ``os.mkfifo`` and ``os.mknod`` (which raise no audit event;
   they are refused anywhere, since a device node inside the directory would open a disk for
   writing). C modules that write files without audit events cannot be imported (a
   ``ModuleNotFoundError``, as if they were not installed): ``_sqlite3`` (so ``sqlite3``; SQLite
   writes through ``ATTACH`` and ``VACUUM INTO`` too), ``readline`` (history files), ``_gdbm`` and
   ``_dbm`` (``dbm`` falls back to ``dbm.dumb``), ``_posixshmem`` and ``_multiprocessing`` (POSIX
   shared memory and named semaphores in ``/dev/shm``).

Scoring (:func:`check_solution`) also refuses a run that exits with status 0 *before* the tests
have run (``sys.exit(0)``, ``os._exit(0)`` at the top of a solution): the runner prints a random
token handed to it on standard input only once the code has run to its end.

What is *not* protected — read this before relying on it:

* The child runs as the **same user as the caller** (root in CI), in the same file-system,
  PID and IPC namespaces. The operating system does not stop it from *reading* anything that
  user can read (``/etc``, ``~/.cache``, tokens, raw devices); only the audit hook stops it from
  writing outside the sandbox directory, and without network the only way out for what it reads
  is its own captured output.
* The audit hook is defence in depth, **not a security boundary**. It does not cover every
  dangerous operation (``fcntl.ioctl`` on a descriptor opened for reading can change a file's
  attributes, for one), and Python code that is written to attack the interpreter — racing
  threads against the path checks, corrupting interpreter state with crafted code objects,
  recreating disabled C modules — can get past it. It stops the accidental and the naive
  (``os.system("rm -rf …")``, ``shutil.rmtree``, network calls, fork bombs), which is what
  model-written code does.
* Disk usage inside the sandbox directory is bounded per file (``RLIMIT_FSIZE``), not in total;
  the run is short (the timeout) and the directory is removed afterwards.
* Memory is bounded by address space, not resident memory; a thread bomb is bounded by
  ``RLIMIT_NPROC`` only for a non-root caller (each thread still costs address space).
* Only POSIX systems are supported; the network namespace only on Linux.

For truly hostile code use an OS-level sandbox (a container or VM, gVisor, nsjail, a seccomp
filter) and run this inside it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import Field, ValidationError

from ..errors import CpiftError, ParameterError
from ..settings import ConfigError, Float, Section, config_error
from .runner import FINISHED_MARKER, SOLUTION_FILE

try:  # POSIX only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = ["BLOCKED_EXIT_CODE", "Limits", "SandboxResult", "check_solution", "run_python"]

#: Exit status of a child whose audit hook stopped a forbidden operation.
BLOCKED_EXIT_CODE = 3

#: ``RLIMIT_NPROC`` for the child. The kernel counts *all* processes and threads of the user against
#: it (and ignores it for root), so it is a generous ceiling against thread bombs, not a tight one.
_MAX_PROCESSES = 256

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000

#: The trusted runner (:mod:`cpift.sandbox.runner`), run by path: see its docstring.
_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")


class Limits(Section):
    """What one sandboxed run may use. Every field must be positive; a bad value raises
    :class:`~cpift.settings.ConfigError` (a :class:`~cpift.errors.ParameterError`) naming it
    (``Limits.timeout: must be > 0, got 0``).

    Attributes:
        timeout: Wall-clock seconds before the whole process group is killed.
        cpu_seconds: CPU seconds (``RLIMIT_CPU``): ``SIGXCPU`` at this many, ``SIGKILL`` one later.
        memory_mb: Address space in MiB (``RLIMIT_AS``); larger allocations raise ``MemoryError``.
        max_output_bytes: How much of stdout and of stderr is returned (head and tail kept).
        max_file_bytes: Largest file the child may write (``RLIMIT_FSIZE``), its output included.
        max_open_files: File descriptors the child may have open (``RLIMIT_NOFILE``).
    """

    timeout: Float = Field(5.0, gt=0)
    cpu_seconds: int = Field(5, gt=0)
    memory_mb: int = Field(512, gt=0)
    max_output_bytes: int = Field(10_000, gt=0)
    max_file_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_open_files: int = Field(64, gt=0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = config_error(exc, Limits)
            raise ConfigError(f"Limits.{error.key}", error.reason) from None


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one sandboxed run.

    Attributes:
        passed: The child exited with status 0 and did not time out (for :func:`check_solution`,
            it must also have run to the end of the tests).
        returncode: Its exit status; negative for a signal (``-9`` for ``SIGKILL``); ``None`` never
            occurs after a run but is allowed for callers that build results by hand.
        timed_out: It ran past :attr:`Limits.timeout` and was killed.
        stdout: Its standard output, decoded as UTF-8, capped to :attr:`Limits.max_output_bytes`.
        stderr: Its standard error, likewise.
        duration: Wall-clock seconds from start to exit (or kill).
        reason: A short verdict: ``"ok"``, ``"timeout"``, ``"memory"``, ``"cpu time limit"``,
            ``"blocked: os.system"``, ``"exit code 1: AssertionError"``, ``"killed by SIGSEGV"``…
    """

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    duration: float
    reason: str


def run_python(code: str, limits: Limits = Limits()) -> SandboxResult:  # noqa: B008 - Limits is frozen
    """Run untrusted Python source in a sandboxed subprocess and report how it ended.

    The code runs as ``__main__`` (its ``if __name__ == "__main__":`` block runs) from a file
    ``solution.py`` in a fresh temporary directory, which is its working directory and is removed
    afterwards; only the standard library is importable. See the module docstring for what is and
    is not protected.

    Args:
        code: Python source. Characters that cannot be encoded as UTF-8 (lone surrogates) are
            replaced.
        limits: Time, memory, output and file limits.

    Returns:
        The :class:`SandboxResult`; the untrusted code failing in any way is a result, not an
        exception.

    Raises:
        ParameterError: ``code`` is not a string or ``limits`` not a :class:`Limits`.
        CpiftError: This platform cannot run the sandbox (no ``resource`` module).
        OSError: The interpreter could not be started.
    """
    return _run(code, limits, require_finish=False)


def check_solution(code: str, tests: str, limits: Limits = Limits()) -> SandboxResult:  # noqa: B008 - Limits is frozen
    """Score a solution: run ``code`` followed by ``tests`` (plain ``assert`` statements).

    It passes when every assertion holds and nothing else fails, within ``limits`` — and only if
    the run got to the end of the tests: code that calls ``sys.exit(0)``/``os._exit(0)`` before them
    (a known way for a model to fake a pass) fails with the reason ``"exited before the tests
    finished"``. The runner proves that it reached the end with a random token the parent hands it
    through standard input; code written to dig that token out of the runner's frames could forge
    it (see the module docstring: this is not a jail).

    Raises:
        ParameterError: ``code`` or ``tests`` is not a string, or ``limits`` not a :class:`Limits`.
    """
    if not isinstance(code, str):
        raise ParameterError(f"code must be a string of Python source, got {type(code).__name__}")
    if not isinstance(tests, str):
        raise ParameterError(f"tests must be a string of Python source, got {type(tests).__name__}")
    return _run(code + "\n\n" + tests, limits, require_finish=True)


def _run(code: str, limits: Limits, *, require_finish: bool) -> SandboxResult:
    if not isinstance(code, str):
        raise ParameterError(f"code must be a string of Python source, got {type(code).__name__}")
    if not isinstance(limits, Limits):
        raise ParameterError(f"limits must be a cpift.sandbox.Limits, got {type(limits).__name__}")
    if resource is None:  # pragma: no cover - Windows
        raise CpiftError("the sandbox needs a POSIX system (the resource module is missing)")
    with tempfile.TemporaryDirectory(prefix="cpift-sandbox-", ignore_cleanup_errors=True) as tmp:
        workdir = os.path.realpath(tmp)
        Path(workdir, SOLUTION_FILE).write_bytes(code.encode("utf-8", "replace"))
        argv = [sys.executable, "-S", "-s", "-B", "-u", "-P", _RUNNER, str(BLOCKED_EXIT_CODE)]
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "HOME": workdir,
            "TMPDIR": workdir,
        }
        nonce = secrets.token_hex(16)
        return _execute(argv, cwd=workdir, env=env, limits=limits, nonce=nonce, require_finish=require_finish)


# --------------------------------------------------------------------------------------------
# The parent's side: start, wait, kill, read back.


def _execute(argv: list[str], *, cwd: str, env: dict[str, str], limits: Limits, nonce: str | None = None,
             require_finish: bool = False) -> SandboxResult:
    """Run ``argv`` in its own session under ``limits`` (also used by the tests directly).

    With a ``nonce``, it is written to the child's standard input (then closed) and the child is
    expected to end its standard error with the line ``cpift-sandbox-finished <nonce>``
    (:data:`~cpift.sandbox.runner.FINISHED_MARKER`) once it has run to its end; that line is
    taken out of the returned ``stderr``. With ``require_finish`` a run without it does not pass.
    """
    setup = functools.partial(_child_setup, _rlimits(limits), _unshare_function())
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL if nonce is None else subprocess.PIPE,
            stdout=out, stderr=err, close_fds=True, start_new_session=True,
            preexec_fn=setup,  # noqa: PLW1509 - only C calls after fork; see _child_setup
        )
        timed_out = True
        try:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):  # a child that died at once closed its end
                    proc.stdin.write(nonce.encode() + b"\n")
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            timed_out = not _wait_exited(proc.pid, limits.timeout)
            duration = time.monotonic() - start
        finally:
            # The leader is not reaped yet, so its group id cannot belong to anyone else: kill
            # the leader (on timeout) and anything it left behind, then reap.
            _kill_group(proc.pid)
            returncode = proc.wait()
        marker = f"\n{FINISHED_MARKER} {nonce}\n".encode() if nonce is not None else None
        finished = marker is not None and _contains(err, marker)
        stdout = _read_capped(out, limits.max_output_bytes)
        stderr = _read_capped(err, limits.max_output_bytes)
        tail = _read_tail(err, 4096)
    if marker is not None:
        stderr = stderr.replace(marker.decode(), "")
        tail = tail.replace(marker.decode(), "")
    reason = _reason(returncode, timed_out, tail)
    passed = returncode == 0 and not timed_out
    if require_finish and passed and not finished:
        passed, reason = False, "exited before the tests finished"
    return SandboxResult(
        passed=passed,
        returncode=returncode,
        timed_out=timed_out,
        stdout=stdout,
        stderr=stderr,
        duration=duration,
        reason=reason,
    )


def _rlimits(limits: Limits) -> tuple[tuple[int, int, int], ...]:
    """``(resource, soft, hard)`` triples, never above the current hard limit; RLIMIT_AS last."""
    wanted = [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
        (resource.RLIMIT_FSIZE, limits.max_file_bytes, limits.max_file_bytes),
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_NPROC, _MAX_PROCESSES, _MAX_PROCESSES),
        (resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024, limits.memory_mb * 1024 * 1024),
    ]
    out = []
    for res, soft, hard in wanted:
        _, current_hard = resource.getrlimit(res)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        out.append((res, soft, hard))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _unshare_function() -> Callable[[int], int] | None:
    """libc's ``unshare``, looked up in the parent (never after ``fork``); None where missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _child_setup(rlimits: tuple[tuple[int, int, int], ...], unshare: Callable[[int], int] | None) -> None:
    """Runs in the child between ``fork`` and ``exec``: drop the network, then set the limits.

    Kept to plain C calls: after ``fork`` in a threaded parent only the calling thread exists.
    """
    if unshare is not None and unshare(_CLONE_NEWNET) != 0:
        unshare(_CLONE_NEWUSER | _CLONE_NEWNET)  # not root: a user namespace makes it permitted
    for res, soft, hard in rlimits:  # RLIMIT_AS comes last: nothing here allocates after it
        resource.setrlimit(res, (soft, hard))


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit *without reaping it*; True if it did."""
    deadline = time.monotonic() + timeout
    pidfd = -1
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
    if pidfd >= 0:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if poller.poll(max(1, math.ceil(left * 1000))):
                    return True
        finally:
            os.close(pidfd)
    delay = 0.0005
    while True:  # no pidfd: poll with WNOWAIT, which leaves the child to be reaped later
        with contextlib.suppress(ChildProcessError):
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.01)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_capped(file: BinaryIO, cap: int) -> str:
    """The file's text, or its head and tail around a marker when it holds more than ``cap`` bytes."""
    size = os.fstat(file.fileno()).st_size
    file.seek(0)
    if size <= cap:
        data = file.read()
    else:
        head = file.read(cap - cap // 2)
        file.seek(size - cap // 2)
        tail = file.read(cap // 2) if cap // 2 else b""
        data = head + f"\n[... {size - cap} bytes truncated ...]\n".encode() + tail
    return data.decode("utf-8", "replace")


def _contains(file: BinaryIO, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the file holds ``needle``, read in chunks that overlap by its length."""
    file.seek(0)
    carry = b""
    while block := file.read(chunk):
        if needle in carry + block:
            return True
        carry = block[-len(needle):]
    return False


def _read_tail(file: BinaryIO, count: int) -> str:
    size = os.fstat(file.fileno()).st_size
    file.seek(max(0, size - count))
    return file.read().decode("utf-8", "replace")


_BLOCKED_LINE = re.compile(r"^blocked: (.{1,200})$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def _reason(returncode: int, timed_out: bool, stderr_tail: str) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        signum = -returncode
        if signum == signal.SIGXCPU:
            return "cpu time limit"
        if signum == signal.SIGXFSZ:
            return "file size limit"
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    if returncode == BLOCKED_EXIT_CODE:
        found = _BLOCKED_LINE.findall(stderr_tail)
        if found:
            return "blocked: " + found[-1].strip()
    lines = [line for line in stderr_tail.splitlines() if line.strip()]
    exception = _EXCEPTION_LINE.match(lines[-1]) if lines else None
    if exception is not None and exception.group(1).split(".")[-1] == "MemoryError":
        return "memory"
    if exception is not None and ("Traceback (most recent call last):" in stderr_tail
                                  or exception.group(1).endswith(("Error", "Exception", "Exit", "Warning"))):
        return f"exit code {returncode}: {exception.group(1)}"
    return f"exit code {returncode}"
