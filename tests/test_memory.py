"""Binder's memory: the demo runs under a 2 GB cap.

mybinder.org gives a session 1-2 GB. The demo command runs here inside a memory cgroup capped at
2 GB (cgroup v2 or v1, where this process may create one, as root in a container); elsewhere under
an address-space limit of the same size (``RLIMIT_AS``, what ``prlimit --as`` / ``ulimit -v`` set),
which counts reserved-but-unused memory too, so it is the stricter of the two. The run must finish
and write its metrics; the cgroup's peak usage is checked as well where it is known.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CAP = 2_000_000_000  # bytes: the top of what Binder gives

pytestmark = pytest.mark.slow


def _new_cgroup() -> Path | None:
    """A fresh memory cgroup with the cap, or None where this process cannot make one."""
    name = f"lora-nb-test-{uuid.uuid4().hex[:8]}"
    for parent, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"),
                               (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if not (parent / "cgroup.procs").exists() or not os.access(parent, os.W_OK):
            continue
        group = parent / name
        try:
            group.mkdir()
            (group / limit_file).write_text(str(CAP))
            if (group / "memory.swap.max").exists():  # v2: no swapping out of the cap
                (group / "memory.swap.max").write_text("0")
            return group
        except OSError:
            if group.exists():
                group.rmdir()
    return None


def _peak(group: Path) -> int | None:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        if (group / name).exists():
            return int((group / name).read_text().split()[0])
    return None


@pytest.fixture
def capped():
    """`(enter_cap, group)`: a function that puts the calling process under the cap (for `preexec_fn`), and
    the cgroup (None where an address-space limit stands in for it); the cgroup is removed afterwards."""
    group = _new_cgroup()

    def enter_cap() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    yield enter_cap, group
    if group is not None:
        group.rmdir()


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def test_demo_runs_within_2gb(tmp_path, capped):
    enter_cap, group = capped
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lora_nb", "run", "--out", str(out), "--limit", "8"],
                          env=_env(), cwd=tmp_path, preexec_fn=enter_cap, capture_output=True, text=True,
                          timeout=1800)
    peak = _peak(group) if group is not None else None
    assert done.returncode == 0, f"killed or failed under a {CAP / 1e9:g} GB cap:\n{done.stderr[-3000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["heldout_loss"] < metrics["before"]["heldout_loss"]
    if peak is not None:
        assert peak <= CAP
        print(f"peak memory of the demo in its cgroup: {peak / 1e9:.2f} GB")


def test_the_cap_is_seen_from_inside(capped):
    """The probe reads the process's own cgroup (not the container's root), so training knows it is small."""
    enter_cap, group = capped
    if group is None:
        pytest.skip("no cgroup could be made here (not root): nothing for the probe to read")
    code = "from lora_nb.host_memory import small_session; from lora_nb.probes import memory_limit; " \
           "print(*memory_limit(), small_session(), sep='|')"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), preexec_fn=enter_cap, capture_output=True,
                          text=True, timeout=600, check=True)
    limit, source, small = done.stdout.strip().splitlines()[-1].split("|")
    assert abs(int(limit) - CAP) < 1 << 16 and source == "cgroup limit" and small == "True"  # v1 rounds to pages


def test_notebooks_03_and_04_run_within_2gb(tmp_path, capped):
    """Notebooks 03 (train: the demo model, demo-cpu's 12 steps) and 04 (evaluate) top to bottom, each in its
    own kernel, under the cap."""
    enter_cap, group = capped
    (tmp_path / "notebooks").mkdir()
    code = ("import sys, nbformat, nbclient\n"
            "for path in sys.argv[2:]:\n"
            "    nb = nbformat.read(path, as_version=4)\n"
            "    nbclient.NotebookClient(nb, timeout=1800, kernel_name='python3', "
            "resources={'metadata': {'path': sys.argv[1]}}).execute()\n")
    notebooks = [str(REPO / "notebooks" / name) for name in ("03_train.ipynb", "04_evaluate.ipynb")]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "notebooks"), *notebooks], env=_env(),
                          preexec_fn=enter_cap, capture_output=True, text=True, timeout=3000)
    peak = _peak(group) if group is not None else None
    assert done.returncode == 0, f"a notebook failed or its kernel died under a {CAP / 1e9:g} GB cap:\n{done.stderr[-3000:]}"
    runs = list((tmp_path / "runs").glob("train-*/run.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["status"] == "finished"
    metrics = json.loads((runs[0].parent / "metrics.json").read_text())  # 04's evaluation
    assert metrics["after"]["heldout_loss"] < metrics["before"]["heldout_loss"]
    if peak is not None:
        assert peak <= CAP
        print(f"peak memory of notebooks 03 and 04 in their cgroup: {peak / 1e9:.2f} GB")
