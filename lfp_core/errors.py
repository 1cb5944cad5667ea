"""The project's exception root.

Every error the tool raises on purpose derives from :class:`LFPError`. Entry points (the CLI,
the report, the dashboard) map them to what a user sees:

- :class:`BadInputError` — the user's input is wrong (a path, a setting, a damaged file, an
  out-of-range id): a one-line message and exit status 2; nothing is computed or written.
- any other exception inside a stage — a failure: the traceback goes to the log, the stage is
  marked failed in the store, exit status 1.

This module imports nothing heavy (no torch), so light modules can raise these errors.
"""

from __future__ import annotations


class LFPError(Exception):
    """Root of the errors LFP Explorer raises on purpose."""


class BadInputError(LFPError, ValueError):
    """The user's input is wrong; the message says what and how to fix it (exit status 2).

    Also a ValueError, so code written against the older ``except ValueError`` keeps working.
    """


class ConfigError(BadInputError):
    """An impossible or unknown setting (``--set``, a preset, a stored config)."""


class MissingInputError(BadInputError, FileNotFoundError):
    """A file or folder the user named, or that the run needs from an earlier stage, is missing.

    Also a FileNotFoundError, so the stages that fall back when a data set is absent still catch it.
    """


class StageFailure(LFPError):
    """A stage failed for a reason other than bad input (exit status 1); wraps the cause."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage} failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause
