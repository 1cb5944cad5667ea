"""The run store: schema version, atomic writes, read-only readers, and bad DB files."""

from __future__ import annotations

import duckdb
import pandas as pd
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
from lfp_core.store.testing import legacy_run, write_through
from tests.helpers import old_schema_run


def _prompt(pid: int) -> dict:
    return {
        "prompt_id": pid,
        "split": "train",
        "source": "imdb",
        "doc_id": f"train/pos/{pid}",
        "n_tokens": 2,
        "token_ids": [1, 2],
        "text": "a b",
    }


def test_new_run_has_schema_version_and_tables(tmp_path):
    w = RunWriter(tmp_path / "r")
    r = RunReader(tmp_path / "r")
    assert r.schema_version() == SCHEMA_VERSION
    assert r.stages() == [] and r.reward_summary() is None and r.model_info() is None
    assert (tmp_path / "r" / "artifacts").is_dir()
    assert list_runs(tmp_path) == [tmp_path / "r"]
    w.set_config("quick", '{"a": 1}')
    assert r.run_info()["config"] == {"a": 1}


def test_failed_write_rolls_back_everything(tmp_path):
    w = RunWriter(tmp_path / "r")
    with pytest.raises(RuntimeError), w.transaction() as con:
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
    with pytest.raises(duckdb.ConstraintException), w.transaction() as con:
        RunWriter.put_prompts(con, [_prompt(0)])
    assert len(w.reader().prompts()) == 1


def test_reader_is_read_only(tmp_path):
    RunWriter(tmp_path / "r")
    r = RunReader(tmp_path / "r")
    with pytest.raises(duckdb.Error):
        write_through(r)


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


def _feature(layer: int, f: int, tokens: list[str], density: float) -> dict:
    return {
        "role": "tuned",
        "layer": layer,
        "feature": f,
        "density": density,
        "n_fired": 1,
        "mean_act": 1.0,
        "max_act": 1.0 + f,
        "hist_counts": [1],
        "top_tokens": tokens,
        "freq_base_text": 0.1,
        "freq_tuned_text": 0.1 + 0.01 * f,
        "top_logit_tokens": [],
        "top_logit_values": [],
        "bottom_logit_tokens": [],
        "bottom_logit_values": [],
        "neighbours": [],
        "neighbour_cos": [],
    }


def test_feature_table_filters_searches_sorts_with_bound_parameters(tmp_path):
    from lfp_core.store import put_rows

    w = RunWriter(tmp_path / "r")
    with w.transaction() as con:
        put_rows(
            con,
            "features",
            [
                _feature(2, 0, [" great", " good"], 0.01),
                _feature(2, 1, [" awful"], 0.2),
                _feature(3, 0, ["'; DROP TABLE features; --"], 0.05),
            ],
        )
        put_rows(
            con,
            "probe_features",
            [
                {
                    "role": "tuned",
                    "layer": 2,
                    "feature": 1,
                    "weight": -0.5,
                    "mean_act": 1.0,
                    "importance": 0.5,
                    "rank": 0,
                }
            ],
        )
        put_rows(
            con,
            "feature_labels",
            [
                {
                    "role": "tuned",
                    "layer": 2,
                    "feature": 0,
                    "labeller": "offline",
                    "explanation": "Praise words",
                    "relevant": True,
                }
            ],
        )
    r = RunReader(tmp_path / "r")
    df, n = r.feature_table()
    assert n == 3 and (df.layer.iloc[0], df.feature.iloc[0]) == (2, 1)  # probe rank first, unranked last
    assert r.feature_table(search="GREAT")[1] == 1 and r.feature_table(search="praise")[0].feature.tolist() == [0]
    assert r.feature_table(search="drop table")[1] == 1 and r.table_size("features") == 3
    assert r.feature_table(search="%")[1] == 0  # no wildcards: a literal substring
    assert r.feature_table(layer=3)[1] == 1 and r.feature_table(min_density=0.04)[1] == 2
    assert r.feature_table(relevant_only=True)[0].label.tolist() == ["Praise words"]
    assert r.feature_table(sort="density", descending=True)[0].density.tolist() == [0.2, 0.05, 0.01]
    page, n = r.feature_table(sort="feature", limit=1, offset=2)
    assert n == 3 and len(page) == 1
    with pytest.raises(ValueError, match="cannot sort by"):
        r.feature_table(sort="density; DROP TABLE features")
    one = r.feature("tuned", 2, 1)
    assert one["probe_weight"] == -0.5 and one["probe_rank"] == 0 and pd.isna(one["labeller"])
    assert r.feature("tuned", 2, 99) is None


