"""Where a run lives on disk and how its DuckDB file is opened."""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from lfp_core.store.errors import CorruptStoreError, StoreBusyError, StoreError

log = logging.getLogger(__name__)

DB_NAME = "run.duckdb"
ARTIFACTS = "artifacts"


def db_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / DB_NAME


def artifacts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ARTIFACTS


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories (those holding a run.duckdb) under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and db_path(p).exists()]
    return sorted(runs, key=lambda p: db_path(p).stat().st_mtime, reverse=True)


def now() -> dt.datetime:
    return dt.datetime.now().replace(microsecond=0)


def writer_wait_s() -> float:
    """How long a writer waits for other processes (a dashboard, a notebook) to release the run file:
    ``$LFP_LOCK_WAIT_S``, default 300 s."""
    return float(os.environ.get("LFP_LOCK_WAIT_S", "300"))


def connect(path: Path, read_only: bool, wait_s: float = 5.0) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, turning DuckDB's errors into specific StoreErrors.

    A lock held by another process (a precompute writing; for a writer, a reader such as the dashboard
    or a notebook holding a connection) is waited for up to ``wait_s`` seconds, retrying every 0.25 s.
    """
    deadline, warned = time.monotonic() + wait_s, False
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "lock" in msg.lower() and time.monotonic() < deadline:
                if not warned and wait_s > 5:
                    log.warning("%s is held by another process (a dashboard or notebook reading it?); waiting", path)
                    warned = True
                time.sleep(0.25)
                continue
            if not read_only and ("read-only file system" in msg.lower() or "permission denied" in msg.lower()):
                raise StoreError(
                    f"cannot write to {path}: {'read-only file system' if 'read-only' in msg.lower() else 'permission denied'}"
                    f". The dashboard and the report can still read it; to compute or extend the run, copy its "
                    f"directory somewhere writable and give that as --out"
                ) from exc
            if "lock" in msg.lower():
                raise StoreBusyError(
                    f"{path} is locked by another process (a precompute writing to it?); try again shortly"
                ) from exc
            raise CorruptStoreError(
                f"{path} is not a readable DuckDB database ({msg.splitlines()[0]}). "
                f"Move it aside and rebuild the run with python -m lfp_core.precompute --out {path.parent}"
            ) from exc
        except duckdb.Error as exc:
            raise CorruptStoreError(
                f"{path} could not be opened as a DuckDB database ({str(exc).splitlines()[0]}). "
                f"Move it aside and rebuild the run with python -m lfp_core.precompute --out {path.parent}"
            ) from exc


class Queries:
    """Base of the reader's domain mixins: one parameterised read query at a time."""

    def _query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError
