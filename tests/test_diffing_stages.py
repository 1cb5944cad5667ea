"""The model-diffing stages on the quick preset (issue 19): what a researcher sees after a real run — the null
control trained, crosscoders and difference SAEs per pair and layer with consistent class counts, component
patching whose fractions are computed from the stored gain, the difference lens and the causal checks against
>= 19 matched random sets."""

from __future__ import annotations

import numpy as np
import pytest

from lfp_core.store import RunReader
from lfp_core.store.summaries import CrosscodersSummary, DiffCausalSummary, LocalisationSummary, NullSummary


def test_the_null_control_is_the_rlhf_recipe_with_shuffled_rewards(quick_run):
    r = RunReader(quick_run)
    n = r.summary(NullSummary)
    assert n is not None and n.recipe == "shuffled"
    assert n.steps == 60  # the rlhf stage's steps (quick preset)
    assert (quick_run / "artifacts" / "null_policy" / "config.json").exists()


def test_every_pair_and_layer_has_a_crosscoder_and_a_difference_sae_with_consistent_counts(quick_run):
    r = RunReader(quick_run)
    s = r.summary(CrosscodersSummary)
    assert s is not None and s.pairs == ["tuned", "null"]
    dicts = r.diff_dictionaries()
    layers = sorted(s.layers or [])
    for kind in ("crosscoder", "diff_sae"):
        got = dicts[dicts.kind == kind]
        assert sorted(zip(got.pair, got.layer)) == sorted((p, layer) for p in ("tuned", "null") for layer in layers)
    for row in dicts[dicts.kind == "crosscoder"].itertuples():
        lat = r.diff_latents(row.dict_id)
        assert len(lat) == row.d_sae
        counts = lat["class"].value_counts().to_dict()
        assert counts.get("robust tuned-only", 0) == row.n_robust
        assert counts.get("tuned-only", 0) == row.n_tuned_only
        assert sum(counts.values()) == row.d_sae
        assert s.counts[row.pair][str(row.layer)].robust == row.n_robust
        tuned_only = lat[lat["class"].isin(["tuned-only", "robust tuned-only"])]
        assert (tuned_only.rel_norm > 0.9).all()
        robust = lat[lat["class"] == "robust tuned-only"]
        assert ((robust.nu_eps < 0.3) & (robust.nu_r < 0.3)).all()
        assert 0 < row.fvu_base < 1.5 and 0 < row.fvu_other < 1.5
        # every latent has a Feature page (the features tables' rows under the dictionary's role)
        assert len(r.features(row.role, row.layer)) == row.d_sae


def test_patching_fractions_are_the_stored_rewards_share_of_the_gain(quick_run):
    r = RunReader(quick_run)
    s = r.summary(LocalisationSummary)
    assert s is not None and s.gain is not None and s.n_prefixes == 16  # the quick preset's diff_prefixes
    p = r.diff_patching()
    tuned = p[p.pair == "tuned"]
    clean = float(tuned[tuned.kind == "clean"].reward.iloc[0])
    base = float(tuned[tuned.kind == "base"].reward.iloc[0])
    assert s.gain.mean == pytest.approx(clean - base)
    comps = tuned[tuned.kind.isin(["attn", "mlp"])]
    assert len(comps) == 2 * 4  # every layer's attention and MLP of the demo model
    if s.gain_defined:
        for row in comps.itertuples():
            assert row.frac == pytest.approx((clean - row.reward) / (clean - base))
            assert row.frac_lo <= row.frac <= row.frac_hi
    else:
        assert comps.frac.isna().all() and "includes 0" in s.not_applicable["gain fractions"]
    lens = r.diff_lens()
    assert sorted(set(lens.pair)) == ["null", "tuned"] and set(lens.layer) == {0, 1, 2, 3}
    assert (lens.n_random >= 19).all() and lens.steer_p_rank.between(1 / 20, 1).all()
    assert lens.promoted.map(len).eq(20).all()


def test_causal_checks_rank_each_tested_set_among_its_matched_random_sets(quick_run):
    r = RunReader(quick_run)
    s = r.summary(DiffCausalSummary)
    assert s is not None and s.n_random >= 19
    c = r.diff_causal()
    tested = c[c.kind == "tested"]
    assert len(tested) > 0
    for row in tested.itertuples():
        ctrl = c[c.control_of == row.set_id]
        assert len(ctrl) == row.n_random >= 19
        assert (ctrl["size"] == row.size).all()
        # the exact one-sided rank p of the tested set's mean change among the controls'
        sign = 1.0 if row.hypothesis == "lower" else -1.0
        p = (1 + np.sum(sign * ctrl["diff"].to_numpy() <= sign * row.diff)) / (1 + len(ctrl))
        assert row.p_rank == pytest.approx(p)
        assert row.diff_lo <= row.diff <= row.diff_hi
