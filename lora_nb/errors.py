"""The kit's own exceptions: each message says what was wrong, what is allowed and what to do."""

from __future__ import annotations

import reprlib


class LoraNbError(Exception):
    """Base class of every error the kit raises on purpose."""


class SettingsError(LoraNbError, ValueError):
    """One or more settings are invalid; `problems` lists each one as a sentence."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = self.problems if len(self.problems) == 1 else [f"- {p}" for p in self.problems]
        head = "" if len(self.problems) == 1 else f"{len(self.problems)} problems in the settings:\n"
        super().__init__(head + "\n".join(lines))


class ConfigFileError(LoraNbError, ValueError):
    """A settings file (YAML/JSON) cannot be read or has the wrong shape."""


class ModelLoadError(LoraNbError, OSError):
    """A model or tokenizer cannot be found or loaded."""


class QuantizationUnavailable(LoraNbError, RuntimeError):
    """The requested 4-bit/8-bit loading cannot run in this environment."""


class DataError(LoraNbError, ValueError):
    """A data set file or object is empty, malformed or missing fields."""


class RunFolderError(LoraNbError, OSError):
    """A run folder is missing, corrupt, from another model, or cannot be written."""


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, 60, 60, 40
_QUOTE.maxdict = _QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = 6


def quote(value: object, limit: int = 100) -> str:
    """A short ``repr`` of a value for a message, built without walking the whole value.

    A value read from a file can be huge (YAML aliases can make a small file expand to billions of
    items), so a message never quotes it whole: at most 6 items per container, 3 levels deep, and
    ``limit`` characters in all.
    """
    text = _QUOTE.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ArgumentError(LoraNbError, ValueError):
    """An argument of the command line or of a front-door function (a path, a count) is unusable."""


class ExportError(LoraNbError, ValueError):
    """A model cannot be exported (unsupported architecture, tokenizer or type) or the export cannot be written."""