def test_schema_2_run_gains_the_new_columns_in_place(tmp_path):
    run = legacy_run(tmp_path / "v2", 2, {"features": [{"role": "tuned", "layer": 2, "feature": 7, "density": 0.5}]})
    with pytest.raises(SchemaVersionError, match="Upgrade it in place"):
        RunReader(run)
    RunWriter(run)
    r = RunReader(run)
    assert "top_tokens" in r.table_columns("features") and r.features("tuned", 2).density.tolist() == [0.5]
    assert r.table_size("feature_labels") == 0


def test_every_declared_table_is_created_with_its_columns_and_checked_on_open(tmp_path):
    from lfp_core.store import TABLES

    RunWriter(tmp_path / "r")
    r = RunReader(tmp_path / "r")
    for name, t in TABLES.items():
        assert r.table_columns(name) == list(t.column_names), name
    with pytest.raises(ValueError, match="unknown table"):
        r.table_size("features; DROP TABLE features")
    bare = old_schema_run(tmp_path / "bare", SCHEMA_VERSION)  # the current version, but no tables
    with pytest.raises(SchemaVersionError, match="lacks table"):
        RunReader(bare)
    RunWriter(bare)  # a writer creates what is missing
    assert RunReader(bare).table_size("features") == 0


def test_rows_are_selected_with_typed_filters(tmp_path):
    from lfp_core.store import Not, Where, delete_rows

    w = RunWriter(tmp_path / "r")
    sae = {"layer": 1, "arch": "topk", "d_sae": 8, "path": "p"}
    with w.transaction() as con:
        RunWriter.put_saes(
            con,
            [
                {"sae_id": s, "role": s.split("-")[0], "kind": k, **sae}
                for s, k in (("tuned-a", "main"), ("base-a", "main"), ("rm-a", "rm"))
            ],
        )
        RunWriter.put_saes(con, [{"sae_id": "tuned-a", "role": "tuned", "kind": "main", **sae, "fvu": 0.1}])  # replaced
    r = RunReader(tmp_path / "r")
    assert r.table_size("saes") == 3 and r.saes().set_index("sae_id").fvu["tuned-a"] == 0.1
    with w.transaction() as con:
        with pytest.raises(ValueError, match="has no column 'nope'"):
            delete_rows(con, "saes", Where(nope=1))
        with pytest.raises(TypeError, match="Where"):
            delete_rows(con, "saes", ("true", []))  # type: ignore[arg-type]
    w.clear_stage("saes", {"saes": Where(kind=Not("rm")), "sae_pairs": Where()})
    assert list(r.saes().sae_id) == ["rm-a"]
    w.clear_stage("reward_model", {"saes": Where(role="rm")})
    assert r.table_size("saes") == 0


def test_stage_summaries_are_typed_and_checked_when_written(tmp_path):
    from lfp_core.store import SummaryError, parse_summary
    from lfp_core.store.summaries import ProbeRoleSummary, ProbesSummary, RLEvalSummary

    w = RunWriter(tmp_path / "r")
    tau = {"tau": 0.5, "p": 0.01, "n_words": 40}
    with pytest.raises(SummaryError, match="stage 'probes': summary key 'bogus' is not a field of ProbesSummary"):
        w.mark_stage("probes", 3, "h", "done", 1.0, {"layers": [1], "bogus": 1})
    with pytest.raises(SummaryError, match=r"'tuned\.tau_word\.taus' is not a field of Tau"):
        w.mark_stage("probes", 3, "h", "done", 1.0, {"tuned": {"tau_word": {**tau, "taus": 1}}})
    with pytest.raises(SummaryError, match="'nope' has no summary class"):
        w.mark_stage("nope", 3, "h", "done", 1.0, {"x": 1})
    r = RunReader(tmp_path / "r")
    assert r.stages() == []  # nothing was marked
    w.mark_stage("probes", 3, "h", "done", 1.0, {"layers": [1, 2], "tuned": {"tau_word": {**tau, "pos": tau}}})
    w.mark_stage("rl_eval", 2, "h", "running")
    [rl, pr] = r.stages()
    assert isinstance(pr.summary, ProbesSummary) and pr.summary.layers == [1, 2] and pr.finished_at is not None
    assert isinstance(pr.summary.tuned, ProbeRoleSummary) and pr.summary.tuned.tau_word == {**tau, "pos": tau}
    assert pr.summary.role("tuned").tau("word")["pos"]["tau"] == 0.5 and pr.summary.base is None
    assert r.summary(ProbesSummary) == pr.summary
    assert isinstance(rl.summary, RLEvalSummary) and r.summary(RLEvalSummary) is None  # not done
    # reading a run written by another version: a key it does not know is dropped, not an error
    assert parse_summary("probes", {"layers": [3], "retired": 1, "tuned": {"gone": 2}}, strict=False) == ProbesSummary(
        layers=[3], tuned=ProbeRoleSummary()
    )
