"""The demo command under Binder's 2 GB cap (`tests/memory_cap.py`): it finishes, and its result holds.

The demo (`python -m lora_nb run`: the demo-cpu recipe's 12 steps, before/after evaluation) runs
once, in a subprocess under the cap; the tests read its run folder. Notebooks 03 and 04 run under
the same cap in the Colab-like test (`tests/test_colab.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.memory_cap import CAP, memory_cap

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def demo_under_cap(tmp_path_factory) -> tuple[Path, int | None, subprocess.CompletedProcess]:
    """The demo command's run folder, the cgroup's peak (None where unknown) and the finished process."""
    out = tmp_path_factory.mktemp("demo") / "run"
    with memory_cap() as cap:
        done = subprocess.run([sys.executable, "-m", "lora_nb", "run", "--out", str(out), "--limit", "16"],
                              env=_env(), cwd=out.parent, preexec_fn=cap.enter, capture_output=True, text=True,
                              timeout=1800)
        return out, cap.peak(), done


def test_demo_runs_within_2gb(demo_under_cap):
    out, peak, done = demo_under_cap
    assert done.returncode == 0, f"killed or failed under a {CAP / 1e9:g} GB cap:\n{done.stderr[-3000:]}"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    if peak is not None:
        print(f"peak memory of the demo in its cgroup: {peak / 1e9:.2f} GB")
        assert peak <= CAP


def test_demo_recipe_margins(demo_under_cap):
    """The demo-cpu recipe's 12 steps teach the task: the margins the README's before/after table shows."""
    out, _, done = demo_under_cap
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert metrics["n_examples"] == 16 and json.loads((out / "run.json").read_text())["global_step"] == 12
    assert after["heldout_loss"] < 0.5 * before["heldout_loss"]
    assert before["exact_match"] <= 0.1
    assert after["exact_match"] >= 0.6 and after["exact_match"] >= before["exact_match"] + 0.4
    assert after["valid_json"] >= 0.9


def test_the_cap_is_seen_from_inside():
    """The probe reads the process's own cgroup (not the container's root), so training knows it is small."""
    code = "from lora_nb.host_memory import return_freed_memory_in_small_sessions as promptly, small_session; " \
           "from lora_nb.probes import memory_limit; print(*memory_limit(), small_session(), promptly(), sep='|')"
    with memory_cap() as cap:
        if cap.group is None:
            pytest.skip("no cgroup could be made here (not root): nothing for the probe to read")
        done = subprocess.run([sys.executable, "-c", code], env=_env(), preexec_fn=cap.enter, capture_output=True,
                              text=True, timeout=600, check=True)
    limit, source, small, promptly = done.stdout.strip().splitlines()[-1].split("|")
    assert abs(int(limit) - CAP) < 1 << 16 and source == "cgroup limit" and small == "True"  # v1 rounds to pages
    assert promptly == str(sys.platform.startswith("linux"))  # glibc's mmap threshold set (Linux/glibc only)


@pytest.mark.parametrize("limit", [None, 24_000_000_000])
def test_a_large_or_unknown_session_keeps_glibcs_threshold(monkeypatch, limit):
    """Outside small sessions the 1 MiB mmap threshold only costs time (host_memory.py): it is not set."""
    from lora_nb import host_memory

    monkeypatch.setattr(host_memory, "memory_limit", lambda: (limit, "test"))
    assert host_memory.return_freed_memory_in_small_sessions() is False
