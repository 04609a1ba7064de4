"""Arguments: what comes in through the front doors, checked before any long work.

The command line (``python -m lora_nb run``), :func:`lora_nb.pipeline.run_pipeline` and the
evaluation functions the notebooks call all pass their paths and counts through here first, so a
mistake costs a second, not a model load and a training run:

- a path given as an empty string (``--data "$DATA"`` with ``DATA`` unset) is refused, never read
  as "use the default";
- a run folder that is a file is refused;
- generation counts (``max_new_tokens``, ``limit``) are checked as settings are
  (:class:`lora_nb.settings.GenerationSettings`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ArgumentError, SettingsError, quote
from .settings import GenerationSettings

# What each path argument is, for the messages, and what leaving it out means.
PATH_ARGUMENTS = {
    "config": ("settings file", "leave it out to use a preset"),
    "preset": ("preset name", "leave it out for the 'demo-cpu' preset"),
    "model": ("base model (hub ID or folder)", "leave it out for the settings' model"),
    "data": ("training data file", "leave it out for the demo data"),
    "heldout": ("held-out data file", "leave it out for the demo held-out data"),
    "out": ("run folder", "leave it out for a new folder under runs/"),
}


def path_problems(**paths: Any) -> list[str]:
    """Problems of path-like arguments: empty strings (an unset shell variable), NUL characters.

    Args:
        **paths: Argument name (a key of :data:`PATH_ARGUMENTS`) to value; None means "not given".

    Returns:
        One sentence per problem.
    """
    found = []
    for name, value in paths.items():
        if value is None:
            continue
        what, default = PATH_ARGUMENTS.get(name, ("path", "leave it out"))
        if not isinstance(value, (str, os.PathLike)):
            found.append(f"{name} must be a {what} as text or a path, got {type(value).__name__} {quote(value, 60)}")
        elif not str(value).strip():
            found.append(f"{name} is empty (an unset shell variable?): give a {what}, or {default}")
        elif "\0" in str(value):
            found.append(f"{name} {quote(str(value), 60)} holds a NUL character: give a {what}")
        elif name in ("config", "data", "heldout") and _missing_local_file(value):
            found.append(f"{name} {quote(str(value), 200)}: no such file (a relative path starts at {os.getcwd()}); "
                         f"check the path, or {default}")
    return found


def _missing_local_file(value: str | os.PathLike) -> bool:
    """A path that names a local file (a data/settings suffix, or starting with . / ~) that is not there.

    Other text may be a hub data set ID, which the data reader resolves.
    """
    text = str(value)
    local = isinstance(value, os.PathLike) or Path(text).suffix.lower() in (".jsonl", ".json", ".csv", ".yaml", ".yml") \
        or text.startswith((".", "/", "~"))
    try:
        return local and len(text) <= 4096 and not Path(text).expanduser().exists()
    except OSError:
        return False


def out_dir_problems(out: Any) -> list[str]:
    """Problems of a run folder argument: a file where the folder should be, or inside a file."""
    if out is None or path_problems(out=out):
        return []
    path = Path(out).expanduser()
    for part in (path, *path.parents):
        try:
            if part.exists() and not part.is_dir():
                inside = "" if part == path else f" inside the file {part}"
                return [f"out {quote(str(out), 200)} is a file{' path' if inside else ''}{inside}, not a folder: "
                        "give a new folder, or a run folder to resume"]
        except OSError as err:
            return [f"out {quote(str(out), 200)} cannot be used as a folder ({err.strerror or err}): give another folder"]
    return []


def generation_problems(max_new_tokens: Any = 40, limit: Any = None) -> list[str]:
    """Problems of the evaluation's generation counts (ranges from :class:`GenerationSettings`)."""
    return GenerationSettings(max_new_tokens=max_new_tokens, limit=limit).problems()


def check_run_arguments(*, max_new_tokens: Any = 40, limit: Any = None, out: Any = None, **paths: Any) -> None:
    """Checks a run's arguments at once, before anything is loaded or trained.

    Args:
        max_new_tokens: Longest generated answer.
        limit: Held-out examples to evaluate, or None for all.
        out: The run folder.
        **paths: The other path arguments (``config``, ``preset``, ``model``, ``data``, ``heldout``).

    Raises:
        ArgumentError: Listing every problem, each with what to do.
    """
    found = path_problems(out=out, **paths) + out_dir_problems(out) + generation_problems(max_new_tokens, limit)
    if found:
        raise ArgumentError(found[0] if len(found) == 1 else
                            f"{len(found)} problems in the arguments:\n" + "\n".join(f"- {p}" for p in found))


def check_generation(max_new_tokens: Any = 40, limit: Any = None) -> None:
    """Checks generation counts (for the evaluation functions the notebooks call).

    Raises:
        SettingsError: e.g. ``"max_new_tokens must be an integer between 1 and 8192, got 0 (default 40)"``.
    """
    found = generation_problems(max_new_tokens, limit)
    if found:
        raise SettingsError(found)
