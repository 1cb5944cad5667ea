"""Token scores and Separation pages: they show the probe's figures, drive their widgets, escape
tokens, and explain a run whose probe stage has not run."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from lfp_core import viz
from lfp_core.config import REPO_ROOT
from lfp_core.safetext import md_text
from lfp_core.store import RunReader, RunWriter
from lfp_core.store.summaries import ProbesSummary
from tests.helpers import open_page

APP = str(REPO_ROOT / "app.py")


def _page(monkeypatch, runs, run, page) -> AppTest:
    return open_page(monkeypatch, runs, page, run=run)


def test_token_scores_page(monkeypatch, quick_run):
    at = _page(monkeypatch, quick_run.parent, quick_run, "views/token_scores.py")
    assert not at.exception
    detail = RunReader(quick_run).summary(ProbesSummary).tuned
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["τ, occurrence split"] == f"{detail.tau_occurrence['tau']:.3f}"
    assert metrics["τ, word split"] == f"{detail.tau_word['tau']:.3f}"
    assert len(at.get("plotly_chart")) == 3
    html = " ".join(m.value for m in at.markdown)
    assert "lfp-tokens" in html and "fill: probe prediction" in html
    # another document, another scored word, the base model
    at.selectbox(key="probe_doc").select_index(1).run()
    at.selectbox(key="probe_word").select_index(0).run()
    assert not at.exception and "Top contributing features" in " ".join(m.value for m in at.markdown)
    at.radio(key="probe_role").set_value("base").run()
    base = RunReader(quick_run).summary(ProbesSummary).base
    assert {m.label: m.value for m in at.metric}["τ, occurrence split"] == f"{base.tau_occurrence['tau']:.3f}"


def test_separation_page(monkeypatch, quick_run):
    at = _page(monkeypatch, quick_run.parent, quick_run, "views/separation.py")
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table.model) == {"tuned", "base"} and set(table.task) == {"imdb", "hh", "toxicity"}
    assert (
        (table["95% CI low"] <= table["accuracy (SAE features)"])
        & (table["accuracy (SAE features)"] <= table["95% CI high"])
    ).all()
    assert len(at.get("plotly_chart")) == 1
    assert md_text("toxic/non-toxic") in at.radio(key="sep_task").options  # shown escaped, selected by its value
    at.radio(key="sep_task").set_value("toxicity").run()
    at.radio(key="sep_role").set_value("base").run()
    assert not at.exception and len(at.get("plotly_chart")) == 1


def test_probe_pages_before_the_probe_stage(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    RunWriter(run).set_config("quick", '{"model": "demo", "task": "vader"}')
    for page in ("views/token_scores.py", "views/separation.py"):
        at = _page(monkeypatch, tmp_path, run, page)
        assert not at.exception and "`probes` stage has not finished" in at.info[0].value


def test_token_scores_html_escapes_tokens():
    out = viz.token_scores_html(
        ["<script>alert(1)</script>", " <img src=x onerror=alert(1)>"], [None, 2.0], [None, 1.5]
    )
    assert "<script>" not in out and "<img" not in out and "&lt;script&gt;" in out
