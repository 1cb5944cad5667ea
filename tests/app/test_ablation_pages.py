"""Ablation lab and Reward model pages on the quick run: the stored figures as the stages recorded them,
the live lab and the text scorer answering, bad input refused by message, a run without the stages told
which command computes them."""

from __future__ import annotations

from lfp_core.store import RunReader, RunWriter
from lfp_core.store.summaries import AblationSummary, AttributionSummary, RewardModelSummary
from tests.helpers import open_page


def _table(at, column):
    """The page's dataframe that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _summary(run, kind):
    return RunReader(run).summary(kind)


def test_ablation_lab_shows_the_stored_experiment_and_runs_live(monkeypatch, quick_run):
    at = open_page(monkeypatch, quick_run.parent, "views/ablation_lab.py", run=quick_run)
    assert not at.exception
    d = _summary(quick_run, AblationSummary)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Reward, clean policy"] == f"{d.reward_before:.3f}"
    top = d.sets["probe_top"]
    assert metrics["Matched random sets"] == f"{top.random_median:+.3f}"
    assert metrics["Rank p (one-sided)"] == f"{d.p_rank:.3g}"
    sets = _table(at, "kind")
    assert {"baseline", "probe_top", "all"} <= set(sets.set_id) and (sets.kind == "random").sum() >= 20
    tests = _table(at, "rank p").set_index("set")
    assert "probe_top" in tests.index and set(tests.index) <= {"probe_top", "labelled_pos", "labelled_neg"}
    assert tests.loc["probe_top", "hypothesis"] == "zeroing lowers the reward"
    assert tests.loc["probe_top", "N random"] == top.n_random >= 20 and tests.loc["probe_top", "rank p"] == top.p_rank
    assert len(at.multiselect(key="al_features").value) > 0  # preset: probe top 8
    at.text_area[0].set_value("The acting in this film was").run()
    at.button(key="al_run").click().run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert "Mean reward, clean" in metrics
    out = _table(at, "reward (ablated)")
    assert len(out) == 8 and list(out.columns) == ["clean", "reward (clean)", "ablated", "reward (ablated)"]


def test_two_sessions_running_the_live_lab_at_once_each_get_their_own_results(monkeypatch, quick_run):
    """The two sessions share one cached engine (one model); each must get what it gets alone."""
    import threading

    sessions = []
    for text, pick in (
        ("The acting in this film was", slice(0, 8)),
        ("I did not like the ending, it", slice(-4, None)),
    ):
        at = open_page(monkeypatch, quick_run.parent, "views/ablation_lab.py", run=quick_run)
        features = at.multiselect(key="al_features")
        features.set_value(list(features.options)[pick]).run()
        at.text_area[0].set_value(text).run()
        sessions.append(at)
    alone = []
    for at in sessions:
        at.button(key="al_run").click().run()
        assert not at.exception and not at.error
        alone.append(_table(at, "reward (ablated)"))
    assert not alone[0].equals(alone[1])
    wrong: list[str] = []

    def click(i: int) -> None:
        for k in range(3):
            at = sessions[i].button(key="al_run").click().run()
            if at.exception or at.error or not _table(at, "reward (ablated)").equals(alone[i]):
                wrong.append(f"session {i}, round {k}")

    threads = [threading.Thread(target=click, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_ablation_lab_refuses_an_empty_prompt_and_warns_on_truncation(monkeypatch, quick_run):
    at = open_page(monkeypatch, quick_run.parent, "views/ablation_lab.py", run=quick_run)
    at.text_area[0].set_value("   ").run()
    at.button(key="al_run").click().run()
    assert at.error and "empty" in at.error[0].value
    at.text_area[0].set_value("word " * 1200).run()
    at.slider(key="al_n").set_value(1).run()
    at.button(key="al_run").click().run()
    warnings = [w.value for w in at.warning]
    # 6,000 characters: the first 4,000 are used (a notice), and still more tokens than the context holds
    assert not at.exception and any("only its first 4,000 are used" in w for w in warnings)
    assert any("tokens were dropped" in w for w in warnings)


def test_reward_model_page_shows_accuracy_attribution_and_scores_text(monkeypatch, quick_run):
    at = open_page(monkeypatch, quick_run.parent, "views/reward_model.py", run=quick_run)
    assert not at.exception
    d = _summary(quick_run, RewardModelSummary)
    a = _summary(quick_run, AttributionSummary)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Held-out pair accuracy"] == f"{d.pair_acc['acc']:.3f}"
    top_k = a.pm["top_k"]
    for key in ("pm", "policy"):  # AtP and the path estimate, on the top features and the random sample
        if key == "policy":
            at.radio(key="rm_target").set_value("policy's expected next-token valence").run()
            assert not at.exception
        checks = _table(at, "median relative error")
        rows = a.check_rows(key)
        assert len(checks) == len(rows) == 4 and list(checks["Spearman ρ"]) == [r["rho"] for r in rows]
        assert {"AtP (gradient at the clean point)"} < set(checks.estimator)
        rank = _table(at, "mean true change")
        assert list(rank["rank"]) == sorted(rank["rank"]) and rank["mean true change"].head(top_k).notna().all()
    at.radio(key="rm_feats").set_value("the random sample").run()
    sample = _table(at, "mean true change")
    assert not at.exception and sample["checked as"].isin(["random", "both"]).all()
    assert sample["mean true change"].notna().all() and sample["mean path estimate"].notna().all()
    at.radio(key="rm_est").set_value("path").run()
    assert not at.exception
    at.button(key="rm_score").click().run()
    metrics = {m.label: m.value for m in at.metric}
    assert not at.exception and "Reward" in metrics and "VADER oracle" in metrics
    at.text_area(key="rm_text").set_value("").run()
    at.button(key="rm_score").click().run()
    assert at.error and "empty" in at.error[0].value


def test_pages_before_the_stages(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    RunWriter(run).set_config("quick", '{"model": "demo", "task": "vader"}')
    at = open_page(monkeypatch, tmp_path, "views/reward_model.py", run=run)
    assert not at.exception and "`reward_model` stage has not finished" in at.info[0].value
    at = open_page(monkeypatch, tmp_path, "views/ablation_lab.py", run=run)
    assert not at.exception and "`features` stage has not finished" in at.info[0].value
