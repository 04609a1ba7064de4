"""Every entry point gets the kit's thread choice: set before torch loads OpenMP, reported, user values kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = ("import json, os, sys; {first}import lora_nb, torch; from lora_nb.threads import usable_cores; "
         "print(json.dumps({{'report': lora_nb.thread_report(), 'threads': torch.get_num_threads(), "
         "'interop': torch.get_num_interop_threads(), 'cores': usable_cores(), "
         "'env': {{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'TOKENIZERS_PARALLELISM')}}}}))")


def _probe(first: str = "", **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "TOKENIZERS_PARALLELISM",
                          "LORA_NB_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env={**clean, **env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_sets_passive_wait_and_one_thread_per_core_before_torch():
    got = _probe(GOMP_SPINCOUNT="1000")
    assert got["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "TOKENIZERS_PARALLELISM": "false"}
    assert got["threads"] == got["cores"] and got["interop"] == 1
    assert "OMP_WAIT_POLICY=PASSIVE (kit)" in got["report"] and "data loader workers 0" in got["report"]
    assert "too late" not in got["report"] and "could not take effect" not in got["report"]


def test_torch_first_is_reported_and_off_leaves_everything():
    late = _probe(first="import torch; ")
    assert "could not take effect" in late["report"]
    off = _probe(LORA_NB_THREADS="off")
    assert off["env"]["OMP_WAIT_POLICY"] is None and "left as they are" in off["report"]
