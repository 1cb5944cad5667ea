"""The Overview, Layers, Feature browser, Feature and Labels pages on a tiny run built through the
store's writer (tests/tiny_run.py), so they are checked in the fast tier, without a pipeline run:
each page shows what the run holds, and its widgets filter, sort and page as stored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lfp_core import evaluation
from lfp_core.pipeline import stage_names
from lfp_core.report import build_report, format_report
from lfp_core.safetext import md_code, md_text
from lfp_core.store import RunReader
from lfp_core.store.summaries import LabelsSummary
from tests.helpers import open_page
from tests.tiny_run import BUILD_ORDER, VOCAB, tiny_run


def _html(at) -> str:
    return "\n".join(str(h.proto.body) for h in at.get("html"))


def _markdown(at) -> str:
    return " ".join(m.value for m in at.markdown)


def test_overview_shows_the_runs_figures_and_the_stages_left(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/overview.py", run=tiny)
    assert not at.exception and at.title[0].value == "Run · tiny"
    r = RunReader(tiny)
    pairs = r.paired_completions()
    gain = evaluation.paired_difference(pairs.base_reward.to_numpy(), pairs.tuned_reward.to_numpy())
    base = r.reward_summary("base")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"] == "1.23 M" and metrics["Layers × d_model"] == "3 × 16"
    assert metrics["Vocabulary"] == str(len(VOCAB))
    assert metrics["Base reward (mean ± s.e.)"] == f"{base['mean']:+.3f} ± {base['se']:.3f}"
    assert metrics["Gain over base"] == f"{gain['mean']:+.3f}"
    assert metrics["KL(tuned ‖ base) per token"] == "0.0123"
    stages = at.dataframe[0].value
    assert list(stages.stage) == stage_names()
    done = set(BUILD_ORDER)
    assert dict(zip(stages.stage, stages.status)) == {s: "done" if s in done else "pending" for s in stage_names()}
    pending = [s for s in stage_names() if s not in done]
    assert f"Stages not finished: {', '.join(pending)}." in at.warning[0].value
    assert "--preset quick" in at.warning[0].value
    assert at.code[0].value == format_report(build_report(str(tiny)))
    html = _html(at)
    assert html.count('class="lfp-completion"') == 12  # all 12 base completions (at most 30 are shown)
    assert html.count('class="lfp-pair"') == 8  # the 8 pairs with the largest gain
    assert any(f"95% CI [{gain['ci_low']:+.3f}, {gain['ci_high']:+.3f}]" in c.value for c in at.caption)


def test_overview_orders_completions_and_filters_word_shifts(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/overview.py", run=tiny)
    rewards = RunReader(tiny).completions("base").reward
    first = _html(at).split('class="lfp-completion"')[1]
    assert f"[{rewards.max():+.2f}]" in first  # highest reward first by default
    at.radio(key="ov_order").set_value("lowest reward").run()
    assert f"[{rewards.min():+.2f}]" in _html(at).split('class="lfp-completion"')[1]

    def shifts():
        return pd.concat([d.value for d in at.dataframe if {"word", "valence"} <= set(d.value.columns)])

    assert (shifts().valence == 0).any()  # the tiny run's neutral words move too
    at.toggle(key="ov_lexicon_only").set_value(True).run()
    assert not at.exception and len(shifts()) and (shifts().valence != 0).all()


def test_layers_page_with_divergence_but_no_saes(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/layers.py", run=tiny)
    assert not at.exception
    assert "Selected layers (★): **1, 2**" in _markdown(at) and "MLP-output (1 − cos)" in _markdown(at)
    assert len(at.dataframe[0].value) == 3
    assert "No SAEs yet: the `saes` stage has not finished" in at.info[0].value


def test_browser_filters_sorts_searches_and_pages(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/browser.py", run=tiny)
    assert not at.exception
    assert "**160** of 160 features match · page 1 of 4" in at.caption[0].value
    table = at.dataframe[0].value
    assert len(table) == 50 and list(table.probe_rank) == sorted(table.probe_rank) and table.probe_rank.iloc[0] == 1
    at.selectbox(key="fb_role").set_value("base").run()
    at.selectbox(key="fb_layer").set_value("2").run()
    at.selectbox(key="fb_sort").set_value("density").run()  # switches to descending
    t = at.dataframe[0].value
    stored = RunReader(tiny).features("base", 2).sort_values(["density", "feature"], ascending=[False, True])
    assert set(t.role) == {"base"} and set(t.layer) == {2} and "**40** of 160" in at.caption[0].value
    assert list(t.feature) == list(stored.feature)
    at.number_input(key="fb_min_density").set_value(0.05).run()
    t = at.dataframe[0].value
    assert len(t) == int((stored.density >= 0.05).sum()) and (t.density >= 0.05).all()


def test_browser_search_reward_related_filter_and_paging(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/browser.py", run=tiny)
    first = at.dataframe[0].value
    at.number_input(key="fb_page").set_value(4).run()
    last = at.dataframe[0].value
    assert not at.exception and "page 4 of 4" in at.caption[0].value and len(last) == 10
    assert not set(zip(first.role, first.layer, first.feature)) & set(zip(last.role, last.layer, last.feature))
    assert last.probe_rank.isna().all()  # the 16 dead features have no probe weight: last
    at.number_input(key="fb_page").set_value(1).run()
    at.text_input(key="fb_search").set_value("WONDERFUL").run()
    t = at.dataframe[0].value
    assert len(t) and all("wonderful" in (s + str(lab)).lower() for s, lab in zip(t.top_tokens, t.label))
    at.text_input(key="fb_search").set_value("x' OR 1=1; DROP TABLE features; --").run()
    assert not at.exception and "No feature matches" in at.info[0].value
    at.text_input(key="fb_search").set_value("").run()
    at.toggle(key="fb_relevant").set_value(True).run()
    labels = RunReader(tiny).labels("tuned")
    t = at.dataframe[0].value
    assert len(t) == int(labels.relevant.sum()) > 0 and t.label.str.startswith("fires most on").all()


def test_feature_page_shows_the_stored_feature_and_its_label(monkeypatch, tiny):
    r = RunReader(tiny)
    lab = r.labels("tuned").query("relevant").iloc[0]
    layer, fid = int(lab.layer), int(lab.feature)
    stored = r.feature("tuned", layer, fid)
    at = open_page(monkeypatch, tiny.parent, "views/feature.py", run=tiny, role="tuned", layer=layer, feature=fid)
    assert not at.exception and not at.error
    assert at.subheader[0].value == f"tuned · layer {layer} · feature {fid}"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Density"] == f"{stored['density']:.4%}" and metrics["Max activation"] == f"{stored['max_act']:.3f}"
    assert metrics["Fires on tuned-policy text"] == f"{stored['freq_tuned_text']:.2%}"
    text = _markdown(at)
    # the labeller's name and explanation are the run's text: shown as text (markdown-escaped)
    assert f"**Label** ({md_text(lab.labeller)}): {md_text(lab.explanation)} · **related to the reward**" in text
    assert f"weight **{stored['probe_weight']:+.4f}**, attribution rank **{int(stored['probe_rank']) + 1}**" in text
    assert text.count("class='lfp-context'") == 3 + 3  # 3 top contexts, 3 interval samples
    assert f"feature={stored['neighbours'][0]}" in text
    at.button(key="feat_next").click().run()
    assert at.subheader[0].value.endswith(f"feature {fid + 1}")
    at.radio(key="feat_role").set_value("base").run()
    assert not at.exception and at.subheader[0].value == f"base · layer {layer} · feature {fid + 1}"


def test_a_dead_feature_says_it_never_fired(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/feature.py", run=tiny, role="tuned", layer=1, feature=9)
    assert not at.exception and not at.error
    assert any("never fired" in i.value for i in at.info)
    assert any("No label yet" in c.value for c in at.caption)
    assert "Probe" not in _markdown(at)  # no probe weight for a feature that never fires


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"feature": "abc"}, "must be a whole number"),
        ({"feature": "45"}, "out of range: the tuned model's layer-1 SAE has 40 features (0–39)"),
        ({"feature": "-1"}, "out of range"),
        ({"layer": "x"}, "must be a whole number"),
        ({"layer": "0"}, "not in this run"),
        ({"role": "<script>"}, "not in this run"),
    ],
)
def test_feature_page_bad_links_get_messages(monkeypatch, tiny, params, expected):
    at = open_page(monkeypatch, tiny.parent, "views/feature.py", run=tiny, **{"role": "tuned", "layer": 1, **params})
    assert not at.exception and expected in at.error[0].value


def test_labels_page_shows_labels_agreement_and_filters(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/labels.py", run=tiny)
    assert not at.exception
    r = RunReader(tiny)
    labels = r.labels("tuned")
    n_rel = int(labels.relevant.sum())
    n_both = int((labels.relevant & (labels.selection == "probe_top")).sum())
    rewards = r.completions("tuned").reward
    assert "offline" in at.info[0].value and "not an LLM" in at.info[0].value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Labelled features"] == "16" and metrics["Reward-related"] == str(n_rel)
    assert metrics["Overlap with probe top"] == f"{n_both} of {n_rel}"
    says = _markdown(at)  # what each figure tests, as the offline labeller computes it
    assert f"the {r.summary(LabelsSummary).n_score_docs} documents of the activation corpus that hold none" in says
    assert "consistency, not independent validation" in says and "never from a document among" in says
    freq = at.dataframe[0].value
    assert list(freq.set) == [
        "all features",
        "labelled",
        "labeller: reward-related",
        "labeller: not related",
        "probe top",
    ]
    assert set(freq["high-reward completions"]) == {int((rewards >= np.quantile(rewards, 0.75)).sum())}
    table = at.dataframe[1].value
    assert len(table) == 16 and list(table.probe_rank) == sorted(table.probe_rank)  # probe-top first
    for which, n in (("reward-related", n_rel), ("not related", 16 - n_rel)):
        at.radio(key="lb_filter").set_value(which).run()
        shown = at.dataframe[1].value
        assert len(shown) == n and (shown.relevant == (which == "reward-related")).all()
    at.radio(key="lb_filter").set_value("all").run()
    word = labels.explanation.iloc[0].split("'")[1]
    at.text_input(key="lb_search").set_value(word.upper()).run()
    shown = at.dataframe[1].value
    assert len(shown) == int(labels.explanation.str.contains(f"'{word}'").sum())


def test_pages_of_a_run_built_only_to_the_base_samples(monkeypatch, tmp_path):
    run = tiny_run(tmp_path / "early", until="base_samples")
    at = open_page(monkeypatch, tmp_path, "views/overview.py", run=run)
    assert not at.exception
    assert any("has not been fine-tuned yet" in i.value for i in at.info)
    assert _html(at).count('class="lfp-completion"') == 12
    for page, message in (
        ("views/browser.py", "`features` stage has not finished"),
        ("views/labels.py", "`labels` stage has not finished"),
        ("views/layers.py", "No divergence yet"),
        ("views/diffing.py", "`null_rlhf` stage has not finished"),
    ):
        at = open_page(monkeypatch, tmp_path, page, run=run)
        assert not at.exception and message in at.info[0].value, page


def test_overview_and_report_say_which_reward_the_run_used_and_what_it_skipped(monkeypatch, tmp_path):
    import json

    from lfp_core.stages import stage_names
    from lfp_core.store import RunWriter
    from lfp_core.store.summaries import BaseSamplesSummary, summary_dict

    run = tiny_run(tmp_path / "plugged", until="rl_eval")
    w = RunWriter(run)
    spec = "classifier:org/sentiment"
    w.set_config("quick", json.dumps({"model": "demo", "task": "vader", "reward": spec}))
    why = "the lexicon words and valences (raw score: the reward): needs the VADER lexicon's per-word valences"
    name = "classifier sentiment (POSITIVE logit)"
    detail = summary_dict(RunReader(run).summary(BaseSamplesSummary))
    detail.update(reward_info={"spec": spec, "name": name, "kind": "sequence"}, not_applicable={"lexicon_words": why})
    w.mark_stage("base_samples", stage_names("vader").index("base_samples"), "tiny", "done", detail=detail)
    at = open_page(monkeypatch, run.parent, "views/overview.py", run=run)
    assert not at.exception
    assert any(f"reward **{md_text(name)}** ({md_code(spec)})" in c.value for c in at.caption)
    assert any(f"**{md_text('base_samples')}**, {md_text('lexicon_words')}: {md_text(why)}" in i.value for i in at.info)
    rep = build_report(str(run))
    assert rep["run"]["reward"] == {"spec": spec, "name": name, "kind": "sequence"}
    assert rep["not_applicable"] == {"base_samples": {"lexicon_words": why}}
    text = format_report(rep)
    assert f"reward: {name} (--reward {spec}; sequence)" in text
    assert f"not applicable (base_samples, lexicon_words): {why}" in text


def test_a_default_run_names_the_vader_reward(monkeypatch, tiny):
    at = open_page(monkeypatch, tiny.parent, "views/overview.py", run=tiny)
    assert any("reward **VADER lexicon** (`vader`)" in c.value for c in at.caption)
    assert build_report(str(tiny))["run"]["reward"] == {"spec": "vader", "name": "VADER lexicon", "kind": "lexicon"}
