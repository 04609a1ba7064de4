"""Colab, for real: notebook 00's install cell in a fresh environment that has only torch, then notebooks 01-04,
with 03 (training) and 04 (evaluation) in kernels under Binder's 2 GB cap (`tests/memory_cap.py`), as a
teacher's rehearsal (training cut to 2 steps, `LORA_NB_REHEARSAL_STEPS`).

What Colab gives a notebook, rebuilt here:

- a fresh virtual environment (not ``--system-site-packages``) whose only preinstalled package is torch
  (with its own dependencies): a folder of links to this interpreter's torch, named by a ``.pth`` file;
- ``ipykernel`` to run notebooks, and an importable ``google.colab`` (a stub module);
- the kit nowhere: the install cell installs it from a wheel built from this checkout, set through
  ``LORA_NB_SOURCE`` as a learner sets the repository URL, and pulls the rest of the stack from the
  package index (PyPI in CI).

``PYTHONPATH`` is cleared for the kernel, so the notebooks import the installed wheel, not the checkout.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from lora_nb.pipeline import REHEARSAL_VARIABLE
from tests.memory_cap import CAP, Cap, memory_cap

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["00_environment.ipynb", "01_load_4bit.ipynb", "02_configure_lora.ipynb", "03_train.ipynb",
             "04_evaluate.ipynb"]
CAPPED = ("03_train.ipynb", "04_evaluate.ipynb")  # the demo's training and evaluation, as on Binder

pytestmark = pytest.mark.slow


def _dependency_closure(name: str) -> list[importlib.metadata.Distribution]:
    """``name``'s distribution and everything it needs (extras left out), as installed here."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        wanted = re.split(r"[ ;<>=!~\[]", todo.pop(), maxsplit=1)[0]
        key = wanted.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(wanted)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return list(seen.values())


def _torch_only(folder: Path) -> Path:
    """A folder with links to torch and its dependencies only (what Colab has preinstalled, for the kit's sake)."""
    folder.mkdir()
    for dist in _dependency_closure("torch"):
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists() and top not in ("__pycache__", "bin"):
                (folder / top).symlink_to(source)
    return folder


def _colab_venv(tmp: Path) -> Path:
    """The fresh environment: torch via a .pth, google.colab stub, ipykernel; returns its python."""
    env_dir = tmp / "colab-venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    stub = tmp / "colab-stub" / "google" / "colab"  # `google` stays a namespace package (protobuf shares it)
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab module."""\n')
    (site / "colab_preinstalled.pth").write_text(f"{_torch_only(tmp / 'torch-only')}\n{tmp / 'colab-stub'}\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "ipykernel"], check=True)
    return python


def _wheel(tmp: Path) -> Path:
    """A wheel of this checkout, built from a copy (so no build files land in the repository)."""
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lora_nb", source / "lora_nb", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    tmp / "wheels", source], check=True)
    (wheel,) = (tmp / "wheels").glob("lora_nb-*.whl")
    return wheel


def _kernels(tmp: Path, python: Path, cap: Cap) -> Path:
    """Kernelspecs "colab" (the fresh environment's python) and "colab-capped" (the same, under `cap`)."""
    for name, argv in (("colab", [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]),
                       ("colab-capped", cap.kernel_argv(python))):
        spec = tmp / "jupyter" / "kernels" / name
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    return tmp / "jupyter"


def test_install_cell_then_notebooks_run_as_on_colab(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # Bytecode as on Colab: each module is compiled when first imported, then cached. pip's default,
    # compiling every installed file up front, made the install 82 s instead of 36 s here.
    monkeypatch.setenv("PIP_COMPILE", "false")
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    python = _colab_venv(tmp_path)
    probe = "import importlib.util as u; print(u.find_spec('lora_nb') is None, u.find_spec('torch') is not None)"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
                          cwd=tmp_path, check=True).stdout.split() == ["True", "True"]  # torch is there, the kit not

    monkeypatch.setenv("LORA_NB_SOURCE", str(_wheel(tmp_path)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(REHEARSAL_VARIABLE, "2")  # a teacher's rehearsal, as nbval runs them (notebooks/conftest.py)
    work = tmp_path / "work" / "notebooks"  # ../runs of the notebooks lands in tmp_path/work/runs
    work.mkdir(parents=True)
    with memory_cap() as cap:
        monkeypatch.setenv("JUPYTER_PATH", str(_kernels(tmp_path, python, cap)))
        for name in NOTEBOOKS:
            notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
            client = nbclient.NotebookClient(notebook, kernel_name="colab-capped" if name in CAPPED else "colab",
                                             timeout=1800, resources={"metadata": {"path": str(work)}})
            client.execute()
            if name.startswith("00"):
                _check_installed(notebook, python, tmp_path)
        peak = cap.peak()
    runs = list((tmp_path / "work" / "runs").glob("train-*/run.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["status"] == "finished"
    assert (runs[0].parent / "adapter" / "adapter_model.safetensors").exists()
    metrics = json.loads((runs[0].parent / "metrics.json").read_text())  # 04's evaluation
    assert metrics["after"]["heldout_loss"] < metrics["before"]["heldout_loss"]
    if peak is not None:
        print(f"peak memory of notebooks 03 and 04 in their cgroup: {peak / 1e9:.2f} GB")
        assert peak <= CAP


def _check_installed(notebook, python: Path, tmp_path: Path) -> None:
    """Notebook 00's install cell installed the kit from LORA_NB_SOURCE into the fresh environment."""
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "installed from " + str(os.environ["LORA_NB_SOURCE"]) in outputs
    installed = subprocess.run([python, "-c", "import lora_nb; print(lora_nb.__file__)"], check=True,
                               capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd=tmp_path)
    assert "colab-venv" in installed.stdout  # the wheel, installed by the cell, not the checkout
