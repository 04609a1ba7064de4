"""Files: write so that nothing the user already had is lost.

Every settings file, run file and report the kit writes goes through `write_text_atomic`: a
temporary file beside the target, flushed to disk, then renamed over it. A reader sees the old
content or the new, never half of it; a failed write (disk full, read-only folder) leaves the old
file as it was and no temporary file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from .errors import LoraNbError, RunFolderError


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cannot_write(path: Path, err: OSError, error: type[LoraNbError] = RunFolderError) -> LoraNbError:
    """The kit's error for a failed write: what, why, and what to do.

    Args:
        path: The file or folder that could not be written.
        err: The operating system's error.
        error: The kit's exception type to return.

    Returns:
        The error (to raise `from err`).
    """
    reason = err.strerror or str(err)
    return error(
        f"Cannot write {path}: {reason}. Nothing was overwritten (the previous {path.name}, if any, is "
        "unchanged). Free some disk space or choose a writable folder, then try again."
    )


def write_text_atomic(path: Path, text: str, error: type[LoraNbError] = RunFolderError) -> None:
    """Write a text file so that readers see the old or the new content, never half of it.

    Args:
        path: The file to write.
        text: Its new content.
        error: The kit's exception type to raise on failure (a run file, a settings file, ...).

    Raises:
        LoraNbError: of type `error`, when the file cannot be written (disk full, read-only
            folder); the previous file is left as it was and no temporary file stays behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, LoraNbError):
            raise
        raise cannot_write(path, err, error) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_folder_atomic(target: Path, write: Callable[[Path], None], error: type[LoraNbError] = RunFolderError) -> Path:
    """Fill a folder so that readers see the old folder or the new one, never a mix.

    `write(staging)` fills a hidden folder beside `target`; it is then swapped in, and a folder
    already at `target` is removed only once the new one is in place.

    Args:
        target: The folder to fill (replaced when it exists).
        write: Fills the staging folder it is given.
        error: The kit's exception type to raise on failure.

    Returns:
        `target`.

    Raises:
        LoraNbError: of type `error`, when writing fails (disk full, read-only folder); a folder
            already in `target` is left as it was and no staging folder stays behind.
    """
    target = Path(target)
    staging = None
    old = target.with_name(f".{target.name}.old")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes 0700 folders
        write(staging)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as err:
        if isinstance(err, LoraNbError):
            raise
        raise cannot_write(target, err, error) from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def damaged_weights(path: Path) -> str | None:
    """Why a weight, optimizer or RNG file is damaged (cut short, emptied), or None when it looks whole.

    Reads only the safetensors header or the zip directory at the end of a `torch.save` file: no
    tensor is loaded, so checking a checkpoint costs milliseconds.

    Args:
        path: A `.safetensors`, `.pt`, `.pth` or `.bin` file (other files are not checked: None).

    Returns:
        A phrase that completes "<file name> ...", e.g. "is cut short: 1,204 of 8,392 bytes".
    """
    path = Path(path)
    if path.suffix not in _WEIGHT_SUFFIXES or not path.is_file():
        return None
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            return _damaged_safetensors(f, head, size)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return f"is cut short: its zip directory is missing ({size:,} bytes; torch.save files end with it)"
    return None


def _damaged_safetensors(f, head: bytes, size: int) -> str | None:
    if len(head) < 8:
        return f"is cut short: {size} bytes, less than a safetensors header"
    header_size = int.from_bytes(head, "little")
    if header_size > size - 8:
        return f"is cut short: {size:,} bytes, but its header alone needs {header_size + 8:,}"
    try:
        header = json.loads(f.read(header_size))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "has a damaged safetensors header"
    expected = 8 + header_size + end
    if size < expected:
        return f"is cut short: {size:,} of {expected:,} bytes"
    return None
