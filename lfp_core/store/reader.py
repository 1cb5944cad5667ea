"""Read-only access to a run: :class:`RunReader`, one typed method per query (grouped by domain in the
mixins it is built from)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from lfp_core.store import schema
from lfp_core.store.ablation import AblationQueries
from lfp_core.store.connection import DB_NAME, connect, db_path
from lfp_core.store.diffing import DiffingQueries
from lfp_core.store.errors import RunNotFoundError
from lfp_core.store.features import FeatureQueries
from lfp_core.store.probes import ProbeQueries
from lfp_core.store.runs import RunQueries
from lfp_core.store.texts import TextQueries


class RunReader(RunQueries, TextQueries, FeatureQueries, ProbeQueries, AblationQueries, DiffingQueries):
    """Read-only access to a run.

    By default each query opens and closes its own connection. With ``keep_open`` (the dashboard)
    one read-only connection is reused while queries keep coming and released after ``idle_s``
    seconds without one, because DuckDB lets a file be open by one writing process *or* by
    readers: a precompute can write to the run between a user's clicks (its writer retries for a
    few seconds).
    """

    def __init__(self, run_dir: str | Path, keep_open: bool = False, idle_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.path = db_path(self.run_dir)
        self.keep_open, self.idle_s = keep_open, idle_s
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if not self.run_dir.exists():
            raise RunNotFoundError(f"run directory {self.run_dir} does not exist")
        if not self.run_dir.is_dir():
            raise RunNotFoundError(f"{self.run_dir} is a file, not a run directory")
        if not self.path.exists():
            raise RunNotFoundError(
                f"{self.run_dir} holds no {DB_NAME}; compute it with python -m lfp_core.precompute --out {self.run_dir}"
            )
        with self._connect() as con:
            schema.verify(con, self.path)  # a damaged or foreign file: one clear error now, not a traceback later
            schema.check(con, self.path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.keep_open:
            con = connect(self.path, read_only=True)
            try:
                yield con
            finally:
                con.close()
            return
        with self._lock:  # one query at a time on the shared connection; the idle timer waits for it
            if self._timer is not None:
                self._timer.cancel()
            if self._con is None:
                if not self.path.exists():
                    raise RunNotFoundError(f"run directory {self.run_dir} (or its {DB_NAME}) no longer exists")
                self._con = connect(self.path, read_only=True)
            try:
                yield self._con
            finally:
                self._timer = threading.Timer(self.idle_s, self.close)
                self._timer.daemon = True
                self._timer.start()

    def close(self) -> None:
        """Release the kept connection (reopened by the next query)."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run a parameterised read query (store-internal: callers use the typed methods)."""
        with self._connect() as con:
            return con.execute(sql, list(params)).df()

    # --- any table -----------------------------------------------------------------------------------
    def table_size(self, table: str) -> int:
        """Number of rows of a declared table."""
        return int(self._query(f"SELECT count(*) AS n FROM {schema.get(table).name}").n.iloc[0])

    def table_columns(self, table: str) -> list[str]:
        """The columns a declared table has in this run's file, in order."""
        df = self._query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' AND "
            "table_name = ? ORDER BY ordinal_position",
            [schema.get(table).name],
        )
        return list(df.column_name)
