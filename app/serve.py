"""Starting the app's server from Python: for the browser test and the README's screenshots.

``make app`` is how people start the app; this module is for programs that need a running server
on a free localhost port for a while, opened on a given run, and gone afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

APP = Path(__file__).resolve().parent / "main.py"
CHROMIUM = "/usr/bin/chromium"  # Debian's package, which Playwright drives (no browser download)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(run: str | os.PathLike[str], log: str | os.PathLike[str], *, timeout: float = 120) -> Iterator[str]:
    """``streamlit run app/main.py`` on a free port, opening ``run`` by default; yields its URL.

    The server's output goes to the file ``log``; it is stopped (its whole process group) on exit.
    Raises ``RuntimeError`` with the log's tail when it does not answer within ``timeout`` seconds.
    """
    port = free_port()
    env = {**os.environ, "CPIFT_APP_RUN": str(run)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port), "--server.headless",
             "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=APP.parents[1], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start:\n{Path(log).read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
