"""The configurator in a real browser: JupyterLab + headless Chromium run notebook 02 and move the r slider.

Follows the recipe measured in FACTS.md: Debian's Chromium binary driven by Playwright (no
``playwright install``), JupyterLab with temporary config/data/runtime folders, a free port and a
token, ``window.jupyterapp`` exposed so that the test can run every cell.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the real binary; the /usr/bin wrapper fails here
REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "02_configure_lora.ipynb"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium not found at {CHROMIUM} "
                       "(install it with `apt-get install -y chromium`)"),
]

KERNEL_IDLE = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle';
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port, with this venv's Python as the `python3` kernel."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)  # ../runs/ of the notebook lands in root/runs
    settings_dir = home / "user-settings"
    _write_json(settings_dir / "@jupyterlab/apputils-extension/notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    # every cell in the DOM (no virtual scrolling), so widgets of off-screen cells can be found
    _write_json(settings_dir / "@jupyterlab/notebook-extension/tracker.jupyterlab-settings", {"windowingMode": "none"})
    _write_json(home / "data" / "kernels" / "python3" / "kernel.json", {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"})
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"), IPYTHONDIR=str(home / "ipython"), HF_HUB_OFFLINE="1",
               JUPYTER_PLATFORM_DIRS="1")
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.user_settings_dir={settings_dir}", f"--LabApp.workspaces_dir={home / 'workspaces'}",
         "--LabApp.news_url=None", "--LabApp.expose_app_in_browser=True"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "token": token, "root": root}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_configurator_renders_and_r_slider_changes_the_trainable_count(lab, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{lab['url']}/lab/tree/notebooks/{NOTEBOOK.name}?reset&token={lab['token']}")
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            count = page.locator(".lora-nb-trainable-count")
            count.wait_for(timeout=90_000)
            before = count.inner_text()
            assert before.startswith("4,884,480 of "), before  # demo-cpu preset: r 16, all-linear

            configurator = page.locator(".lora-nb-configurator")
            configurator.scroll_into_view_if_needed()
            handle = page.locator(".lora-nb-r .noUi-handle")
            assert float(handle.get_attribute("aria-valuenow")) == 16
            handle.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "(old) => { const e = document.querySelector('.lora-nb-trainable-count');"
                " return e && e.textContent !== old; }", arg=before, timeout=30_000)
            after = count.inner_text()
            assert float(handle.get_attribute("aria-valuenow")) == 17
            assert after.startswith(f"{4_884_480 // 16 * 17:,} of "), after  # r * (in + out): linear in r

            configurator.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            shot = tmp_path / "browser-configurator.png"
            page.screenshot(path=str(shot))
            (REPO / "runs").mkdir(exist_ok=True)
            shutil.copy(shot, REPO / "runs" / "browser-configurator.png")
            saved = lab["root"] / "runs" / "configured.yaml"  # written by the notebook's last cell
            deadline = time.monotonic() + 30
            while not saved.exists() and time.monotonic() < deadline:
                time.sleep(0.3)
            assert saved.exists()
        finally:
            browser.close()
