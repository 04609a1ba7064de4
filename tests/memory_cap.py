"""A 2 GB memory cap for the tests that run the demo or notebooks as a Binder session would.

mybinder.org gives a session 1-2 GB. Where this process may create a memory cgroup (cgroup v2 or
v1, as root in a container), the cap is a fresh cgroup; elsewhere an address-space limit of the same
size (``RLIMIT_AS``, what ``prlimit --as`` / ``ulimit -v`` set), which counts reserved-but-unused
memory too, so it is the stricter of the two. Processes enter the cap themselves (`Cap.enter`, for
``preexec_fn``, or `Cap.kernel_argv` for a Jupyter kernel); their children inherit it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

CAP = 2_000_000_000  # bytes: the top of what Binder gives

# Run as `python -c ENTER GROUP_OR_EMPTY CAP -m ipykernel_launcher ...`: enter the cap, then become the kernel.
ENTER = ("import os, resource, sys\n"
         "group, cap = sys.argv[1], int(sys.argv[2])\n"
         "if group:\n"
         "    with open(os.path.join(group, 'cgroup.procs'), 'w') as procs:\n"
         "        procs.write(str(os.getpid()))\n"
         "else:\n"
         "    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
         "os.execv(sys.executable, [sys.executable, *sys.argv[3:]])\n")


class Cap:
    """The cap: a cgroup (`group`) or, where none can be made (`group` is None), an address-space limit."""

    def __init__(self, group: Path | None, limit: int = CAP):
        self.group = group
        self.limit = limit

    def enter(self) -> None:
        """Put the calling process under the cap (use as `subprocess.run(..., preexec_fn=cap.enter)`)."""
        if self.group is not None:
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))

    def kernel_argv(self, python: str | Path = sys.executable) -> list[str]:
        """A kernelspec's argv that starts an ipykernel under the cap."""
        return [str(python), "-c", ENTER, str(self.group or ""), str(self.limit),
                "-m", "ipykernel_launcher", "-f", "{connection_file}"]

    def peak(self) -> int | None:
        """The cgroup's peak usage in bytes (None without a cgroup or where the kernel does not keep it)."""
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            if self.group is not None and (self.group / name).exists():
                return int((self.group / name).read_text().split()[0])
        return None


def _new_cgroup(limit: int) -> Path | None:
    """A fresh memory cgroup with the cap, or None where this process cannot make one."""
    name = f"lora-nb-test-{uuid.uuid4().hex[:8]}"
    for parent, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"),
                               (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if not (parent / "cgroup.procs").exists() or not os.access(parent, os.W_OK):
            continue
        group = parent / name
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit))
            if (group / "memory.swap.max").exists():  # v2: no swapping out of the cap
                (group / "memory.swap.max").write_text("0")
            return group
        except OSError:
            if group.exists():
                group.rmdir()
    return None


@contextlib.contextmanager
def memory_cap(limit: int = CAP) -> Iterator[Cap]:
    """A fresh cap for the block; its cgroup (if any) is removed afterwards."""
    cap = Cap(_new_cgroup(limit), limit)
    try:
        yield cap
    finally:
        if cap.group is not None:
            _remove(cap.group)


def _remove(group: Path, seconds: float = 30) -> None:
    """Remove the cgroup once the processes in it have exited (a kernel may take a moment to go)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
