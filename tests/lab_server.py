"""A JupyterLab server for the tests that need one: start on a free port, wait until it answers, stop."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_lab(args: list[str], *, port: int, token: str, env: dict[str, str], log: Path,
                cwd: Path | None = None, timeout: float = 90) -> Iterator[str]:
    """Runs `python -m jupyterlab ARGS` and yields its URL once `/api/status` answers 200.

    Args:
        args: JupyterLab's arguments; they must set `--port=PORT` and `--IdentityProvider.token=TOKEN`.
        port: the port the arguments name.
        token: the token the arguments name.
        env: the server's environment.
        log: where the server's output goes; its tail is in the error when the server does not start.
        cwd: the server's working folder.
        timeout: seconds to wait for the first answer.

    Raises:
        AssertionError: the server exited or did not answer within `timeout`.
    """
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "jupyterlab", *args], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=cwd)
        try:
            _wait_for_status(server, f"{url}/api/status?token={token}", log, timeout)
            yield url
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_for_status(server: subprocess.Popen, status_url: str, log: Path, timeout: float) -> None:
    """Polls `status_url` until it answers 200; fails with the log's tail if the server exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(status_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"JupyterLab did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
