"""What every precompute stage shares within one invocation: the :class:`Context`.

The stages themselves are declared in :mod:`lfp_core.stages` (light, importable without torch);
each stage function is ``run(ctx, settings, config_hash)`` and reads its settings only from the
``settings`` object it is handed (the object its hash is computed from).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lfp_core.config import inference_batch
from lfp_core.models import LoadedModel, load_model
from lfp_core.settings import RunSettings
from lfp_core.store import RunWriter


@dataclass
class Context:
    """What stages share within one precompute invocation (the model is loaded once).

    ``run`` is the run-wide settings group, which every stage's settings also hold (so every
    stage's hash covers the model and device the context loads with).
    """

    run: RunSettings
    writer: RunWriter
    _model: LoadedModel | None = None
    cache: dict = field(default_factory=dict)  # other loaded objects (e.g. the tuned policy)
    finisher: Callable[[Any, dict], None] | None = None

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.run.model, device=self.run.device)
        return self._model

    def batch(self, cpu: int = 32) -> int:
        """Batch size of an inference-only pass on this run's device (see config.inference_batch)."""
        return inference_batch(self.run.device, cpu)

    def commit(self, write: Callable[[Any], None], detail: dict) -> None:
        """Write a stage's final rows and mark it done, in one transaction."""
        with self.writer.transaction() as con:
            write(con)
            assert self.finisher is not None
            self.finisher(con, detail)
