"""The table registry: every table of a run declared once, and the schema built and checked from it.

Each domain module of the store (:mod:`~lfp_core.store.runs`, :mod:`~lfp_core.store.texts`,
:mod:`~lfp_core.store.features`, :mod:`~lfp_core.store.probes`, :mod:`~lfp_core.store.ablation`)
declares its tables with :func:`table`: name, columns, primary key and owning domain. From the
registry come the DDL a new run is created with, the in-place upgrade of an older run (missing
tables created, missing columns added), the check that an opened run has every table and column,
and the validation of every table or column name a caller passes (:func:`get`, :class:`Where`).

Schema history (``SCHEMA_VERSION``, recorded per table and column as ``since``): 2 added the activation
corpus, SAE and feature tables; 3 the vocabulary, ``features.top_tokens``, the probe tables and feature
labels; 4 the LLM cache, the ablation, preference-model and attribution tables; 5 the honest-numbers
columns and tables (estimators, controls, baselines); 6 the sequence-level probe's table
(``probe_sequences``); 7 the model-diffing tables (:mod:`~lfp_core.store.diffing`). A writer upgrades runs of
versions 1-6 in place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from lfp_core.store.errors import SchemaVersionError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
# Versions a writer upgrades in place: their tables are a subset of the current schema's, so creating the
# missing tables and adding the missing columns is the whole migration (computed stages are kept; a stage
# whose output gained a column is re-run by its version).
UPGRADABLE = frozenset({1, 2, 3, 4, 5, 6})

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_COLUMN = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s+([A-Z]+(?:\[\])?)(\s+NOT NULL)?\s*$")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a DuckDB type, e.g. "INTEGER", "VARCHAR[]"
    not_null: bool = False
    since: int = 1  # the schema version that added it

    def ddl(self) -> str:
        return f"{self.name} {self.type}{' NOT NULL' if self.not_null else ''}"


@dataclass(frozen=True)
class Table:
    """One table of a run: its columns in order, primary key, owning domain and secondary indexes."""

    name: str
    domain: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    indexes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # {index name: columns}
    since: int = 1

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def columns_at(self, version: int) -> tuple[Column, ...]:
        """The columns the table had in schema ``version``."""
        return tuple(c for c in self.columns if c.since <= version)

    def ddl(self, version: int = SCHEMA_VERSION) -> str:
        parts = [c.ddl() for c in self.columns_at(version)]
        if self.key:
            parts.append(f"PRIMARY KEY ({', '.join(self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(parts)})"

    def index_ddl(self) -> list[str]:
        return [
            f"CREATE INDEX IF NOT EXISTS {n} ON {self.name} ({', '.join(cols)})" for n, cols in self.indexes.items()
        ]

    def check_columns(self, names) -> None:
        unknown = [n for n in names if n not in self.column_names]
        if unknown:
            raise ValueError(
                f"table {self.name} has no column {', '.join(map(repr, unknown))}; "
                f"its columns: {', '.join(self.column_names)}"
            )


TABLES: dict[str, Table] = {}


def table(
    name: str,
    domain: str,
    columns: str,
    key: tuple[str, ...] = (),
    *,
    added: Mapping[str, int] | None = None,
    indexes: Mapping[str, tuple[str, ...]] | None = None,
    since: int = 1,
) -> Table:
    """Declare a table (once): ``columns`` is the DDL column list (``name TYPE [NOT NULL], ...``);
    ``added`` maps a column to the schema version that added it."""
    if name in TABLES:
        raise ValueError(f"table {name} is declared twice")
    if not _IDENT.match(name):
        raise ValueError(f"bad table name {name!r}")
    added = dict(added or {})
    cols = []
    for part in columns.split(","):
        m = _COLUMN.match(part)
        if not m:
            raise ValueError(f"table {name}: cannot read the column declaration {part.strip()!r}")
        cols.append(Column(m.group(1), m.group(2), bool(m.group(3)), added.pop(m.group(1), since)))
    t = Table(name, domain, tuple(cols), tuple(key), dict(indexes or {}), since)
    if added:
        raise ValueError(f"table {name}: `added` names unknown columns {sorted(added)}")
    t.check_columns(t.key)
    for cols_ in t.indexes.values():
        t.check_columns(cols_)
    TABLES[name] = t
    return t


def get(name: str) -> Table:
    """The declared table ``name``; a ValueError for any other name (names are never taken from users)."""
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}") from None


class Not:
    """A :class:`Where` value meaning "any value but this one"."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Not({self.value!r})"


class In:
    """A :class:`Where` value meaning "one of these values"."""

    def __init__(self, *values: Any):
        self.values = tuple(values)

    def __repr__(self) -> str:
        return f"In{self.values!r}"


class Where:
    """A typed row filter: ``Where()`` is every row, ``Where(role="base")`` the rows whose role is
    'base', ``Where(kind=Not("rm"))`` the rows whose kind is not 'rm', ``Where(role=In("a", "b"))`` the rows
    whose role is 'a' or 'b' (conditions are ANDed).

    Stages declare the rows they own with it (``clears``); the store turns it into a parameterised
    WHERE clause after checking each column against the table's declaration.
    """

    def __init__(self, **conditions: Any):
        self.conditions = conditions

    def __repr__(self) -> str:
        return f"Where({', '.join(f'{k}={v!r}' for k, v in self.conditions.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Where) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def sql(self, t: Table) -> tuple[str, list[Any]]:
        """``(where_sql, params)`` for table ``t`` (columns checked against its declaration)."""
        t.check_columns(self.conditions)
        parts, params = [], []
        for col, value in self.conditions.items():
            if isinstance(value, Not):
                parts.append(f"{col} IS DISTINCT FROM ?")
                params.append(value.value)
            elif isinstance(value, In):
                parts.append(f"{col} IN (SELECT unnest(?))")
                params.append(list(value.values))
            else:
                parts.append(f"{col} = ?")
                params.append(value)
        return (" AND ".join(parts) or "true"), params


