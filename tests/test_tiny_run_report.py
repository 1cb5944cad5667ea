"""The report and the store's readers on a tiny run built through the store's writer
(tests/tiny_run.py): what they return is what the run holds, computed from its rows, with no
pipeline run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfp_core import evaluation, report
from lfp_core.pipeline import stage_names
from lfp_core.store import RunReader
from tests.tiny_run import BUILD_ORDER, VOCAB, tiny_run


def test_report_headline_figures_come_from_the_runs_rows(tiny):
    r = RunReader(tiny)
    rep = report.build_report(str(tiny))
    assert rep["run"]["name"] == "tiny" and rep["run"]["task"] == "vader"
    assert rep["model"] == {"name": "tiny-test-model", "n_params": 1_234_567, "n_layers": 3, "d_model": 16}
    assert list(rep["stages"]) == stage_names()
    assert rep["stages"] == {s: "done" if s in BUILD_ORDER else "pending" for s in stage_names()}
    base = r.completions("base").reward.to_numpy()
    assert rep["base_reward"]["n"] == 12 and rep["base_reward"]["mean"] == pytest.approx(base.mean())
    assert rep["base_reward"]["se"] == pytest.approx(base.std(ddof=1) / np.sqrt(12))
    pairs = r.paired_completions()
    gain = evaluation.paired_difference(pairs.base_reward.to_numpy(), pairs.tuned_reward.to_numpy())
    assert rep["rlhf"]["difference"] == pytest.approx(gain) and rep["rlhf"]["kl_per_token"] == 0.0123
    div = r.layer_divergence()
    assert rep["divergence"]["param"] == pytest.approx(list(div.param))
    assert rep["divergence"]["selected_layers"] == [1, 2] == list(div.layer[div.selected])
    labels = r.labels("tuned")
    assert rep["labels"]["n_labelled"] == len(labels) == 16
    assert rep["labels"]["n_relevant"] == int(labels.relevant.sum())
    assert rep["labels"]["overlap"]["n"] == int((labels.relevant & (labels.selection == "probe_top")).sum())
    assert not {"saes", "probe", "ablation", "reward_model"} & set(rep)  # stages that did not run: no figures


def test_report_cli_prints_the_text_and_the_json(tiny, capsys):
    assert report.main([str(tiny)]) == 0
    text = capsys.readouterr().out
    rep = report.build_report(str(tiny))
    assert text == report.format_report(rep) + "\n"
    d = rep["rlhf"]["difference"]
    assert f"gain {d['mean']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}" in text
    assert "selected layers (by activation): [1, 2]" in text and "labels (offline" in text
    assert report.main([str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(rep))


def test_report_of_a_run_that_stopped_after_the_model(tmp_path, capsys):
    run = tiny_run(tmp_path / "early", until="model")
    rep = report.build_report(str(run))
    assert rep["base_reward"] is None and rep["stages"]["model"] == "done"
    assert {v for k, v in rep["stages"].items() if k != "model"} == {"pending"}
    assert report.main([str(run)]) == 0
    assert "base-model reward: not computed yet" in capsys.readouterr().out


def test_completion_readers_pair_and_order_the_rows(tiny):
    r = RunReader(tiny)
    base, tuned = r.completions("base"), r.completions("tuned")
    assert list(base.prompt_id) == list(range(12)) and list(base.prompt) == list(r.prompts("eval").text)
    assert list(r.completions("base", order="-reward").reward) == sorted(base.reward, reverse=True)
    assert list(r.completions("base", order="reward", limit=3).reward) == sorted(base.reward)[:3]
    assert (base.n_new.to_numpy() == tuned.n_new.to_numpy()).all() and (base.seed == tuned.seed).all()
    pairs = r.paired_completions()
    assert list(pairs.base) == list(base.completion) and list(pairs.tuned) == list(tuned.completion)
    assert list(pairs.tuned_reward) == list(tuned.reward) and len(r.paired_completions(limit=5)) == 5
    assert r.reward_summary("tuned")["mean"] == pytest.approx(tuned.reward.mean())
    assert len(r.prompts("train")) == 6 and len(r.prompts()) == 18


def test_word_shifts_are_raised_then_lowered_by_size(tiny):
    shifts = RunReader(tiny).word_shifts()
    raised, lowered = shifts[shifts.direction == "raised"], shifts[shifts.direction == "lowered"]
    assert (
        len(raised) and len(lowered) and list(shifts.direction) == ["raised"] * len(raised) + ["lowered"] * len(lowered)
    )
    assert (raised.delta > 0).all() and (lowered.delta < 0).all()
    assert list(raised.delta.abs()) == sorted(raised.delta.abs(), reverse=True)
    assert (raised.tuned_count - raised.base_count == raised.delta).all()


def test_feature_readers(tiny):
    r = RunReader(tiny)
    layers = r.feature_layers()
    assert list(zip(layers.role, layers.layer, layers.n_features)) == [
        ("tuned", 1, 40),
        ("tuned", 2, 40),
        ("base", 1, 40),
        ("base", 2, 40),
    ]
    firing = r.firing_features("tuned")
    assert sorted(firing) == [1, 2] and firing[1] == [f for f in range(40) if f % 10 != 9]
    stats = r.features("tuned", 1)
    assert list(stats.feature) == list(range(40)) and (stats.n_fired[stats.feature % 10 == 9] == 0).all()
    f = r.feature("tuned", 1, 0)
    assert f["probe_rank"] is not None and f["density"] == f["n_fired"] / 5_000
    top, iv = r.feature_examples("tuned", 1, 0, "top"), r.feature_examples("tuned", 1, 0, "interval")
    assert list(top["rank"]) == [0, 1, 2] and list(top.act) == sorted(top.act, reverse=True)
    assert list(iv.interval) == [9, 5, 2]  # highest interval first
    assert all(t[c] in f["top_tokens"] for t, c in zip(top.tokens, top.center))
    assert r.feature_examples("tuned", 1, 9, "top").empty and r.feature("tuned", 1, 40) is None
    assert r.token_strings([0, len(VOCAB) - 1, 999]) == [" " + VOCAB[0], " " + VOCAB[-1], "<999>"]


def test_feature_table_pages_through_every_feature_once(tiny):
    r = RunReader(tiny)
    seen = []
    for offset in range(0, 160, 50):
        page, n = r.feature_table(sort="probe_rank", limit=50, offset=offset)
        assert n == 160
        seen += list(zip(page.role, page.layer, page.feature))
    assert len(seen) == len(set(seen)) == 160
    ranked, _ = r.feature_table(role="tuned", sort="probe_rank", limit=200)
    fired = ranked.probe_rank.notna()
    assert list(ranked.probe_rank[fired]) == list(range(int(fired.sum())))  # ranks 0.. first, dead features last
    assert not fired[: int(fired.sum())].eq(False).any()


def test_labels_reader_joins_probe_rank_and_density(tiny):
    r = RunReader(tiny)
    labels = r.labels("tuned")
    assert list(labels.probe_rank) == sorted(labels.probe_rank)
    assert (labels.selection[:8] == "probe_top").all() and list(labels.probe_rank[:8]) == list(range(8))
    for x in labels.itertuples():
        f = r.feature("tuned", x.layer, x.feature)
        assert x.density == f["density"] and x.explanation == f["explanation"] and x.probe_rank == f["probe_rank"]
    assert r.labels("base").empty
