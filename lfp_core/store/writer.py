"""Write access for precompute: :class:`RunWriter` (one transaction per write) and the typed row writers
stages call inside a transaction (:func:`put_rows`, :func:`replace_rows`, :func:`delete_rows`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from lfp_core.store import schema
from lfp_core.store.connection import artifacts_dir, connect, db_path, now, writer_wait_s
from lfp_core.store.errors import StoreError
from lfp_core.store.reader import RunReader
from lfp_core.store.schema import Where
from lfp_core.store.summaries import StageSummary, parse_summary, summary_dict

KILL_ENV = "LFP_KILL_AT_COMMIT"  # fault injection for the resume tests: STAGE:N[:before]
TRACE_ENV = "LFP_COMMIT_TRACE"  # a file that gets one line per committed transaction: the running stage


class _Faults:
    """The resume tests' fault hook (off unless ``$LFP_KILL_AT_COMMIT`` is set): SIGKILL this process at the
    N-th transaction of a stage, just before its COMMIT (``:before``: the write is lost) or just after it;
    ``$LFP_COMMIT_TRACE`` logs the stage of every commit, so a test can see how many a stage makes."""

    def __init__(self) -> None:
        spec = os.environ.get(KILL_ENV, "")
        parts = spec.split(":") if spec else []
        self.stage = parts[0] if parts else None
        self.at = parts[1] if len(parts) > 1 else ""  # N (the N-th write of the stage), final, or @SECONDS
        self.before = len(parts) > 2 and parts[2] == "before"
        self.trace = os.environ.get(TRACE_ENV) or None
        self.count: dict[str, int] = {}

    def stage_started(self, stage: str | None) -> None:
        if stage is not None and stage == self.stage and self.at.startswith("@"):
            timer = threading.Timer(float(self.at[1:]), os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def at_commit(self, stage: str | None, committed: bool, final: bool) -> None:
        if stage is None:
            return
        if not committed:
            self.count[stage] = self.count.get(stage, 0) + 1
            if self.trace:
                with open(self.trace, "a") as f:
                    f.write(f"{stage}{' final' if final else ''}\n")
        if stage != self.stage or committed == self.before:
            return
        if (self.at == "final" and final) or self.at == str(self.count.get(stage)):
            os.kill(os.getpid(), signal.SIGKILL)


class RunWriter:
    """Write access for precompute. Creates the run on first use; one transaction per write."""

    def __init__(self, run_dir: str | Path, name: str | None = None):
        self._stage: str | None = None
        self._final = False  # this transaction marks a stage done
        self._faults = _Faults()
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise StoreError(f"--out {self.run_dir} is a file; give a directory for the run")
        self.path = db_path(self.run_dir)
        self.name = name or self.run_dir.name
        existed = self.path.exists()
        if existed:  # refuse a damaged or foreign file on a read-only connection, before any write touches it
            ro = connect(self.path, read_only=True)
            try:
                schema.verify(ro, self.path)
            finally:
                ro.close()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            artifacts_dir(self.run_dir).mkdir(exist_ok=True)
        except OSError as exc:  # a parent that is a file, a read-only file system, no permission
            raise StoreError(f"cannot create the run directory {self.run_dir}: {exc.strerror or exc}") from exc
        with self.transaction() as con:
            if existed:
                schema.check(con, self.path, writer=True)  # an older run is upgraded; missing tables created
            else:
                schema.create(con)
                con.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?), ('created_by', 'lfp_core')",
                    [str(schema.SCHEMA_VERSION)],
                )

    @property
    def stage(self) -> str | None:
        """The stage running now (set by the precompute's runner; the resume tests' fault hook reads it)."""
        return self._stage

    @stage.setter
    def stage(self, name: str | None) -> None:
        self._stage = name
        self._faults.stage_started(name)

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN/COMMIT; any exception rolls the whole write back. Write through the
        row writers of this module (``put_rows(con, ...)``). ``write=False``: a bookkeeping read."""
        con = connect(self.path, read_only=False, wait_s=writer_wait_s())
        self._final = False
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            if write:
                self._faults.at_commit(self._stage, committed=False, final=self._final)
            con.execute("COMMIT")
            if write:
                self._faults.at_commit(self._stage, committed=True, final=self._final)
        finally:
            con.close()

    def reader(self) -> RunReader:
        return RunReader(self.run_dir)

    # --- run and stage bookkeeping -------------------------------------------------------
    def set_config(self, preset: str, config_json: str) -> None:
        with self.transaction() as con:
            con.execute("DELETE FROM run")
            created = con.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()
            if not created:
                con.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", [str(now())])
                created = (str(now()),)
            con.execute(
                "INSERT INTO run (name, preset, config_json, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                [self.name, preset, config_json, created[0], now()],
            )

    def stage_record(self, name: str) -> tuple[str | None, str | None]:
        """(status, config_hash) of a stage, or (None, None) when it never ran."""
        with self.transaction(write=False) as con:
            row = con.execute("SELECT status, config_hash FROM stages WHERE name = ?", [name]).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def mark_stage(
        self,
        name: str,
        position: int,
        config_hash: str,
        status: str,
        seconds: float | None = None,
        detail: Mapping[str, Any] | StageSummary | None = None,
        error: str | None = None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> None:
        """Upsert a stage's status; pass ``con`` to make it part of a larger transaction.

        ``detail`` is the stage's summary (:mod:`lfp_core.store.summaries`): a dict of its fields (stored
        as given) or the summary itself. A key that is not a field raises
        :class:`~lfp_core.store.errors.SummaryError` naming the stage and the key, so nothing is marked.
        """
        parse_summary(name, detail, strict=True)
        stored = summary_dict(detail) if isinstance(detail, StageSummary) else dict(detail or {})
        sql = (
            "INSERT OR REPLACE INTO stages (name, position, config_hash, status, started_at, finished_at, "
            "seconds, detail_json, error) VALUES (?, ?, ?, ?, "
            "COALESCE((SELECT started_at FROM stages WHERE name = ?), ?), ?, ?, ?, ?)"
        )
        finished = now() if status in ("done", "failed") else None
        started = now()
        args = [name, position, config_hash, status, name, started, finished, seconds, json.dumps(stored), error]
        if con is not None:
            con.execute(sql, args)
            self._final = self._final or status == "done"
        else:
            with self.transaction() as c:
                if status == "running":
                    c.execute("DELETE FROM stages WHERE name = ?", [name])
                c.execute(sql, args)

    def done_chunks(self, stage: str, config_hash: str) -> set[int]:
        with self.transaction(write=False) as con:
            rows = con.execute(
                "SELECT chunk FROM stage_chunks WHERE stage = ? AND config_hash = ?", [stage, config_hash]
            ).fetchall()
        return {r[0] for r in rows}

    def clear_stage(self, stage: str, tables: Mapping[str, Where]) -> None:
        """Delete a stage's rows (``{table: Where(...)}``) and its chunk markers, atomically."""
        with self.transaction() as con:
            for table, where in tables.items():
                delete_rows(con, table, where)
            con.execute("DELETE FROM stage_chunks WHERE stage = ?", [stage])

    def put_llm_cache(self, key: str, model: str, prompt: str, response: str) -> None:
        """Commit one LLM answer at once (an interrupted labelling run loses none of them)."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO llm_cache (key, model, prompt, response, created_at) VALUES (?, ?, ?, ?, ?)",
                [key, model, prompt, response, now()],
            )

    # --- typed row writers (call inside a transaction) --------------------------------------
    @staticmethod
    def add_chunk_marker(con: duckdb.DuckDBPyConnection, stage: str, config_hash: str, chunk: int) -> None:
        con.execute(
            "INSERT INTO stage_chunks (stage, config_hash, chunk) VALUES (?, ?, ?)", [stage, config_hash, chunk]
        )

    @staticmethod
    def put_model(con: duckdb.DuckDBPyConnection, role: str, info: dict) -> None:
        """The model loaded as ``role`` (replacing an earlier record)."""
        delete_rows(con, "models", Where(role=role))
        put_rows(
            con,
            "models",
            [
                {
                    "role": role,
                    **{
                        k: info[k]
                        for k in (
                            "name",
                            "source",
                            "location",
                            "architecture",
                            "n_params",
                            "n_layers",
                            "d_model",
                            "vocab_size",
                        )
                    },
                }
            ],
        )

    @staticmethod
    def put_prompts(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
        put_rows(con, "prompts", rows)

    @staticmethod
    def put_completions(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
        put_rows(con, "completions", rows)

    @staticmethod
    def put_saes(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
        """SAE records, replacing stored ones of the same sae_id (a retrained SAE)."""
        replace_rows(con, "saes", rows)

    @staticmethod
    def delete_rows(con: duckdb.DuckDBPyConnection, table: str, where: Where) -> None:
        delete_rows(con, table, where)


def _frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    return rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)


def put_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict] | pd.DataFrame) -> None:
    """Insert rows (dicts with the table's column names, or a DataFrame) inside a transaction."""
    t = schema.get(table)
    df = _frame(rows)
    if df.empty:
        return
    t.check_columns(df.columns)
    con.register("_frame_in", df)  # (left registered if the insert fails: the transaction is rolled back)
    con.execute(f"INSERT INTO {t.name} ({', '.join(df.columns)}) SELECT {', '.join(df.columns)} FROM _frame_in")
    con.unregister("_frame_in")


def replace_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict] | pd.DataFrame) -> None:
    """Insert rows, first deleting stored rows with the same primary key."""
    t = schema.get(table)
    if not t.key:
        raise ValueError(f"table {t.name} has no primary key to replace rows by")
    df = _frame(rows)
    if df.empty:
        return
    t.check_columns(df.columns)
    con.register("_keys_in", df[list(t.key)])
    match = " AND ".join(f"{t.name}.{k} = k.{k}" for k in t.key)
    con.execute(f"DELETE FROM {t.name} USING _keys_in k WHERE {match}")
    con.unregister("_keys_in")
    put_rows(con, table, df)


def delete_rows(con: duckdb.DuckDBPyConnection, table: str, where: Where) -> None:
    """Delete the rows of ``table`` that ``where`` selects (``Where()``: every row)."""
    if not isinstance(where, Where):
        raise TypeError(f"rows of {table} are selected with lfp_core.store.Where(...), not {where!r}")
    t = schema.get(table)
    clause, params = where.sql(t)
    con.execute(f"DELETE FROM {t.name} WHERE {clause}", params)
