"""The kit's own exceptions: each message says what was wrong, what is allowed and what to do."""

from __future__ import annotations


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


class ExportError(LoraNbError, ValueError):
    """A model cannot be exported (unsupported architecture, tokenizer or type) or the export cannot be written."""
