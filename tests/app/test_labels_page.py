"""Labels page: the offline labeller's results on the quick run, its filters and search, the agreement
table; a run without the labels stage gets the command."""

from __future__ import annotations

from lfp_core.store import RunReader, RunWriter
from lfp_core.store.summaries import LabelsSummary
from tests.helpers import open_page


def _page(monkeypatch, runs, run):
    return open_page(monkeypatch, runs, "views/labels.py", run=run)


def test_labels_page_shows_the_offline_labels_and_agreement(monkeypatch, quick_run):
    at = _page(monkeypatch, quick_run.parent, quick_run)
    assert not at.exception
    r = RunReader(quick_run)
    labels = r.labels("tuned")
    detail = r.summary(LabelsSummary)
    assert "offline" in at.info[0].value and "not an LLM" in at.info[0].value  # never passed off as an LLM
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Labelled features"] == str(len(labels)) == str(detail.n_labelled)
    freq = at.dataframe[0].value
    assert list(freq.set) == [
        "all features",
        "labelled",
        "labeller: reward-related",
        "labeller: not related",
        "probe top",
    ]
    table = at.dataframe[1].value
    assert len(table) == len(labels) and table.page.str.startswith("feature?run=").all()
    at.radio(key="lb_filter").set_value("reward-related").run()
    assert not at.exception
    shown = at.dataframe[1].value if len(at.dataframe) > 1 else None
    n_rel = int(labels.relevant.fillna(False).sum())
    assert (shown is None and n_rel == 0) or (len(shown) == n_rel and shown.relevant.all())
    word = labels.explanation.iloc[0].split("'")[1]
    at.radio(key="lb_filter").set_value("all").run()
    at.text_input(key="lb_search").set_value(word).run()
    assert all(word.lower() in e.lower() for e in at.dataframe[1].value.explanation)


def test_labels_page_before_the_stage(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    RunWriter(run).set_config("quick", '{"model": "demo", "task": "vader"}')
    at = _page(monkeypatch, tmp_path, run)
    assert not at.exception and "`labels` stage has not finished" in at.info[0].value
