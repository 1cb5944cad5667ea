"""Feature browser and Feature page: filters, sorting, search and links; a feature's statistics and
contexts as stored; deep links with bad parameters; escaping of tokens; partial and deleted runs."""

from __future__ import annotations

import shutil

import pandas as pd

from lfp_core import viz
from lfp_core.store import RunReader, RunWriter
from tests.helpers import open_page as _page


def _text(at) -> str:
    return " ".join(m.value for m in at.markdown)


def test_browser_lists_filters_sorts_and_links(monkeypatch, quick_run):
    at = _page(monkeypatch, quick_run.parent, "views/browser.py", run=quick_run)
    assert not at.exception
    r = RunReader(quick_run)
    total = int(r.feature_layers().n_features.sum())
    table = at.dataframe[0].value
    assert len(table) == 50 and f"of {total:,} features match" in at.caption[0].value
    # default sort: probe attribution rank, best first, per model
    assert list(table.probe_rank[:3]) == sorted(table.probe_rank[:3])
    assert table.open.iloc[0].startswith("feature?run=") and "&layer=" in table.open.iloc[0]
    # filter by model and layer, sort by density descending
    layer = int(r.feature_layers().layer.iloc[0])
    at.selectbox(key="fb_role").set_value("tuned").run()
    at.selectbox(key="fb_layer").set_value(str(layer)).run()
    at.selectbox(key="fb_sort").set_value("density").run()
    t = at.dataframe[0].value
    assert set(t.role) == {"tuned"} and set(t.layer) == {layer}
    stored = r.features("tuned", layer).sort_values("density", ascending=False)
    assert list(t.density[:5]) == list(stored.density[:5])
    # search over top tokens: every row holds the needle; a needle with SQL in it is only text
    token = next(
        tok for toks in r.feature_table(limit=10**6)[0].top_tokens if toks is not None for tok in toks if tok.strip()
    )
    at.text_input(key="fb_search").set_value(token.strip()).run()
    t = at.dataframe[0].value
    assert len(t) and all(token.strip().lower() in s.lower() for s in t.top_tokens)
    at.text_input(key="fb_search").set_value("x' OR 1=1; DROP TABLE features; --").run()
    assert not at.exception and "No feature matches" in at.info[0].value
    assert len(RunReader(quick_run).feature_layers())  # still there


def test_browser_pages_through_results(monkeypatch, quick_run):
    at = _page(monkeypatch, quick_run.parent, "views/browser.py", run=quick_run)
    first = at.dataframe[0].value
    at.number_input(key="fb_page").set_value(2).run()
    second = at.dataframe[0].value
    assert not at.exception and "page 2 of" in at.caption[0].value
    assert not set(zip(first.role, first.layer, first.feature)) & set(zip(second.role, second.layer, second.feature))


def test_feature_page_shows_the_stored_feature(monkeypatch, quick_run):
    r = RunReader(quick_run)
    role, layer, fid = max(
        (
            (x.role, int(x.layer), int(f.feature), int(f.n_fired))
            for x in r.feature_layers().itertuples()
            for f in r.features(x.role, int(x.layer)).itertuples()
        ),
        key=lambda t: t[3],
    )[:3]
    stored = r.feature(role, layer, fid)
    at = _page(monkeypatch, quick_run.parent, "views/feature.py", run=quick_run, role=role, layer=layer, feature=fid)
    assert not at.exception and not at.error
    assert f"{role} · layer {layer} · feature {fid}" in at.subheader[0].value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Density"] == f"{stored['density']:.4%}" and metrics["Max activation"] == f"{stored['max_act']:.3f}"
    html = _text(at)
    top = r.feature_examples(role, layer, fid, "top")
    assert html.count("class='lfp-context'") >= len(top) > 0
    assert f"title='{top.acts.iloc[0][int(top.center.iloc[0])]:.3f}'" in html  # activation on hover
    assert "Nearest decoder directions" in html and f"feature={int(stored['neighbours'][0])}" in html
    if pd.notna(stored["probe_weight"]):
        assert f"weight **{stored['probe_weight']:+.4f}**" in html
    assert len(at.get("plotly_chart")) == 1
    # next / prev move one feature and keep the link in step
    at.button(key="feat_next").click().run()
    assert f"feature {fid + 1}" in at.subheader[0].value and at.query_params["feature"] in (
        str(fid + 1),
        [str(fid + 1)],
    )
    at.button(key="feat_prev").click().run()
    assert f"feature {fid}" in at.subheader[0].value
    # the other model
    other = "base" if role == "tuned" else "tuned"
    at.radio(key="feat_role").set_value(other).run()
    assert not at.exception and at.subheader[0].value.startswith(other)


def test_feature_page_bad_links_get_messages(monkeypatch, quick_run):
    r = RunReader(quick_run)
    role, layer, n = r.feature_layers().iloc[0]
    for params, expected in (
        ({"feature": "abc"}, "must be a whole number"),
        (
            {"feature": str(int(n) + 5)},
            f"out of range: the {role} model's layer-{int(layer)} SAE has {int(n)} features",
        ),
        ({"feature": "-1"}, "out of range"),
        ({"layer": "x"}, "must be a whole number"),
        ({"layer": "99"}, "not in this run"),
        ({"role": "<script>"}, "not in this run"),
    ):
        at = _page(
            monkeypatch,
            quick_run.parent,
            "views/feature.py",
            run=quick_run,
            **{"role": role, "layer": int(layer), **params},
        )
        assert not at.exception, params
        assert expected in at.error[0].value, (params, at.error[0].value)


def test_feature_pages_before_the_features_stage(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    RunWriter(run).set_config("quick", '{"model": "demo", "task": "vader"}')
    for page in ("views/browser.py", "views/feature.py"):
        at = _page(monkeypatch, tmp_path, page, run=run)
        assert not at.exception and "`features` stage has not finished" in at.info[0].value


def test_deleted_run_gets_a_message_and_other_runs_still_work(monkeypatch, quick_run, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    doomed = runs / "doomed"
    shutil.copytree(quick_run, doomed, ignore=shutil.ignore_patterns("artifacts"))
    shutil.copytree(quick_run, runs / "kept", ignore=shutil.ignore_patterns("artifacts"))
    at = _page(monkeypatch, runs, "views/browser.py", run="doomed")
    assert not at.exception and at.dataframe
    shutil.rmtree(doomed)
    at.run()
    assert not at.exception and "does not exist" in at.error[0].value
    at.selectbox(key="lfp_run_select").set_value("kept").run()
    assert not at.exception and not at.error and at.dataframe


def test_activation_context_escapes_tokens():
    out = viz.activation_context_html(
        ["<script>alert(1)</script>", " <img src=x onerror=alert(1)>", "\n"], [0.0, 2.0, 1.0], center=1, vmax=2.0
    )
    assert "<script>" not in out and "<img" not in out and "&lt;script&gt;" in out and "⏎" in out
    assert "title='2.000'" in out and "outline:2px" in out
