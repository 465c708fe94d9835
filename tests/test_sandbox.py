"""Tests of cpift.sandbox: scoring works, and untrusted code stays inside its limits."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cpift.errors import ParameterError
from cpift.sandbox import BLOCKED_EXIT_CODE, Limits, SandboxResult, _execute, check_solution, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is tested on Linux")

FAST = Limits(timeout=2.0, cpu_seconds=2)


def live_processes(predicate) -> list[int]:
    """Pids of processes (not zombies) whose ``(pid, ppid, pgrp)`` satisfy the predicate."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and predicate(int(entry), int(fields[1]), int(fields[2])):
            found.append(int(entry))
    return found


def children_of_this_process() -> list[int]:
    me = os.getpid()
    return live_processes(lambda pid, ppid, pgrp: ppid == me)


def assert_blocked(result: SandboxResult, event: str) -> None:
    assert not result.passed
    assert result.returncode == BLOCKED_EXIT_CODE, result
    assert result.reason.startswith(f"blocked: {event}"), result
    assert f"blocked: {event}" in result.stderr


# --- correct and incorrect code -----------------------------------------------------------------

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_correct_solution_passes():
    result = check_solution(ADD, ADD_TESTS, FAST)
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.reason == "ok"
    assert result.stderr == ""
    assert 0 < result.duration < FAST.timeout


def test_failing_assert_fails_and_names_the_exit_code():
    result = check_solution("def add(a, b):\n    return a - b\n", ADD_TESTS, FAST)
    assert not result.passed and not result.timed_out
    assert result.returncode == 1
    assert result.reason == "exit code 1: AssertionError"
    assert "AssertionError" in result.stderr and 'File "solution.py", line 5' in result.stderr


@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()",
                                        "raise SystemExit"])
def test_exiting_before_the_tests_does_not_pass(early_exit):
    result = check_solution(ADD + early_exit, ADD_TESTS, FAST)
    assert result.returncode == 0
    assert not result.passed
    assert result.reason == "exited before the tests finished"


def test_run_python_returns_output_and_runs_main_block():
    code = "import sys\nif __name__ == '__main__':\n    print('out', sorted({3, 1, 2}))\n    print('err', file=sys.stderr)\n"
    result = run_python(code, FAST)
    assert result.passed and result.reason == "ok"
    assert result.stdout == "out [1, 2, 3]\n"
    assert result.stderr == "err\n"


def test_syntax_error_fails_with_stderr():
    result = run_python("def f(:\n    pass\n", FAST)
    assert not result.passed and result.returncode == 1
    assert "SyntaxError" in result.stderr and "SyntaxError" in result.reason


def test_standard_library_threads_and_files_in_the_sandbox_work():
    code = (
        "import asyncio, collections, concurrent.futures, dataclasses, json, pickle, tempfile\n"
        "from pathlib import Path\n"
        "@dataclasses.dataclass\nclass P:\n    x: int\n"
        "assert pickle.loads(pickle.dumps(P(1))) == P(1)\n"
        "Path('notes.txt').write_text('hi')\nassert Path('notes.txt').read_text() == 'hi'\n"
        "fd, name = tempfile.mkstemp()\nassert name.startswith(str(Path.cwd()))\n"
        "with concurrent.futures.ThreadPoolExecutor(2) as ex:\n    assert list(ex.map(abs, [-1, -2])) == [1, 2]\n"
        "assert asyncio.run(asyncio.sleep(0, 'done')) == 'done'\n"
    )
    result = run_python(code, FAST)
    assert result.passed, result


def test_stdin_is_empty():
    result = run_python("input()", FAST)
    assert not result.passed and "EOFError" in result.reason


# --- resource limits ------------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_timeout():
    limits = Limits(timeout=1.0, cpu_seconds=10)
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", limits)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.passed
    assert result.reason == "timeout"
    assert result.returncode == -9
    assert 1.0 <= result.duration < 1.5
    assert elapsed < 2.0
    assert children_of_this_process() == []


def test_cpu_limit_kills_a_busy_loop():
    result = run_python("while True:\n    pass\n", Limits(timeout=5.0, cpu_seconds=1))
    assert not result.passed and not result.timed_out
    assert result.reason == "cpu time limit"
    assert result.duration < 3.0


@pytest.mark.parametrize("allocation", ["x = bytearray(10**10)", "x = [0] * 10**10",
                                        "xs = []\nwhile True:\n    xs.append(bytearray(10**7))"])
def test_huge_allocation_fails_in_the_child(allocation):
    result = run_python(allocation, Limits(timeout=5.0, memory_mb=256))
    assert not result.passed and not result.timed_out
    assert result.reason == "memory" or result.returncode < 0, result


