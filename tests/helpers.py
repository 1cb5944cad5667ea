"""Small builders shared by tests: runs in states a user can meet."""

from __future__ import annotations

from pathlib import Path

import duckdb

from lfp_core.store import db_path


def old_schema_run(run_dir: Path, version: int = 0) -> Path:
    """A run directory whose DuckDB file carries another schema version."""
    run_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path(run_dir)))
    con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
    con.close()
    return run_dir
