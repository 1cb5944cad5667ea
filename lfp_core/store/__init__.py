"""The run store: one DuckDB file per run plus a folder for weight files.

This package owns the schema and is the only code that writes SQL. Precompute writes through a
:class:`RunWriter` (every stage's write is one transaction, so a crash leaves no half-written
table); the dashboard and reports read through a :class:`RunReader` opened read-only, whose
methods are one typed query each.

Layout of a run directory::

    RUN_DIR/run.duckdb      the tables declared in the domain modules below
    RUN_DIR/artifacts/      weight files (tuned policies, SAEs), written via temp file + rename

Writers hold the database only while they write (DuckDB lets one process write *or* many read),
so a dashboard can read a run between the writes of a precompute that is still going.

Modules:
    schema       the table registry (each table declared once), schema creation, upgrade and checks,
                 :class:`Where` row filters
    summaries    typed stage summaries (what each stage records in the ``stages`` table); stats: the
                 statistic bundles inside them
    runs         run config, stage records, chunk markers, models
    texts        prompts, completions, RL log, HH pairs, word shifts, layer divergence
    features     activation corpus, vocabulary, SAEs, feature statistics and examples
    probes       probe results, feature labels, the LLM cache
    ablation     the ablation experiment, preference-model pairs, attribution
    diffing      crosscoders, difference SAEs and their latents, component patching, the difference lens,
                 the causal checks of tuned-only latents
    reader       :class:`RunReader`      writer   :class:`RunWriter` and the row writers
    testing      runs in unusual states and synthetic stores, for tests and benchmarks
"""

from __future__ import annotations

from lfp_core.store import ablation, diffing, features, probes, runs, texts  # noqa: F401  (the modules declare the tables)
from lfp_core.store.connection import ARTIFACTS, DB_NAME, artifacts_dir, db_path, list_runs
from lfp_core.store.errors import (
    CorruptStoreError,
    RunNotFoundError,
    SchemaVersionError,
    StoreBusyError,
    StoreError,
    SummaryError,
)
from lfp_core.store.features import FEATURE_SORTS
from lfp_core.store.reader import RunReader
from lfp_core.store.runs import StageRecord, done_summary
from lfp_core.store.schema import SCHEMA_VERSION, TABLES, Not, Table, Where
from lfp_core.store.summaries import StageSummary, parse_summary
from lfp_core.store.writer import RunWriter, delete_rows, put_rows, replace_rows

__all__ = [
    "ARTIFACTS",
    "DB_NAME",
    "FEATURE_SORTS",
    "SCHEMA_VERSION",
    "TABLES",
    "CorruptStoreError",
    "Not",
    "RunNotFoundError",
    "RunReader",
    "RunWriter",
    "SchemaVersionError",
    "StageRecord",
    "StageSummary",
    "StoreBusyError",
    "StoreError",
    "SummaryError",
    "Table",
    "Where",
    "artifacts_dir",
    "db_path",
    "delete_rows",
    "done_summary",
    "list_runs",
    "parse_summary",
    "put_rows",
    "replace_rows",
]
