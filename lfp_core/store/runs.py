"""Runs and stages: the run's config, the stage records with their typed summaries, chunk markers and the
models a run loaded."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd

from lfp_core.store.connection import Queries
from lfp_core.store.schema import table
from lfp_core.store.summaries import StageSummary, parse_summary

D = "runs"
META = table("meta", D, "key VARCHAR, value VARCHAR NOT NULL", ("key",))
RUN = table(
    "run",
    D,
    "name VARCHAR NOT NULL, preset VARCHAR, config_json VARCHAR NOT NULL, "
    "created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL",
)
STAGES = table(
    "stages",
    D,
    "name VARCHAR, position INTEGER, config_hash VARCHAR, status VARCHAR NOT NULL, "
    "started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE, detail_json VARCHAR, "
    "error VARCHAR",
    ("name",),
)
STAGE_CHUNKS = table(
    "stage_chunks",
    D,
    "stage VARCHAR NOT NULL, config_hash VARCHAR NOT NULL, chunk INTEGER NOT NULL",
    ("stage", "chunk"),
)
MODELS = table(
    "models",
    D,
    "role VARCHAR, name VARCHAR, source VARCHAR, location VARCHAR, architecture VARCHAR, "
    "n_params BIGINT, n_layers INTEGER, d_model INTEGER, vocab_size INTEGER",
    ("role",),
)

S = TypeVar("S", bound=StageSummary)


@dataclass
class StageRecord:
    """A stage as the run recorded it; ``summary`` is its typed summary (None for a stage this version
    does not know)."""

    name: str
    position: int | None
    config_hash: str | None
    status: str
    seconds: float | None
    summary: StageSummary | None
    error: str | None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"


def _time(x: Any) -> dt.datetime | None:
    return None if x is None or pd.isna(x) else pd.Timestamp(x).to_pydatetime()


class RunQueries(Queries):
    def schema_version(self) -> int | None:
        df = self._query("SELECT value FROM meta WHERE key = 'schema_version'")
        return None if df.empty else int(df.value.iloc[0])

    def run_info(self) -> dict:
        df = self._query("SELECT name, preset, config_json, created_at, updated_at FROM run")
        if df.empty:
            return {}
        row = df.iloc[0]
        return {
            "name": row["name"],
            "preset": row["preset"],
            "config": json.loads(row["config_json"]),
            "created_at": str(row["created_at"]),
            "updated_at": str(row["updated_at"]),
        }

    def stages(self) -> list[StageRecord]:
        """Every recorded stage, in pipeline order."""
        df = self._query(
            "SELECT name, position, config_hash, status, seconds, detail_json, error, started_at, "
            "finished_at FROM stages ORDER BY position, name"
        )
        return [
            StageRecord(
                r.name,
                None if pd.isna(r.position) else int(r.position),
                r.config_hash,
                r.status,
                None if pd.isna(r.seconds) else float(r.seconds),
                parse_summary(r.name, json.loads(r.detail_json) if r.detail_json else {}, strict=False),
                r.error,
                _time(r.started_at),
                _time(r.finished_at),
            )
            for r in df.itertuples()
        ]

    def summary(self, kind: type[S]) -> S | None:
        """The summary of the stage ``kind`` describes (``RunReader.summary(ProbesSummary)``), or None
        unless that stage is done."""
        return done_summary(self.stages(), kind)

    def model_info(self, role: str = "base") -> dict | None:
        df = self._query("SELECT * FROM models WHERE role = ?", [role])
        return None if df.empty else {k: (v.item() if hasattr(v, "item") else v) for k, v in df.iloc[0].items()}

    def done_chunks(self, stage: str, config_hash: str | None = None) -> set[int]:
        """Chunks of ``stage`` committed so far (of any config hash when ``config_hash`` is None)."""
        df = self._query(
            "SELECT chunk FROM stage_chunks WHERE stage = ? AND (CAST(? AS VARCHAR) IS NULL OR config_hash = ?)",
            [stage, config_hash, config_hash],
        )
        return {int(c) for c in df.chunk}


def done_summary(records: list[StageRecord], kind: type[S]) -> S | None:
    """The summary of ``kind``'s stage among ``records``, or None unless that stage is done."""
    rec = next((r for r in records if r.name == kind.STAGE), None)
    if rec is None or rec.status != "done" or not isinstance(rec.summary, kind):
        return None
    return rec.summary
