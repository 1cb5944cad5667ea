"""The run store: schema version, atomic writes, read-only readers, and bad DB files."""

from __future__ import annotations

import duckdb
import pytest

from lfp_core.store import (
    SCHEMA_VERSION,
    CorruptStoreError,
    RunNotFoundError,
    RunReader,
    RunWriter,
    SchemaVersionError,
    StoreError,
    db_path,
    list_runs,
)
from tests.helpers import old_schema_run


def _prompt(pid: int) -> dict:
    return {"prompt_id": pid, "split": "train", "source": "imdb", "doc_id": f"train/pos/{pid}", "n_tokens": 2,
            "token_ids": [1, 2], "text": "a b"}


def test_new_run_has_schema_version_and_tables(tmp_path):
    w = RunWriter(tmp_path / "r")
    r = RunReader(tmp_path / "r")
    assert r.query("SELECT value FROM meta WHERE key='schema_version'").value[0] == str(SCHEMA_VERSION)
    assert r.stages() == [] and r.reward_summary() is None and r.model_info() is None
    assert (tmp_path / "r" / "artifacts").is_dir()
    assert list_runs(tmp_path) == [tmp_path / "r"]
    w.set_config("quick", '{"a": 1}')
    assert r.run_info()["config"] == {"a": 1}


def test_failed_write_rolls_back_everything(tmp_path):
    w = RunWriter(tmp_path / "r")
    with pytest.raises(RuntimeError):
        with w.transaction() as con:
            RunWriter.put_prompts(con, [_prompt(0), _prompt(1)])
            raise RuntimeError("crash mid-stage")
    assert w.reader().prompts().empty
    with w.transaction() as con:
        RunWriter.put_prompts(con, [_prompt(0)])
    assert len(w.reader().prompts()) == 1


def test_duplicate_rows_are_rejected_by_the_key(tmp_path):
    w = RunWriter(tmp_path / "r")
    with w.transaction() as con:
        RunWriter.put_prompts(con, [_prompt(0)])
    with pytest.raises(duckdb.ConstraintException):
        with w.transaction() as con:
            RunWriter.put_prompts(con, [_prompt(0)])
    assert len(w.reader().prompts()) == 1


def test_reader_is_read_only(tmp_path):
    RunWriter(tmp_path / "r")
    r = RunReader(tmp_path / "r")
    with pytest.raises(duckdb.Error):
        r.query("DELETE FROM meta")


def test_old_schema_version_names_both_versions_and_the_fix(tmp_path):
    d = old_schema_run(tmp_path / "r")
    for opener in (RunReader, RunWriter):
        with pytest.raises(SchemaVersionError) as e:
            opener(d)
        assert "version 0" in str(e.value) and f"version {SCHEMA_VERSION}" in str(e.value)
        assert "--rebuild" in str(e.value)


def test_foreign_duckdb_file_is_not_a_run(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    duckdb.connect(str(db_path(d))).close()
    with pytest.raises(SchemaVersionError, match="not an LFP Explorer run"):
        RunReader(d)


def test_corrupt_db_file_gets_a_clear_error(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    db_path(d).write_bytes(b"this is not a database" * 500)
    with pytest.raises(CorruptStoreError) as e:
        RunReader(d)
    assert str(db_path(d)) in str(e.value) and "rebuild" in str(e.value)


def test_missing_run_and_file_as_run(tmp_path):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        RunReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="precompute"):
        RunReader(tmp_path / "empty")
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        RunWriter(f)
