"""kit.py lab starts JupyterLab as root too (Docker, cloud VMs), where JupyterLab alone refuses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import kit


def test_allow_root_is_added_only_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert kit.lab_arguments(["--port=9"]) == ["--port=9", "--allow-root"]
    assert kit.lab_arguments(["--allow-root"]) == ["--allow-root"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert kit.lab_arguments([]) == []


def test_jupyterlab_starts_with_the_kits_arguments(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "c"), JUPYTER_RUNTIME_DIR=str(tmp_path / "r"),
               JUPYTER_DATA_DIR=str(tmp_path / "d"), IPYTHONDIR=str(tmp_path / "i"))
    args = kit.lab_arguments(["--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
                              "--IdentityProvider.token=t", f"--ServerApp.root_dir={tmp_path}",
                              "--LabApp.news_url=None"])
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token=t", timeout=2) as r:
                    assert r.status == 200
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        raise AssertionError(f"JupyterLab did not start: {server.stderr.read()[-2000:] if server.poll() is not None else 'timeout'}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
