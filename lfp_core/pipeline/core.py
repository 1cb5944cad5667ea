"""The pieces every precompute stage shares: the Stage record and the per-invocation Context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lfp_core.config import RunConfig, inference_batch
from lfp_core.models import LoadedModel, load_model
from lfp_core.store import RunWriter


@dataclass
class Context:
    """What stages share within one precompute invocation (the model is loaded once)."""

    cfg: RunConfig
    writer: RunWriter
    _model: LoadedModel | None = None
    cache: dict = field(default_factory=dict)  # other loaded objects (e.g. the tuned policy)
    finisher: Callable[[Any, dict], None] | None = None

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.cfg.model, device=self.cfg.device)
        return self._model

    def batch(self, cpu: int = 32) -> int:
        """Batch size of an inference-only pass on this run's device (see config.inference_batch)."""
        return inference_batch(self.cfg.device, cpu)

    def commit(self, write: Callable[[Any], None], detail: dict) -> None:
        """Write a stage's final rows and mark it done, in one transaction."""
        with self.writer.transaction() as con:
            write(con)
            assert self.finisher is not None
            self.finisher(con, detail)


@dataclass(frozen=True)
class Stage:
    """A precompute stage.

    Attributes:
        name: stage id (also shown in the dashboard and reports).
        fields: RunConfig fields the stage reads.
        after: stages whose outputs it reads.
        run: ``run(ctx, config_hash) -> None``; must end with ``ctx.commit``.
        clears: rows the stage owns, ``{table: (where_sql, params)}``, deleted before a recompute.
        chunked: whether the stage commits chunk by chunk and resumes from the last chunk.
        fingerprint: optional extra input to the hash (e.g. the model files' identity).
        describe: one line shown for a stage that has not run yet.
        tasks: the tasks the stage belongs to (a stage may exist per task under one name).
        version: bumped when the stage's computation changes, so stored results of an older
            version are recomputed rather than reused.
    """

    name: str
    fields: tuple[str, ...]
    after: tuple[str, ...]
    run: Callable[[Context, str], None]
    clears: dict = field(default_factory=dict)
    chunked: bool = False
    fingerprint: Callable[[RunConfig], str] | None = None
    describe: str = ""
    tasks: tuple[str, ...] = ("vader", "hh")
    version: int = 1


