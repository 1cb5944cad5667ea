"""The sequence-level probe on synthetic data: it recovers a reward the pooled features carry (and its
controls do not), finds nothing where they carry none (CI covering 0), and never splits a prompt."""

from __future__ import annotations

import numpy as np
import pytest

from lfp_core import seqprobes
from lfp_core.probes import ProbeDataError


def _data(signal: bool, n_prompts: int = 120, per_prompt: int = 4, dim: int = 60, seed: int = 0):
    """Completions grouped by prompt; sparse non-negative features (like pooled SAE codes); the reward is a
    linear read-out of a few features plus a prompt effect and noise (``signal``) or independent of them."""
    rng = np.random.default_rng(seed)
    prompts = np.repeat(np.arange(n_prompts), per_prompt)
    X = np.maximum(rng.normal(size=(len(prompts), dim)), 0.0) * (rng.random((len(prompts), dim)) < 0.6)
    prompt_effect = rng.normal(size=n_prompts)[prompts]
    if signal:
        y = X[:, :5] @ np.array([2.0, -1.5, 1.0, 1.0, -1.0]) + 0.2 * prompt_effect + 0.2 * rng.normal(size=len(prompts))
    else:
        y = prompt_effect + rng.normal(size=len(prompts))
    return X, y, prompts


def test_prompt_split_keeps_every_prompt_on_one_side():
    prompts = np.repeat(np.arange(50), [1 + (i % 4) for i in range(50)])
    test = seqprobes.prompt_split(prompts, seed=3)
    assert not set(prompts[test]) & set(prompts[~test])
    assert len(set(prompts[test])) == 10  # 20% of the prompts
    assert np.array_equal(test, seqprobes.prompt_split(prompts, seed=3))  # seeded
    with pytest.raises(ProbeDataError, match="only 9 prompts .* at least 10"):
        seqprobes.prompt_split(np.arange(9), seed=0)


def test_bootstrap_resamples_whole_prompts():
    prompts = np.repeat(np.arange(6), 3)
    for rows in seqprobes.prompt_resamples(prompts, seed=0, n_boot=20):
        drawn = prompts[rows]
        assert len(rows) == len(prompts)
        assert all((drawn == p).sum() % 3 == 0 for p in np.unique(drawn))  # a prompt comes with all 3 rows


def test_probe_recovers_a_reward_the_pooled_features_carry():
    X, y, prompts = _data(signal=True)
    test = seqprobes.prompt_split(prompts, seed=0)
    length = (X > 0).sum(1, keepdims=True).astype(float)
    res, pred, _ = seqprobes.sequence_probe(X, y, prompts, test, seed=0, inputs={"length": length}, policy=prompts % 2)
    p = res["probe"]
    assert p["rho"] > 0.85 and p["p"] < 1e-10 and p["r2"] > 0.8 and p["lo"] > 0.8
    assert p["lo"] <= p["rho"] <= p["hi"] and p["n"] == int(test.sum()) and p["n_prompts"] == 24
    assert abs(res["shuffled"]["rho"]) < 0.25 and res["shuffled"]["lo"] < 0 < res["shuffled"]["hi"]
    assert res["untrained"]["r2"] is None and abs(res["untrained"]["rho"]) < p["lo"]  # no fit: chance alignment only
    vs = res["inputs"]["length"]["vs_probe"]
    assert vs["diff"] > 0.3 and vs["lo"] > 0  # the probe beats the length baseline, with its paired CI
    lg = res["logistic"]
    assert lg["acc"] > 0.75 and lg["diff_lo"] > 0 and lg["lo"] <= lg["acc"] <= lg["hi"]
    assert set(res["by_policy"]) == {"0", "1"}
    assert len(pred) == test.sum()


def test_probe_finds_nothing_where_the_features_carry_no_reward():
    X, y, prompts = _data(signal=False, seed=1)
    test = seqprobes.prompt_split(prompts, seed=0)
    res, _, _ = seqprobes.sequence_probe(X, y, prompts, test, seed=0)
    p = res["probe"]
    assert abs(p["rho"]) < 0.25 and p["lo"] < 0 < p["hi"]
    assert p["r2"] < 0.05  # out of sample: no better than the held-out mean
    lg = res["logistic"]
    assert lg["diff_lo"] < 0 < lg["diff_hi"] or lg["diff"] <= 0


def test_tuned_minus_base_difference_has_a_paired_ci():
    X, y, prompts = _data(signal=True, seed=2)
    test = seqprobes.prompt_split(prompts, seed=0)
    noise = np.random.default_rng(5).normal(size=X.shape)
    _, good, _ = seqprobes.sequence_probe(X, y, prompts, test, seed=0, logistic=False)
    _, bad, _ = seqprobes.sequence_probe(noise, y, prompts, test, seed=0, logistic=False)
    d = seqprobes.rho_difference(good, bad, y[test], prompts[test], seed=0)
    assert d["diff"] == pytest.approx(d["rho_a"] - d["rho_b"]) and d["lo"] > 0
    same = seqprobes.rho_difference(good, good, y[test], prompts[test], seed=0)
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0


def test_vectorised_bootstrap_equals_scipy_on_each_resample():
    """The resampled ρ (mid-ranks weighted by row counts) equals scipy's spearmanr of the concatenated resample,
    ties included."""
    from scipy import stats

    rng = np.random.default_rng(4)
    prompts = np.repeat(np.arange(15), rng.integers(1, 5, 15))
    a = rng.integers(0, 6, len(prompts)).astype(float)  # many ties
    b = a + rng.normal(size=len(prompts))
    fast = seqprobes._spearman_resampled(a, b, seqprobes.prompt_weights(prompts, seed=2, n_boot=50))
    slow = [stats.spearmanr(a[i], b[i]).statistic for i in seqprobes.prompt_resamples(prompts, seed=2, n_boot=50)]
    assert np.allclose(fast, slow, equal_nan=True)


def test_too_few_prompts_for_a_sequence_reward_is_refused_before_anything_is_written(tmp_path, capsys):
    from lfp_core import precompute
    from lfp_core.settings import preset_config

    seqprobes.check_sequence_probe(preset_config("quick", n_eval_prompts=5))  # VADER: the token probe runs
    with pytest.raises(ProbeDataError, match="at least 10 held-out prompts, n_eval_prompts is 5"):
        seqprobes.check_sequence_probe(preset_config("quick", n_eval_prompts=5, reward="python:m:f"))
    out = tmp_path / "run"
    argv = ["--preset", "quick", "--out", str(out), "--set", "reward=python:m:f", "--set", "n_eval_prompts=5"]
    assert precompute.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --reward python:m:f is probed by the sequence probe") and not out.exists()


def test_schema_5_run_gains_the_sequence_table_in_place(tmp_path):
    from lfp_core.store import SCHEMA_VERSION, RunReader, RunWriter, SchemaVersionError
    from lfp_core.store.testing import legacy_run

    row = {"role": "tuned", "layer": 1, "feature": 3, "weight": 0.5, "mean_act": 1.0, "importance": 0.5, "rank": 0}
    run = legacy_run(tmp_path / "v5", 5, {"probe_features": [row]})
    with pytest.raises(SchemaVersionError, match="version 5.*Upgrade it in place"):
        RunReader(run)
    RunWriter(run)
    r = RunReader(run)
    assert r.schema_version() == SCHEMA_VERSION and r.probe_sequences("tuned").empty
    assert r.probe_features("tuned").weight.tolist() == [0.5]  # what the run held is kept
