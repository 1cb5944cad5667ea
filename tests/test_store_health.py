"""A run file the tool cannot read, or whose tables are not ours, is refused before anything is written:
one line, exit 2, the file's bytes unchanged; ``--rebuild`` moves it aside."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lfp_core.store import CorruptStoreError, RunReader, RunWriter, SchemaVersionError, db_path
from lfp_core.store.testing import foreign_run
from tests.tiny_run import tiny_run

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("health") / "run")


def _truncated(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "truncated"
    shutil.copytree(finished, run)
    path = db_path(run)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return run


def _foreign(tmp_path: Path) -> Path:
    """A DuckDB file that says schema 4 in a meta table, but whose run table is someone else's."""
    return foreign_run(tmp_path / "foreign")


def _precompute(run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--out", str(run), "--until", "model"]
    return subprocess.run([*args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _report(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfp_core.report", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_a_damaged_or_foreign_run_is_refused_before_anything_is_written(finished, tmp_path, kind):
    run = _truncated(finished, tmp_path) if kind == "truncated" else _foreign(tmp_path)
    before, listing = _sha(db_path(run)), sorted(p.name for p in run.rglob("*"))
    error = CorruptStoreError if kind == "truncated" else SchemaVersionError
    with pytest.raises(error, match="Nothing was written.*--rebuild"):
        RunWriter(run)
    with pytest.raises(error):
        RunReader(run)
    for res in (_precompute(run), _report(run)):
        assert res.returncode == 2, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and ("damaged" in lines[0] or "not that schema" in lines[0]), res.stderr[-2000:]
    assert _sha(db_path(run)) == before
    assert sorted(p.name for p in run.rglob("*")) == listing  # no WAL, no artifacts folder, nothing new
    if kind == "foreign":
        assert "table run has columns this schema does not declare (note)" in lines[0]


def test_rebuild_moves_a_damaged_run_aside_and_starts_afresh(finished, tmp_path):
    run = _truncated(finished, tmp_path)
    before = _sha(db_path(run))
    res = _precompute(run, "--rebuild")
    assert res.returncode == 0, res.stderr[-2000:]
    moved = [p for p in run.iterdir() if p.name.startswith("run.duckdb.old-")]
    assert len(moved) == 1 and _sha(moved[0]) == before
    assert {s.name: s.status for s in RunReader(run).stages()}.get("model") == "done"


def _unshare_ok() -> bool:
    try:
        res = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -rm (a user namespace) to mount a read-only file system")
def test_a_run_on_a_read_only_file_system_is_one_line(finished, tmp_path):
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    shutil.copytree(finished, src / "run")
    before = _sha(db_path(src / "run"))
    py = sys.executable
    script = (
        f"mount --bind -o ro {src} {ro} && cd {ROOT} && "
        f"{py} -m lfp_core.precompute --preset quick --out {ro}/new --until model; echo rc=$?; "
        f"{py} -m lfp_core.precompute --preset quick --out {ro}/run --until model; echo rc=$?"
    )
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert out.count("rc=2") == 2, out[-3000:]
    assert "Traceback" not in out
    assert f"cannot create the run directory {ro}/new: Read-only file system" in out
    assert f"cannot write to {ro}/run/run.duckdb: read-only file system" in out
    assert _sha(db_path(src / "run")) == before
