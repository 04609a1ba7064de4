"""nbval runs the notebooks here as a teacher's rehearsal: training cut to 2 steps, one after another.

`LORA_NB_REHEARSAL_STEPS` (see `lora_nb.pipeline.rehearsal_steps`) is set while a notebook's cells
run, so the kernel nbval starts for the notebook inherits it; tests outside this folder never see it.
The demo's full 12 steps, and the before/after margins they reach, are tested once, by
`tests/test_memory.py`.

The notebooks hand work on (02 saves the settings 03 trains with, 04-06 use 03's run), so when the
suite runs in parallel (pytest-xdist, `--dist loadgroup`) all their cells go to one worker, in order.
"""

from __future__ import annotations

import os

import pytest

from lora_nb.pipeline import REHEARSAL_VARIABLE

STEPS = "2"
_set_here = False  # whether this file set the variable (a rehearsal the user asked for is left as it is)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """All notebook cells in one xdist group (one worker, collection order); before xdist reads the groups."""
    here = os.path.dirname(__file__)
    for item in items:
        if os.path.dirname(str(item.path)) == here:
            item.add_marker(pytest.mark.xdist_group("notebooks"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before nbval starts a notebook's kernel (in its first cell's setup): set the rehearsal."""
    global _set_here
    if REHEARSAL_VARIABLE not in os.environ:
        os.environ[REHEARSAL_VARIABLE] = STEPS
        _set_here = True


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last notebook cell of a run of cells: take the variable away again."""
    global _set_here
    if _set_here and (nextitem is None or nextitem.path.parent != item.path.parent):
        os.environ.pop(REHEARSAL_VARIABLE, None)
        _set_here = False