# --- creating, upgrading and checking a run's schema --------------------------------------------------
def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create every declared table and index that is missing (idempotent)."""
    for t in TABLES.values():
        con.execute(t.ddl())
    for t in TABLES.values():
        for stmt in t.index_ddl():
            con.execute(stmt)


def stored_version(con: duckdb.DuckDBPyConnection, path: Path) -> int | None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException as exc:
        raise SchemaVersionError(
            f"{path} is a DuckDB file but not an LFP Explorer run (no meta table). "
            f"Point at a run directory made by python -m lfp_core.precompute"
        ) from exc
    return int(row[0]) if row else None


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for tname, cname in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'"
    ).fetchall():
        out.setdefault(tname, set()).add(cname)
    return out


def _missing(con: duckdb.DuckDBPyConnection) -> list[str]:
    have = _columns(con)
    out = []
    for t in TABLES.values():
        if t.name not in have:
            out.append(f"table {t.name}")
        else:
            out += [f"column {t.name}.{c}" for c in t.column_names if c not in have[t.name]]
    return out


def upgrade(con: duckdb.DuckDBPyConnection, version: int | None, path: Path) -> None:
    """Bring a run's tables to the current schema: add missing columns, then create missing tables and
    indexes (the columns first: an index may name a new column); record the new version."""
    have = _columns(con)
    for t in TABLES.values():
        for c in t.columns:
            if t.name in have and c.name not in have[t.name]:
                con.execute(f"ALTER TABLE {t.name} ADD COLUMN IF NOT EXISTS {c.name} {c.type}")
    create(con)
    if version != SCHEMA_VERSION:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        log.info("upgraded %s from schema version %s to %s", path, version, SCHEMA_VERSION)


def check(con: duckdb.DuckDBPyConnection, path: Path, writer: bool = False) -> int | None:
    """Check the run's schema version and that every declared table and column is there; a ``writer``
    upgrades a run of an older version in place (and creates any table a current one lacks).
    Returns the version found."""
    version = stored_version(con, path)
    if writer and (version == SCHEMA_VERSION or version in UPGRADABLE):
        upgrade(con, version, path)
        return version
    if version == SCHEMA_VERSION:
        missing = _missing(con)
        if missing:
            raise SchemaVersionError(
                f"{path} says schema version {SCHEMA_VERSION} but lacks {', '.join(missing[:5])}"
                f"{' …' if len(missing) > 5 else ''}. Rebuild it: python -m lfp_core.precompute --out {path.parent} "
                "--rebuild"
            )
        return version
    if version in UPGRADABLE:
        raise SchemaVersionError(
            f"{path} has run-store schema version {version}; this LFP Explorer reads version {SCHEMA_VERSION}. "
            f"Upgrade it in place (computed stages are kept): python -m lfp_core.precompute --out {path.parent}"
        )
    raise SchemaVersionError(
        f"{path} has run-store schema version {version}; this LFP Explorer reads version "
        f"{SCHEMA_VERSION}. Rebuild it: python -m lfp_core.precompute --out {path.parent} --rebuild"
    )


def verify(con: duckdb.DuckDBPyConnection, path: Path) -> int | None:
    """Check, reading only, that a run file is whole and ours before anything writes to it.

    Structure: the version it claims must be one this code reads or upgrades, and every table of that
    version must have that version's columns and no column this schema does not declare (a file of
    someone else's tables that happens to hold a ``meta`` row is refused, not "upgraded"). Integrity:
    every row of every table is read (``hash`` of the whole row), so a truncated or damaged file fails
    here, on a read-only connection, and its bytes are left as they were.

    Returns:
        The stored schema version.

    Raises:
        SchemaVersionError: a foreign or mismatched schema; CorruptStoreError: unreadable data.
    """
    from lfp_core.store.errors import CorruptStoreError

    rebuild = f"python -m lfp_core.precompute --out {path.parent} --rebuild (the file is moved aside, not deleted)"
    try:
        version = stored_version(con, path)
        if version is not None and version != SCHEMA_VERSION and version not in UPGRADABLE:
            return version  # check() says what to do with a version this code cannot read
        at = version or SCHEMA_VERSION
        have = _columns(con)
        problems: list[str] = []
        for t in TABLES.values():
            if t.name not in have:
                continue  # a table the version did not have yet (or an empty early run): the upgrade creates it
            foreign = sorted(have[t.name] - set(t.column_names))
            if foreign:
                problems.append(f"table {t.name} has columns this schema does not declare ({', '.join(foreign)})")
            lacking = [c.name for c in t.columns_at(at) if c.name not in have[t.name]]
            if lacking:
                problems.append(f"table {t.name} lacks its schema-{at} columns {', '.join(lacking)}")
        if problems:
            raise SchemaVersionError(
                f"{path} claims run-store schema version {version} but its tables are not that schema's: "
                f"{'; '.join(problems[:4])}{' …' if len(problems) > 4 else ''}. Nothing was written. If it is a "
                f"run, restore it from a copy; to start the run afresh: {rebuild}"
            )
        for name in sorted(set(have) & set(TABLES)):
            con.execute(f'SELECT count(*), sum(hash("{name}")) FROM "{name}"').fetchall()
    except duckdb.Error as exc:
        raise CorruptStoreError(
            f"{path} is damaged: DuckDB cannot read it ({str(exc).splitlines()[0][:200]}). Nothing was written. "
            f"Restore it from a copy, or start the run afresh: {rebuild}"
        ) from exc
    return version
