"""The run store's errors: what is wrong with a run the user named, and what to do about it."""

from __future__ import annotations

from lfp_core.errors import BadInputError, LFPError


class StoreError(BadInputError, RuntimeError):
    """Base class of run-store errors: the run the user named is missing, foreign, damaged, of another
    schema or busy (bad input); messages say what is wrong and what to do. Also a RuntimeError, as before."""


class RunNotFoundError(StoreError):
    pass


class SchemaVersionError(StoreError):
    pass


class CorruptStoreError(StoreError):
    pass


class StoreBusyError(StoreError):
    pass


class SummaryError(LFPError, TypeError):
    """A stage's summary does not fit its record type (:mod:`lfp_core.store.summaries`): a key that is
    not a field, or a value of the wrong shape. A bug in the stage, not bad input."""
