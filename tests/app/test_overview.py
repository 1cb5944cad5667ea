"""The Overview page through streamlit's AppTest: a finished run, a partial run, no runs, a bad
path, an old-schema DB, and HTML in generated text."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lfp_core.config import REPO_ROOT
from lfp_core.pipeline import stage_names
from lfp_core.store import RunWriter
from tests.helpers import old_schema_run, shown

APP = str(REPO_ROOT / "app.py")


def _app(monkeypatch, runs: Path, run: str | None = None) -> AppTest:
    monkeypatch.setenv("LFP_RUNS_DIR", str(runs))
    at = AppTest.from_file(APP, default_timeout=60)
    if run is not None:
        at.query_params["run"] = run
    return at.run()


def _all_html(at: AppTest) -> str:
    return "\n".join(str(h.proto.body) for h in at.get("html"))


def test_overview_of_a_finished_run(monkeypatch, quick_run):
    at = _app(monkeypatch, quick_run.parent)
    assert not at.exception
    assert at.title[0].value == f"Run · {quick_run.name}"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"].endswith("M") and "±" in metrics["Base reward (mean ± s.e.)"]
    stages = at.dataframe[0].value
    assert list(stages.stage) == stage_names() and (stages.status == "done").all()
    html = _all_html(at)
    assert html.count('class="lfp-completion"') == 30  # the 30 shown of 64
    assert not at.warning  # nothing missing
    from lfp_core.report import build_report, format_report

    assert at.code[0].value == format_report(build_report(str(quick_run)))  # the headline figures, as the CLI prints


def test_no_runs_says_how_to_make_one(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path)
    assert not at.exception
    assert "No run selected" in at.info[0].value and "./lfp demo" in at.info[0].value


def test_bad_run_path_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path, run=str(tmp_path / "does-not-exist"))
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)


def test_old_schema_db_is_a_message(monkeypatch, tmp_path):
    run = old_schema_run(tmp_path / "old")
    at = _app(monkeypatch, tmp_path, run=str(run))
    assert not at.exception
    assert any("schema version 0" in shown(e.value) and "--rebuild" in shown(e.value) for e in at.error)


def test_partial_run_lists_missing_stages_and_the_command(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    w = RunWriter(run)
    w.set_config("quick", '{"model": "demo", "task": "vader"}')
    w.mark_stage("model", 0, "h", "done", 1.0)
    at = _app(monkeypatch, tmp_path, run=str(run))
    assert not at.exception
    warning = at.warning[0].value
    assert "prompts" in warning and "base_samples" in warning and "lfp_core.precompute" in warning
    assert any("No completions yet" in i.value for i in at.info)


@pytest.mark.parametrize("evil", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"])
def test_html_in_generated_text_is_escaped(monkeypatch, tmp_path, evil):
    run = tmp_path / "evil"
    w = RunWriter(run)
    w.set_config("quick", '{"model": "demo", "task": "vader"}')
    with w.transaction() as con:
        RunWriter.put_prompts(
            con,
            [
                {
                    "prompt_id": 0,
                    "split": "eval",
                    "source": "imdb",
                    "doc_id": "x",
                    "n_tokens": 1,
                    "token_ids": [1],
                    "text": evil,
                }
            ],
        )
        RunWriter.put_completions(
            con,
            [
                {
                    "role": "base",
                    "prompt_id": 0,
                    "sample_idx": 0,
                    "seed": 0,
                    "n_new": 3,
                    "token_ids": [1, 2, 3],
                    "text": f" great {evil} bad",
                    "reward": 0.12,
                    "raw_score": 0.6,
                    "lexicon_words": ["great", "bad"],
                    "lexicon_valences": [3.1, -2.5],
                }
            ],
        )
    at = _app(monkeypatch, tmp_path, run=str(run))
    assert not at.exception
    html = _all_html(at)
    assert "lfp-completion" in html
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html or "&lt;img" in html


def test_overview_shows_rl_curves_pairs_and_word_shifts(monkeypatch, quick_run):
    at = _app(monkeypatch, quick_run.parent, run=str(quick_run))
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert "Tuned reward (held-out)" in metrics and metrics["Gain over base"].startswith(("+", "-"))
    assert any("95% CI [" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 2  # reward histogram + RL curves
    html = _all_html(at)
    assert html.count('class="lfp-pair"') == 8
    tables = [d.value for d in at.dataframe]
    assert any(set(t.columns) == {"word", "base_count", "tuned_count", "valence"} for t in tables)


def test_word_shift_toggle_keeps_only_lexicon_words(monkeypatch, quick_run):
    at = _app(monkeypatch, quick_run.parent, run=str(quick_run))
    at.toggle(key="ov_lexicon_only").set_value(True).run()
    assert not at.exception
    tables = [d.value for d in at.dataframe if "valence" in d.value.columns and "word" in d.value.columns]
    assert tables and all((t.valence != 0).all() for t in tables)
