"""The configurator in a real browser: JupyterLab + headless Chromium run notebook 02, move the r slider, press
Save, then run notebook 03's settings cell and read the new r on the page (the 02 -> 03 hand-off).

Follows the recipe measured in FACTS.md: Debian's Chromium binary driven by Playwright (no
``playwright install``), JupyterLab with temporary config/data/runtime folders, a free port and a
token, ``window.jupyterapp`` exposed so that the test can run every cell.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from tests.lab_server import free_port, running_lab

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the real binary; the /usr/bin wrapper fails here
REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "02_configure_lora.ipynb"
TRAIN_NOTEBOOK = REPO / "notebooks" / "03_train.ipynb"

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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port, with this venv's Python as the `python3` kernel."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    (root / "notebooks").mkdir(parents=True)
    for notebook in (NOTEBOOK, TRAIN_NOTEBOOK):  # ../runs/ of the notebooks lands in root/runs
        shutil.copy(notebook, root / "notebooks" / notebook.name)
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
    port, token = free_port(), secrets.token_hex(16)
    args = ["--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={settings_dir}", f"--LabApp.workspaces_dir={home / 'workspaces'}",
            "--LabApp.news_url=None", "--LabApp.expose_app_in_browser=True"]
    with running_lab(args, port=port, token=token, env=env, log=tmp_path / "lab.log", cwd=root, timeout=60) as url:
        yield {"url": url, "token": token, "root": root}


def _screenshot(page, tmp_path, name: str) -> None:
    """Keeps a screenshot in runs/ for a person to look at."""
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    (REPO / "runs").mkdir(exist_ok=True)
    shutil.copy(shot, REPO / "runs" / name)


def test_r_slider_save_button_and_03_reads_the_saved_r(lab, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    saved = lab["root"] / "runs" / "configured.yaml"
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
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)  # Run All finished
            assert not saved.exists()  # Run All saves nothing: saving is the learner's act

            configurator = page.locator(".lora-nb-configurator")
            configurator.scroll_into_view_if_needed()
            handle = page.locator(".lora-nb-r .noUi-handle")
            handle.focus()
            page.keyboard.press("ArrowRight")  # the next power of two: 16 -> 32
            page.wait_for_function(
                "(old) => { const e = document.querySelector('.lora-nb-trainable-count');"
                " return e && e.textContent !== old; }", arg=before, timeout=30_000)
            after = count.inner_text()
            assert after.startswith(f"{4_884_480 * 2:,} of "), after  # r * (in + out): linear in r
            assert page.locator(".lora-nb-r input").input_value() == "32"  # the typed box follows

            page.locator(".lora-nb-save-settings").click()
            status = page.locator(".lora-nb-save-status")
            page.wait_for_function("() => document.querySelector('.lora-nb-save-status').textContent"
                                   ".includes('Saved at')", timeout=30_000)
            assert str(saved) in status.inner_text()
            configurator.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            _screenshot(page, tmp_path, "browser-configurator.png")

            page.goto(f"{lab['url']}/lab/tree/notebooks/{TRAIN_NOTEBOOK.name}?reset&token={lab['token']}")
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            for _ in range(3):  # title, "Settings and model", then the settings cell
                page.evaluate("window.jupyterapp.commands.execute('notebook:run-cell-and-select-next')")
            page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                                   ".some(e => e.textContent.includes('lora_alpha'))", timeout=120_000)
            output = page.locator(".jp-OutputArea-output", has_text="lora_alpha").first.inner_text()
            assert "Training with the settings saved at" in output and "configured.yaml" in output, output
            assert "r 32, lora_alpha 32, targets all-linear" in output, output
            _screenshot(page, tmp_path, "browser-train-settings.png")
        except Exception:
            _screenshot(page, tmp_path, "browser-failure.png")  # what the page showed, for a person to look at
            (REPO / "runs" / "browser-failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
