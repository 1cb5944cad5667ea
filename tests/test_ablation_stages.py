"""The ablation, reward_model and attribution stages on the quick run: what they store is consistent
with itself and with the report."""

from __future__ import annotations

import numpy as np

from lfp_core import reward
from lfp_core.report import build_report
from lfp_core.store import RunReader
from lfp_core.store.summaries import AttributionSummary, RewardModelSummary


def _summary(run, kind):
    return RunReader(run).summary(kind)


def test_ablation_sets_are_paired_size_matched_and_reported(quick_run):
    r = RunReader(quick_run)
    sets = r.ablation_sets().set_index("set_id")
    n = len(r.ablation_prefixes())
    assert n == 64 and (sets.n == n).all()
    assert sets.loc["baseline", "diff"] == 0 and sets.loc["baseline", "size"] == 0
    for tested in ("probe_top", "labelled"):
        if tested not in sets.index:
            continue
        t = sets.loc[tested]
        controls = sets[sets.control_of == tested]
        assert len(controls) >= 5
        layers_t = sorted(t.layers)
        for c in controls.itertuples():
            assert sorted(c.layers) == layers_t  # same number of features per layer
            assert not set(zip(c.layers, c.features)) & set(zip(t.layers, t.features))
        assert 0 < t.p <= 1 and 0 < t.p_rank <= 1
    assert sets.loc["probe_top", "size"] == 8  # quick preset's ablation_k
    comp = r.ablation_completions(["baseline", "probe_top"], limit=n)
    assert len(comp) == 2 * n
    assert all(abs(x - reward.reward(t)) < 1e-9 for x, t in zip(comp.reward, comp.text))
    base = comp[comp.set_id == "baseline"].reward.to_numpy()
    after = comp[comp.set_id == "probe_top"].reward.to_numpy()
    assert np.isclose(sets.loc["probe_top", "diff"], (after - base).mean())
    rep = build_report(str(quick_run))["ablation"]
    assert (
        rep["reward_before"] == sets.loc["baseline", "after"] and rep["reward_after"] == sets.loc["probe_top", "after"]
    )
    assert np.isclose(rep["random_after_mean"], sets[sets.control_of == "probe_top"].after.mean())


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
        verified = a[a.true_effect.notna()]
        assert len(verified) == d.target(target)["top_k"] == 10 and set(verified["rank"]) == set(range(10))
        pts = r.attribution_points(target)
        assert len(pts) == 10 * d.target(target)["n_texts"]
        means = pts.groupby(["layer", "feature"]).true_effect.mean()
        for x in verified.itertuples():
            assert np.isclose(means[(x.layer, x.feature)], x.true_effect)
        assert -1 <= d.target(target)["spearman_top"]["rho"] <= 1
        top_tokens = a[a["rank"] < 10].top_tokens
        assert top_tokens.notna().all() and top_tokens.map(len).gt(0).any()  # what the ranked features fire on
        assert a.top_tokens.notna().sum() < len(a)  # only the ranked head is described
    assert build_report(str(quick_run))["reward_model"]["atp_true_spearman"] == d.pm["spearman_top"]["rho"]
    dis = d.disagreement
    assert dis["n_disagree"] == int((r.rm_pairs("eval").eval("chosen_pm < rejected_pm")).sum())
