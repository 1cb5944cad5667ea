"""The store is the whole interface to a run's database: no SQL, and no query call, outside lfp_core/store/."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from lfp_core.config import REPO_ROOT

SCANNED = ("lfp_core", "views", "app.py", "bench", "tests", "scripts")
STORE = REPO_ROOT / "lfp_core" / "store"
# SQL statements as the store writes them (upper-case keywords). DROP is left out on purpose: tests type
# "'; DROP TABLE features; --" into the dashboard to show that user input is never SQL.
SQL = re.compile(
    r"\b(SELECT\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|DELETE\s+FROM\b|UPDATE\s+\w+\s+SET\b|"
    r"CREATE\s+(OR\s+REPLACE\s+)?(TEMP\s+)?(TABLE|INDEX|VIEW|SEQUENCE)\b|ALTER\s+TABLE\b|DESCRIBE\b|"
    r"PRAGMA\b|COPY\s+\w+\s+(TO|FROM)\b|ATTACH\b)"
)
QUERY_CALLS = {"execute", "executemany", "sql", "query_df", "_query"}  # DuckDB's (and the reader's private) query calls


def _python_files() -> list[Path]:
    out: list[Path] = []
    for name in SCANNED:
        p = REPO_ROOT / name
        out += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return [p for p in out if STORE not in p.parents and p != Path(__file__).resolve()]  # (this file shows SQL)


def _offences(path: Path) -> list[str]:
    rel = path.relative_to(REPO_ROOT)
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.STRING and SQL.search(tok.string):
            found.append(f"{rel}:{tok.start[0]}: SQL in a string: {tok.line.strip()[:100]}")
        elif (
            tok.type == tokenize.NAME
            and tok.string in QUERY_CALLS
            and i
            and tokens[i - 1].string == "."
            and i + 1 < len(tokens)
            and tokens[i + 1].string == "("
        ):
            found.append(f"{rel}:{tok.start[0]}: a query call: {tok.line.strip()[:100]}")
    return found


def test_no_sql_outside_the_store():
    files = _python_files()
    assert len(files) > 50 and REPO_ROOT / "app.py" in files  # the scan sees the repository
    offences = [o for p in files for o in _offences(p)]
    assert not offences, (
        "SQL belongs in lfp_core/store/ (a typed RunReader/RunWriter function, or "
        "lfp_core.store.testing for tests):\n" + "\n".join(offences)
    )


def test_the_scan_finds_sql(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text(
        'q = "SELECT a FROM t"\ncon.execute(q)\nr.query("selected")\nsearch = "x\' OR 1=1; DROP TABLE t"\n'
        'pad = f"INSERT INTO {t} VALUES (1)"\n'
    )
    import tests.test_store_boundary as me

    old = me.REPO_ROOT
    me.REPO_ROOT = tmp_path
    try:
        found = _offences(sample)
    finally:
        me.REPO_ROOT = old
    assert [f.split(":")[1] for f in found] == ["1", "2", "5"]