def test_huge_output_is_captured_truncated_without_hanging():
    limits = Limits(timeout=5.0, max_output_bytes=1000)
    result = run_python("print('x' * 10**7)\nimport sys\nprint('the end', file=sys.stderr)", limits)
    assert result.passed
    assert len(result.stdout) < 1100
    assert result.stdout.startswith("x" * 400) and result.stdout.rstrip().endswith("x" * 400)
    assert "bytes truncated" in result.stdout
    assert result.stderr == "the end\n"
    assert result.duration < 3.0


def test_file_size_limit():
    result = run_python("open('big.bin', 'wb').write(b'x' * 100_000)", Limits(timeout=2.0, max_file_bytes=1000))
    assert not result.passed
    assert "File too large" in result.stderr


def test_open_files_limit():
    code = "files = [open('f%d' % i, 'w') for i in range(100)]"
    result = run_python(code, Limits(timeout=2.0, max_open_files=32))
    assert not result.passed and "Too many open files" in result.stderr


# --- blocked operations -----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "event"), [
    ("import os\nos.system('echo hi')", "os.system"),
    ("import subprocess\nsubprocess.run(['ls'])", "subprocess.Popen"),
    ("import os\nos.execv('/bin/ls', ['ls'])", "os.exec"),
    ("import os\nos.posix_spawn('/bin/ls', ['ls'], {})", "os.posix_spawn"),
    ("import _posixsubprocess\n_posixsubprocess.fork_exec()", "_posixsubprocess.fork_exec"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "os.kill"),
    ("import ctypes", "import ctypes"),
    ("import gc\ngc.get_objects()", "gc.get_objects"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "resource.setrlimit"),
    ("import os\nos.symlink('/etc', 'etc')", "os.symlink"),
    ("import os\ntry:\n    os.system('true')\nexcept BaseException:\n    pass\nprint('survived')", "os.system"),
])
def test_dangerous_calls_are_blocked(code, event):
    result = run_python(code, FAST)
    assert_blocked(result, event)
    assert "survived" not in result.stdout


def test_fork_bomb_is_contained():
    start = time.monotonic()
    result = run_python("import os\nwhile True:\n    os.fork()\n", FAST)
    assert_blocked(result, "os.fork")
    assert time.monotonic() - start < FAST.timeout
    assert children_of_this_process() == []


def test_socket_connect_to_loopback_is_blocked():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')"
        result = run_python(code, FAST)
        assert_blocked(result, "socket.")
        with pytest.raises(TimeoutError):
            server.accept()


