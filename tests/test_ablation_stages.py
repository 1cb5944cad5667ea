"""The ablation, reward_model and attribution stages on the quick run: what they store is consistent
with itself and with the report."""

from __future__ import annotations

import numpy as np

from lfp_core import reward
from lfp_core.report import build_report, format_report
from lfp_core.store import RunReader
from lfp_core.store.summaries import AblationSummary, AttributionSummary, RewardModelSummary


def _summary(run, kind):
    return RunReader(run).summary(kind)


def test_ablation_sets_are_paired_size_matched_and_reported(quick_run):
    from lfp_core.ablation import compare_with_controls

    r = RunReader(quick_run)
    sets = r.ablation_sets().set_index("set_id")
    d = _summary(quick_run, AblationSummary)
    n = len(r.ablation_prefixes())
    rank_n = d.rank_n
    assert n == 64 and rank_n == min(256, n) and d.n_random >= 20
    assert (sets[sets.kind != "random"].n == n).all() and (sets[sets.kind == "random"].n == rank_n).all()
    assert sets.loc["baseline", "diff"] == 0 and sets.loc["baseline", "size"] == 0
    assert "labelled" not in sets.index  # split by sign into labelled_pos / labelled_neg
    rewards = r.ablation_rewards().pivot(index="prefix_id", columns="set_id", values="reward").sort_index()
    diffs = rewards.sub(rewards["baseline"], axis=0).iloc[:rank_n]
    tested = [t for t in ("probe_top", "labelled_pos", "labelled_neg") if t in sets.index]
    assert "probe_top" in tested
    for name in tested:
        t = sets.loc[name]
        assert t.hypothesis == ("raise" if name == "labelled_neg" else "lower")
        controls = sets[sets.control_of == name]
        assert len(controls) == t.n_random == d.sets[name].n_random >= 20
        layers_t = sorted(t.layers)
        for c in controls.itertuples():
            assert sorted(c.layers) == layers_t  # same number of features per layer
            assert not set(zip(c.layers, c.features)) & set(zip(t.layers, t.features))
        # the test, recomputed from the stored completions: every set on the same first rank_n prefixes
        cmp = compare_with_controls(diffs[name].to_numpy(), diffs[list(controls.index)].to_numpy().T, t.hypothesis)
        assert np.isclose(t.p_rank, cmp["p_rank"]) and np.isclose(t.rank_diff, diffs[name].mean())
        assert 1 / (len(controls) + 1) <= t.p_rank <= 1 and d.sets[name].p_min == 1 / (len(controls) + 1)
        assert t.random_lo <= t.random_median <= t.random_hi
        # matched in activation mass: the controls are closer to the tested set's mass than the layer's features
        ratio = abs(np.log(controls["mass"].median() / t["mass"]))
        assert ratio < abs(np.log(sets.loc["all", "mass"] / t["mass"])) or ratio < np.log(1.5)
    labels = r.labels("tuned")
    rel = labels[labels.relevant.fillna(False).astype(bool)]
    for name, sign in (("labelled_pos", 1), ("labelled_neg", -1)):
        expected = {(int(a), int(b)) for a, b, w in zip(rel.layer, rel.feature, rel.probe_weight) if w * sign > 0}
        got = set(zip(sets.loc[name].layers, sets.loc[name].features)) if name in sets.index else set()
        assert got <= expected and (got or not expected)
    assert sets.loc["probe_top", "size"] == 8  # quick preset's ablation_k
    comp = r.ablation_completions(["baseline", "probe_top"], limit=n)
    assert len(comp) == 2 * n
    assert all(abs(x - reward.reward(t)) < 1e-9 for x, t in zip(comp.reward, comp.text))
    base = comp[comp.set_id == "baseline"].reward.to_numpy()
    after = comp[comp.set_id == "probe_top"].reward.to_numpy()
    assert np.isclose(sets.loc["probe_top", "diff"], (after - base).mean())
    assert d.n_completions == int(sets.n.sum())
    rep = build_report(str(quick_run))
    ab = rep["ablation"]
    assert ab["reward_before"] == sets.loc["baseline", "after"] and ab["reward_after"] == sets.loc["probe_top", "after"]
    assert np.isclose(ab["random_after_mean"], sets[sets.control_of == "probe_top"].after.mean())
    line = next(x for x in format_report(rep).splitlines() if x.startswith("ablation probe_top"))
    assert "hypothesis: zeroing them lowers the reward" in line and f"N={d.n_random}" in line and "rank p" in line


def test_reward_model_pairs_accuracy_and_saes(quick_run):
    r = RunReader(quick_run)
    pairs = r.rm_pairs()
    assert (pairs.chosen_oracle > pairs.rejected_oracle).all()
    held = pairs[pairs.split == "eval"]
    assert held.chosen_pm.notna().all() and pairs[pairs.split == "train"].chosen_pm.isna().all()
    d = _summary(quick_run, RewardModelSummary)
    assert d.pair_acc["n"] == len(held)
    assert np.isclose(d.pair_acc["acc"], (held.chosen_pm > held.rejected_pm).mean())
    saes = r.saes()
    rm = saes[saes.role == "rm"]
    assert len(rm) == 2 and (rm.kind == "rm").all() and rm.hook_name.str.endswith("hook_resid_post").all()
    assert (rm.fvu < 1).all() and (rm.l0 > 0).all()
    rep = build_report(str(quick_run))
    assert rep["reward_model"]["pair_acc"] == d.pair_acc["acc"]
    assert all(s["role"] != "rm" for s in rep["saes"])  # reported under reward_model, not with the policy's


def test_attribution_ranks_verifies_and_reports(quick_run):
    r = RunReader(quick_run)
    d = _summary(quick_run, AttributionSummary)
    for target in ("pm", "policy"):
        a = r.attribution(target)
        assert list(a["rank"]) == list(range(len(a)))
        assert (np.diff(a.estimate_abs.to_numpy()) <= 1e-12).all()
        res = d.target(target)
        verified = a[a.true_effect.notna()]
        assert set(verified["rank"]) >= set(range(10)) and res["top_k"] == 10
        assert verified.verified.isin(["top", "random", "both"]).all() and verified.estimate_path.notna().all()
        n_layers = a.layer.nunique()
        assert (a.verified.isin(["random", "both"])).sum() == res["n_random"] == n_layers * res["random_k"]
        assert (a.estimate == a.estimate_atp).all()
        pts = r.attribution_points(target)
        n = res["n_texts"]
        sums = pts.groupby(["layer", "feature"]).true_effect.sum()  # points only where the feature fires
        for x in verified.itertuples():
            assert np.isclose(sums.get((x.layer, x.feature), 0.0) / n, x.true_effect)
        assert set(res["checks"]) == {"top", "random"} and set(res["checks"]["random"]) == {"atp", "path"}
        assert -1 <= res["spearman_top"]["rho"] <= 1 and "recall" in res["checks"]["random"]["atp"]
        top_tokens = a[a["rank"] < 10].top_tokens
        assert top_tokens.notna().all() and top_tokens.map(len).gt(0).any()  # what the ranked features fire on
        assert a.top_tokens.notna().sum() < len(a)  # only the ranked head is described
    rep = build_report(str(quick_run))
    assert rep["reward_model"]["atp_true_spearman"] == d.pm["spearman_top"]["rho"]
    text = format_report(rep)
    assert "random 16 per layer" in text and "path (2-step IG on the feature's axis)" in text
    dis = d.disagreement
    assert dis["n_disagree"] == int((r.rm_pairs("eval").eval("chosen_pm < rejected_pm")).sum())
