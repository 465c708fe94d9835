"""The sandbox's trusted runner: the first Python code the sandboxed interpreter executes.

:mod:`cpift.sandbox` starts it by path in a fresh interpreter, ``python -S -s -B -u -P
.../cpift/sandbox/runner.py <blocked exit status>``, in the sandbox directory, with the solution
in ``solution.py`` there and a nonce on standard input. It reads both, installs the audit hook,
and only then compiles and runs the solution as ``__main__``; the module docstring of
:mod:`cpift.sandbox` lists what the hook blocks and why.

Run by path, not as ``-m cpift.sandbox.runner``: with ``-S`` there are no site-packages, so cpift
itself is not importable in the child, and nothing here may import it (nor anything outside the
standard library). Everything the hook uses is bound in its closure before any untrusted code
runs, so rebinding ``os.*``, ``builtins.*``, ``posixpath.*`` or this module's globals later does
not change what the hook does. The parent imports this module only for the two constants below.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the runner imports as little as it can
if TYPE_CHECKING:
    from collections.abc import Callable

SOLUTION_FILE = "solution.py"
"""The file in the sandbox directory that holds the code to run."""

FINISHED_MARKER = "cpift-sandbox-finished"
"""Written to standard error, with the nonce, once the solution has run to its end."""


def install(blocked_exit: int) -> tuple[str, Callable[[], None]]:
    """Read the nonce and the solution, then install the audit hook and disable what it cannot see.

    Returns the solution's source and a function that proves to the parent, on standard error,
    that the solution ran to its end. Blocked operations end the process with ``blocked_exit``.
    """
    import posix

    nonce = sys.stdin.readline().strip()  # the parent writes it, then closes stdin
    with open(SOLUTION_FILE, encoding="utf-8") as f:
        source = f.read()
    workdir = posix.getcwd()

    write, exit_, readlink, stat, getcwd = posix.write, posix._exit, posix.readlink, posix.stat, posix.getcwd
    st_mode = type(stat("/")).st_mode.__get__
    type_, str_, bytes_, int_, repr_ = type, str, bytes, int, repr
    OSError_, Exception_, ModuleNotFoundError_ = OSError, Exception, ModuleNotFoundError
    own_pid = str_(posix.getpid())
    inside_prefix = workdir + "/"
    af_unix = 1  # AF_UNIX on every POSIX system
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC

    always = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "pty.spawn", "os.startfile", "webbrowser.open", "os.kill", "os.killpg",
        "signal.pthread_kill", "os.link", "os.symlink", "resource.setrlimit", "resource.prlimit",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.unshare", "os.setns", "sys.remote_exec",
    ))
    blocked_prefixes = ("socket.", "ctypes.")
    blocked_modules = frozenset(("ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                                 "_interpchannels", "_interpqueues", "_xxtestfuzz"))
    # C modules that create or remove files with no audit event: SQLite (the database, ATTACH, VACUUM INTO),
    # readline's history files, dbm's C back ends, POSIX shared memory and named semaphores (/dev/shm).
    # Importing them fails as if they were not installed, so code that can do without them (dbm falls
    # back to dbm.dumb) still runs.
    unavailable_modules = frozenset(("_sqlite3", "readline", "_gdbm", "_dbm", "_posixshmem", "_multiprocessing"))

    def block(what, detail=None):
        message = "blocked: " + what.replace("\n", " ")[:200] + "\n"
        if detail is not None:
            message += "sandbox: " + detail + "\n"
        write(2, message.encode("utf-8", "replace"))
        exit_(blocked_exit)

    def fd_target(fd):
        target = readlink("/proc/self/fd/" + str_(fd))
        return target if target.startswith("/") else None

    def resolve(path, dir_fd=None):
        """The absolute path with every existing symbolic link followed; None where unknowable."""
        kind = type_(path)
        if kind is int_:
            return fd_target(path)
        if kind is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not str_:
            return None
        if not path.startswith("/"):
            if dir_fd is None or dir_fd == -1 or dir_fd == -100:
                base = getcwd()
            else:
                base = fd_target(dir_fd)
                if base is None:
                    return None
            path = base + "/" + path
        pending = [part for part in path.split("/") if part and part != "."]
        pending.reverse()
        done = []
        hops = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + "/".join(done + [part])
            try:
                target = readlink(candidate)
            except OSError_:  # not a link, or does not exist: take the name as it is
                done.append(part)
                continue
            hops += 1
            if hops > 40:
                return None
            if target.startswith("/"):
                done = []
            more = [p for p in target.split("/") if p and p != "."]
            more.reverse()
            pending.extend(more)
        return "/" + "/".join(done)

    def inside(resolved):
        return resolved is not None and resolved.startswith(inside_prefix)

    def check_change(event, path, dir_fd=None):
        resolved = resolve(path, dir_fd)
        if not inside(resolved) and resolved != "/dev/null":
            block(event, "changes outside the sandbox directory: " + repr_(resolved)[:300])

    def check_read(event, path):
        if type_(path) is int_:
            return
        resolved = resolve(path)
        if resolved is None:
            block(event, "path that cannot be checked")
        if resolved.startswith("/proc/"):
            pid = resolved[6:].split("/", 1)[0]
            if pid.isdigit() and pid != own_pid:
                block(event, "another process's /proc entry: " + repr_(resolved)[:300])
        if resolved == workdir or inside(resolved):
            return
        try:
            mode = st_mode(stat(resolved))
        except OSError_:
            return
        if mode & 0o170000 == 0o040000:
            block(event, "opening a directory outside the sandbox: " + repr_(resolved)[:300])

    def hook(event, args):
        try:
            if event == "open":
                path, mode, flags = args
                writing = (type_(flags) is int_ and flags & write_flags) or (
                    type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
                if writing:
                    if type_(path) is not int_:
                        check_change(event, path)
                else:
                    check_read(event, path)
            elif event == "socket.__new__":
                if args[1] != af_unix:  # socketpair() (asyncio's self-pipe) is harmless; connect/bind are not
                    block(event, "a socket other than AF_UNIX")
            elif event in always or event.startswith(blocked_prefixes):
                block(event)
            elif event == "import":
                name = args[0]
                if type_(name) is str_:
                    root = name.split(".", 1)[0]
                    if root in blocked_modules or root.startswith("_test"):
                        block("import " + name)
                    if root in unavailable_modules:
                        why = " in the sandbox (it writes files that cannot be checked)"
                        raise ModuleNotFoundError_("No module named " + repr_(name) + why, name=name)
            elif event == "os.remove" or event == "os.rmdir":
                check_change(event, args[0], args[1])
            elif event == "os.mkdir":
                check_change(event, args[0], args[2])
            elif event == "os.rename":
                check_change(event, args[0], args[2])
                check_change(event, args[1], args[3])
            elif event == "os.truncate":
                if type_(args[0]) is not int_:  # a descriptor passed the check when it was opened
                    check_change(event, args[0])
            elif event == "os.chmod" or event == "os.chown" or event == "os.utime":
                check_change(event, args[0], args[-1])
            elif event == "os.setxattr" or event == "os.removexattr":
                check_change(event, args[0])
            elif event == "shutil.rmtree":
                check_change(event, args[0], args[1])
            elif event == "os.chdir":
                resolved = resolve(args[0])
                if resolved != workdir and not inside(resolved):
                    block(event, "leaving the sandbox directory: " + repr_(resolved)[:300])
        except ModuleNotFoundError_:  # an unavailable module: the import fails, the code goes on
            raise
        except Exception_ as exc:  # a check that fails blocks: fail closed
            block(event, "the check failed: " + type_(exc).__name__)

    sys.addaudithook(hook)

    # Unaudited ways to start processes, send signals and create files. A FIFO or device node is
    # refused even inside the directory: a device node there would open a disk for writing.
    import _posixsubprocess
    import _signal
    import os

    def disabled(name):
        def call(*args, **kwargs):
            block(name)
        return call

    _posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")
    for module in (posix, os):
        module.mkfifo = disabled("os.mkfifo")
        module.mknod = disabled("os.mknod")
    for module in (_signal, sys.modules.get("signal")):
        if module is not None and hasattr(module, "pidfd_send_signal"):
            delattr(module, "pidfd_send_signal")

    finish_line = ("\n" + FINISHED_MARKER + " " + nonce + "\n").encode()

    def finished():
        """Proof for the parent that the code ran to its end rather than exiting early."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception_:
                pass
        write(2, finish_line)

    return source, finished


def main() -> None:
    """Run the solution as ``__main__`` under the hook; exit 1 with its traceback if it raises."""
    source, finished = install(int(sys.argv[1]))
    import builtins
    builtins.exit = builtins.quit = sys.exit  # what site would have added (-S skips it)
    solution = type(sys)("__main__")
    solution.__file__ = SOLUTION_FILE
    sys.modules["__main__"] = solution
    sys.argv[:] = [SOLUTION_FILE]
    filename = SOLUTION_FILE  # a local: the solution may rebind this module's globals
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
        del source
        exec(code, solution.__dict__)  # noqa: S102 - running the solution is the point
        finished()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported like the interpreter would
        import traceback
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != filename:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