def test_writing_outside_the_sandbox_is_blocked():
    target = Path(tempfile.gettempdir(), f"cpift_sandbox_escape_{secrets.token_hex(8)}")
    try:
        for code in (f"open({str(target)!r}, 'w').write('escaped')",
                     f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                     f"from pathlib import Path\nPath({str(target)!r}).write_text('escaped')",
                     f"open('../{target.name}', 'w').write('escaped')"):
            result = run_python(code, FAST)
            assert_blocked(result, "open")
            assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_removing_and_renaming_outside_the_sandbox_is_blocked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "tree").mkdir()
    cases = [
        (f"import os\nos.remove({str(victim)!r})", "os.remove"),
        (f"import os\nos.rename({str(victim)!r}, 'stolen.txt')", "os.rename"),
        (f"import shutil\nshutil.rmtree({str(tmp_path / 'tree')!r})", "shutil.rmtree"),
        (f"import os\nos.chmod({str(victim)!r}, 0)", "os.chmod"),
        (f"import os\nos.chdir({str(tmp_path)!r})", "os.chdir"),
        (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.unlink('victim.txt', dir_fd=fd)", "open"),
    ]
    for code, event in cases:
        assert_blocked(run_python(code, FAST), event)
    assert victim.read_text() == "keep me"
    assert (tmp_path / "tree").is_dir()
    assert victim.stat().st_mode & 0o777 != 0


@pytest.mark.parametrize(("call", "event"), [
    ("os.mkfifo(target)", "os.mkfifo"),
    ("os.mknod(target)", "os.mknod"),
    ("os.mknod(target, 0o600 | stat.S_IFIFO)", "os.mknod"),
    ("posix.mkfifo(target)", "os.mkfifo"),
    ("os.mkfifo('inside')", "os.mkfifo"),
])
def test_fifos_and_device_nodes_are_never_created(call, event, tmp_path):
    # Neither raises an audit event: the runner disables both, inside the sandbox directory too.
    target = tmp_path / "node"
    code = (f"import os, posix, stat\ntarget = {str(target)!r}\n"
            f"try:\n    {call}\nexcept BaseException:\n    pass\nprint('survived')")
    result = run_python(code, FAST)
    assert_blocked(result, event)
    assert "survived" not in result.stdout
    assert not os.path.lexists(target)


def test_modules_that_write_unchecked_files_are_unavailable(tmp_path):
    # SQLite, readline and dbm's C back ends write files, and POSIX shared memory creates them in
    # /dev/shm, without any audit event: their C modules cannot be imported.
    shm_name = f"cpift_sandbox_{secrets.token_hex(8)}"
    cases = [
        f"import sqlite3\nsqlite3.connect({str(tmp_path / 'a.db')!r}).execute('create table t(x)')",
        f"import sqlite3\nsqlite3.connect(':memory:').execute(\"attach {str(tmp_path / 'b.db')!r} as b\")",
        f"import readline\nreadline.write_history_file({str(tmp_path / 'history')!r})",
        f"import dbm.gnu\ndbm.gnu.open({str(tmp_path / 'c.db')!r}, 'c')",
        f"from multiprocessing import shared_memory\nshared_memory.SharedMemory({shm_name!r}, create=True, size=8)",
        "import multiprocessing\nmultiprocessing.Lock()",
    ]
    try:
        for code in cases:
            result = run_python(code, FAST)
            assert result.reason == "exit code 1: ModuleNotFoundError", (code, result)
            assert "in the sandbox (it writes files that cannot be checked)" in result.stderr
        assert list(tmp_path.iterdir()) == []
        assert not Path("/dev/shm", shm_name).exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{shm_name}")
    # Code that can do without them still runs: dbm falls back to dbm.dumb inside the directory.
    code = "import dbm\nwith dbm.open('cache', 'c') as db:\n    db['k'] = 'v'\nprint(dbm.whichdb('cache'))"
    result = run_python(code, FAST)
    assert result.passed and result.stdout.strip() == "dbm.dumb", result


def test_parent_environment_is_not_visible(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("CPIFT_SANDBOX_SECRET", secret)
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('CPIFT_SANDBOX_SECRET'))", FAST)
    assert result.passed
    assert secret not in result.stdout
    assert "CPIFT_SANDBOX_SECRET" not in result.stdout
    assert result.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'PYTHONHASHSEED', 'TMPDIR']"
    # Nor through /proc: reading another process's entries is blocked.
    result = run_python("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", FAST)
    assert_blocked(result, "open")
    assert secret not in result.stdout


def test_sandbox_directory_is_removed():
    result = run_python("import os\nprint(os.getcwd())\nopen('left.txt', 'w').write('x')", FAST)
    assert result.passed
    assert not Path(result.stdout.strip()).exists()


# --- the process group ----------------------------------------------------------------------------


def _shell(script: str, tmp_path: Path, timeout: float) -> tuple[SandboxResult, int]:
    env = {"PATH": "/usr/bin:/bin"}
    result = _execute(["/bin/sh", "-c", script], cwd=str(tmp_path), env=env, limits=Limits(timeout=timeout))
    return result, int((tmp_path / "pid").read_text())


def _wait_gone(pgid: int, seconds: float = 1.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := live_processes(lambda pid, ppid, pgrp: pgrp == pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_timeout_kills_the_whole_process_group(tmp_path):
    result, pgid = _shell("echo $$ > pid; sleep 30 & sleep 30 & wait", tmp_path, timeout=0.5)
    assert result.timed_out and result.reason == "timeout"
    assert _wait_gone(pgid) == []


def test_processes_left_behind_are_killed(tmp_path):
    result, pgid = _shell("echo $$ > pid; sleep 30 &", tmp_path, timeout=5.0)
    assert result.passed and result.duration < 2.0
    assert _wait_gone(pgid) == []


# --- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1.0}, {"timeout": float("nan")},
                                    {"timeout": float("inf")}, {"cpu_seconds": 0}, {"memory_mb": -5},
                                    {"max_output_bytes": 0}, {"max_file_bytes": 0}, {"max_open_files": 0},
                                    {"cpu_seconds": 1.5}, {"memory_mb": True}])
def test_limits_are_validated(kwargs):
    with pytest.raises(ParameterError):
        Limits(**kwargs)


def test_arguments_are_validated():
    with pytest.raises(ParameterError):
        run_python(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ParameterError):
        check_solution("x = 1", None)  # type: ignore[arg-type]
    with pytest.raises(ParameterError):
        run_python("x = 1", {"timeout": 1})  # type: ignore[arg-type]
