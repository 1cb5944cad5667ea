"""Localisation by component patching (lfp_core.localise): the gain fractions' intervals cover planted
fractions at their nominal rate, are refused when there is no gain, and on a planted fine-tune (one MLP
changed) the patched MLP carries the whole gain and the untouched components none, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfp_core.localise import component_patching, gain_fractions
from lfp_core.models import load_model, to_hooked

FRACS = {"a": 0.6, "b": 0.3, "c": 0.1, "d": 0.0}


def _synthetic(rng, n=200, gain=1.0, noise=0.3):
    r_base = rng.normal(0.0, 1.0, n)
    r_tuned = r_base + gain + rng.normal(0.0, noise, n)
    patched = {k: r_tuned - f * (r_tuned - r_base) + rng.normal(0.0, noise, n) for k, f in FRACS.items()}
    return r_tuned, r_base, patched


def test_intervals_cover_the_planted_fractions():
    rng = np.random.default_rng(0)
    hits = {k: 0 for k in FRACS} | {"sum": 0}
    reps = 100
    for rep in range(reps):
        t, b, p = _synthetic(rng)
        out = gain_fractions(t, b, p, n_boot=400, seed=rep)
        assert out["defined"] and out["why"] is None
        for k, f in FRACS.items():
            c = out["components"][k]
            hits[k] += c["frac_lo"] <= f <= c["frac_hi"]
            assert c["frac"] == pytest.approx((t.mean() - p[k].mean()) / (t.mean() - b.mean()))
        hits["sum"] += out["sum_frac"]["lo"] <= sum(FRACS.values()) <= out["sum_frac"]["hi"]
    # nominal 95%; with 100 repetitions a true coverage of 95% falls below 88% with probability < 1%
    assert all(h >= 88 for h in hits.values()), hits
    # and the intervals separate fractions that differ: 0.6 and 0.3 on one draw
    t, b, p = _synthetic(np.random.default_rng(1))
    out = gain_fractions(t, b, p, n_boot=2000, seed=0)
    assert out["components"]["a"]["frac_lo"] > out["components"]["b"]["frac_hi"]


def test_no_gain_no_fractions():
    rng = np.random.default_rng(2)
    t, b, p = _synthetic(rng, gain=0.0, noise=1.0)
    out = gain_fractions(t, b, p, n_boot=1000, seed=0, r_all=b.copy())
    assert not out["defined"] and "includes 0" in out["why"]
    assert out["total_gain"]["lo"] < 0 < out["total_gain"]["hi"]
    for c in out["components"].values():
        assert c["frac"] is None and c["frac_lo"] is None
        assert c["drop_lo"] <= c["drop"] <= c["drop_hi"]  # the drop in reward units is still reported
    assert out["sum_frac"]["mean"] is None and out["all_patched"]["frac"] is None
    with pytest.raises(ValueError, match="not paired"):
        gain_fractions(t, b[:-1], p)


def test_the_changed_mlp_carries_the_whole_gain():
    """tuned = base + a bias on block 1's MLP output towards one token; reward = how often it is said."""
    lm = load_model("demo")
    base, tuned = (to_hooked(lm.hf, lm.tokenizer, lm.spec) for _ in range(2))
    target = 1234
    with torch.no_grad():
        u = base.W_U[:, target] * base.ln_final.w
        tuned.blocks[1].mlp.b_out += 20.0 * (u - u.mean()) / u.norm()
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, 4000, (12, 5), generator=g).tolist()

    def reward(_prompts, completions):
        return np.array([c.count(target) for c in completions], float)

    comps = ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    out = component_patching(base, tuned, prompts, 0, 8, list(range(100, 112)), reward, comps, n_boot=500)
    r = out["rewards"]
    assert out["defined"] and out["total_gain"]["lo"] > 0
    assert r["blocks.1.hook_mlp_out"] == r["base"] == r["all"]  # patched back to the base, token for token
    assert out["completions"]["blocks.1.hook_mlp_out"] == out["completions"]["base"]
    assert r["blocks.0.hook_attn_out"] == r["blocks.1.hook_attn_out"] == r["tuned"]  # unchanged components
    c = out["components"]
    assert c["blocks.1.hook_mlp_out"]["frac"] == c["blocks.1.hook_mlp_out"]["frac_lo"] == 1.0
    assert c["blocks.0.hook_attn_out"]["frac"] == c["blocks.0.hook_attn_out"]["frac_hi"] == 0.0
    assert out["all_patched"]["frac"] == 1.0 and out["all_patched"]["vs_base"]["mean"] == 0.0
