"""Store utilities for tests and benchmarks: runs in states precompute never leaves them in (an old or
foreign schema, a forgotten stage, a mixed-up SAE path) and synthetic stores of many features.

Precompute, the dashboard and the report never import this module. It is part of the store so that the
SQL these states need stays in the store (no other code writes SQL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import duckdb
import pandas as pd

from lfp_core.store import schema
from lfp_core.store.connection import db_path
from lfp_core.store.reader import RunReader
from lfp_core.store.writer import RunWriter


def old_schema_run(run_dir: Path, version: int = 0) -> Path:
    """A run directory whose DuckDB file holds only a meta table naming schema ``version``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path(run_dir)))
    try:
        con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
    finally:
        con.close()
    return run_dir


def legacy_run(run_dir: Path, version: int, rows: Mapping[str, list[dict]]) -> Path:
    """A run written by schema ``version``: its meta table and the tables of ``rows`` as they were in that
    version (the columns added later left out), holding those rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path(run_dir)))
    try:
        con.execute(schema.get("meta").ddl(version))
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
        for name, table_rows in rows.items():
            t = schema.get(name)
            con.execute(t.ddl(version))
            df = pd.DataFrame(table_rows)
            if len(df):
                old = [c.name for c in t.columns_at(version)]
                t.check_columns(df.columns)
                extra = [c for c in df.columns if c not in old]
                if extra:
                    raise ValueError(f"table {name} had no column {extra} in schema version {version}")
                con.register("_legacy_rows", df)
                con.execute(
                    f"INSERT INTO {name} ({', '.join(df.columns)}) SELECT {', '.join(df.columns)} FROM _legacy_rows"
                )
                con.unregister("_legacy_rows")
    finally:
        con.close()
    return run_dir


def forget_stages(run_dir: Path, names: Iterable[str]) -> None:
    """Delete the records of stages ``names`` (their rows stay): the run looks as if they never ran."""
    with RunWriter(run_dir).transaction() as con:
        con.execute("DELETE FROM stages WHERE name IN (SELECT unnest(?))", [list(names)])


def set_sae_paths(run_dir: Path, paths: Mapping[str, str]) -> None:
    """Point SAE records at other files (``{sae_id: path relative to the run}``)."""
    with RunWriter(run_dir).transaction() as con:
        for sae_id, path in paths.items():
            con.execute("UPDATE saes SET path = ? WHERE sae_id = ?", [path, sae_id])


def write_through(reader: RunReader) -> None:
    """Try to delete rows through a reader's connection (a read-only connection raises duckdb.Error)."""
    with reader._connect() as con:
        con.execute("DELETE FROM meta")


def fill_synthetic_features(
    writer: RunWriter, n_features: int, n_examples: int, n_tokens: int, n_layers: int, seed: int = 0
) -> None:
    """``n_features`` random features of the tuned model (split over ``n_layers`` layers), each with
    ``n_examples`` top examples of ``n_tokens`` tokens, probe weights and labels; the features stage
    marked done. Generated inside DuckDB (one INSERT … SELECT per table) so 1M examples take seconds."""
    per = n_features // n_layers
    with writer.transaction() as con:
        con.execute("SELECT setseed(?)", [seed / 1000])
        con.execute(
            "INSERT INTO features (role, layer, feature, density, n_fired, mean_act, max_act, hist_counts, top_tokens, "
            "freq_base_text, freq_tuned_text, top_logit_tokens, top_logit_values, bottom_logit_tokens, "
            "bottom_logit_values, neighbours, neighbour_cos) "
            "SELECT 'tuned', l, f, random() * 0.05, (random() * 1e4)::BIGINT, random(), "
            "1 + random() * 9, list_transform(range(20), lambda i: (random() * 100)::BIGINT), "
            "list_transform(range(8), lambda i: ' tok' || ((f * 7 + i * 13) % 4096)::VARCHAR), random() * 0.05, "
            "random() * 0.05, list_transform(range(10), lambda i: ' up' || i::VARCHAR), list_transform(range(10), lambda i: random()), "
            "list_transform(range(10), lambda i: ' down' || i::VARCHAR), list_transform(range(10), lambda i: -random()), "
            "list_transform(range(10), lambda i: ((f + i + 1) % ?)::INTEGER), list_transform(range(10), lambda i: random()) "
            "FROM range(?) AS a(l), range(?) AS b(f)",
            [per, n_layers, per],
        )
        con.execute(
            "INSERT INTO feature_examples (role, layer, feature, kind, rank, interval, doc_id, pos, act, center, tokens, "
            "token_ids, acts) "
            "SELECT 'tuned', l, f, 'top', r, -1, (f * 31 + r) % 100000, 10, 10 - r * 0.3, "
            "10, list_transform(range(?), lambda i: ' tok' || ((f + i) % 4096)::VARCHAR), "
            "list_transform(range(?), lambda i: ((f + i) % 4096)::INTEGER), list_transform(range(?), lambda i: random()) "
            "FROM range(?) AS a(l), range(?) AS b(f), range(?) AS c(r)",
            [n_tokens, n_tokens, n_tokens, n_layers, per, n_examples],
        )
        con.execute(
            "INSERT INTO probe_features (role, layer, feature, weight, mean_act, importance, rank) "
            "SELECT 'tuned', l, f, random() - 0.5, random(), random(), "
            "(row_number() OVER ()) - 1 FROM range(?) AS a(l), range(?) AS b(f)",
            [n_layers, per],
        )
        con.execute(
            "INSERT INTO feature_labels (role, layer, feature, labeller, explanation, relevant, detection_acc, "
            "detection_f1, detection_auc, n_unparsed) "
            "SELECT 'tuned', l, f, 'synthetic', 'fires on token ' || (f % 4096)::VARCHAR "
            "|| CASE WHEN f % 5 = 0 THEN ' (praise)' ELSE '' END, f % 5 = 0, random(), random(), NULL, 0 "
            "FROM range(?) AS a(l), range(?) AS b(f)",
            [n_layers, per],
        )
        writer.mark_stage("features", 0, "x", "done", 0, con=con)


def foreign_run(run_dir: Path, version: int = 4) -> Path:
    """A DuckDB file that says schema ``version`` in a meta table but whose ``run`` table is someone else's
    (one column ``note``): the health check must refuse it rather than "upgrade" it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path(run_dir)))
    try:
        con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
        con.execute("CREATE TABLE run (note VARCHAR)")
        con.execute("INSERT INTO run VALUES ('not ours')")
    finally:
        con.close()
    return run_dir


def table_dump(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every declared table of a run as stored, read-only (for comparing two runs value by value)."""
    con = duckdb.connect(str(db_path(run_dir)), read_only=True)
    try:
        return {name: con.execute(f"SELECT * FROM {name}").df() for name in schema.TABLES}
    finally:
        con.close()
