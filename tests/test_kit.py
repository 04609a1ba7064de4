"""kit.py lab starts JupyterLab as root too (Docker, cloud VMs), where JupyterLab alone refuses."""

from __future__ import annotations

import os
import urllib.request

import kit
from tests.lab_server import free_port, running_lab


def test_allow_root_is_added_only_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert kit.lab_arguments(["--port=9"]) == ["--port=9", "--allow-root"]
    assert kit.lab_arguments(["--allow-root"]) == ["--allow-root"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert kit.lab_arguments([]) == []


def test_jupyterlab_starts_with_the_kits_arguments(tmp_path):
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "c"), JUPYTER_RUNTIME_DIR=str(tmp_path / "r"),
               JUPYTER_DATA_DIR=str(tmp_path / "d"), IPYTHONDIR=str(tmp_path / "i"))
    args = kit.lab_arguments(["--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
                              "--IdentityProvider.token=t", f"--ServerApp.root_dir={tmp_path}",
                              "--LabApp.news_url=None"])
    with running_lab(args, port=port, token="t", env=env, log=tmp_path / "lab.log") as url:
        with urllib.request.urlopen(f"{url}/api/status?token=t", timeout=5) as response:
            assert response.status == 200
