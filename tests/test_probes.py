"""Probes: τ on numbers, leak-free word split, ridge with CV on the training split only, exact
attributions, logistic accuracy with its CI, and the probe stage on the quick run."""

from __future__ import annotations

import numpy as np
import pytest

from lfp_core import probes


def test_kendall_is_computed_on_numbers_not_strings():
    vals = np.array([-2.5, -0.5, 2.0, 10.0, 3.0])
    assert probes.kendall(vals, vals)["tau"] == pytest.approx(1.0)
    # the published notebooks' bug: as strings "10.0" sorts before "2.0", which breaks the ranking
    strs = vals.astype(str)
    assert sorted(strs) != [str(v) for v in sorted(vals)]
    with pytest.raises(TypeError, match="needs numbers"):
        probes.kendall(strs, vals)


def test_word_split_never_puts_a_test_word_in_training():
    words = np.array(["good", "bad", "great", "awful", "nice"] * 40 + ["love"] * 3, dtype=object)
    test = probes.word_split(words, seed=0)
    assert test.any() and (~test).any()
    assert not set(words[test]) & set(words[~test])


def test_ridge_recovers_a_linear_signal_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 20))
    w = rng.normal(size=20)
    y = X @ w + 0.1 * rng.normal(size=600)
    model = probes.fit_ridge(X[:500], y[:500])
    assert np.corrcoef(model.predict(X[500:]), y[500:])[0, 1] > 0.99
    idx, contrib = probes.contributions(model, X[500:501], top=20)
    assert contrib.sum() + model[-1].intercept_ == pytest.approx(model.predict(X[500:501])[0])
    bad = X.copy()
    bad[3, 7] = np.nan
    with pytest.raises(probes.ProbeDataError, match="data point 3, feature column 7"):
        probes.fit_ridge(bad, y)
    with pytest.raises(probes.ProbeDataError, match="constant"):
        probes.fit_ridge(X, np.ones(600))


def test_rescale_maps_the_10th_and_90th_percentiles_onto_the_lexicon_range():
    p = np.linspace(0, 1, 101)
    s = probes.rescale(p, -3.9, 3.4)
    assert s[10] == pytest.approx(-3.9) and s[90] == pytest.approx(3.4)


def test_logistic_probe_reports_accuracy_ci_and_majority():
    rng = np.random.default_rng(1)
    labels = np.array(["pos"] * 300 + ["neg"] * 100)
    X = rng.normal(size=(400, 5)) + (labels == "pos")[:, None] * 2.0
    r = probes.logistic_probe(X, labels, seed=0)
    assert r["acc"] > 0.9 and r["ci_low"] < r["acc"] < r["ci_high"]
    assert 0.6 < r["majority_acc"] < 0.9
    with pytest.raises(probes.ProbeDataError, match="two classes"):
        probes.logistic_probe(X, np.array(["pos"] * 400), seed=0)


@pytest.fixture(scope="module")
def probe_stage(quick_run):
    from lfp_core.store import RunReader

    r = RunReader(quick_run)
    return r, {s.name: s for s in r.stages()}["probes"]


def test_probe_stage_reports_both_splits_controls_and_irm(probe_stage, quick_run):
    from lfp_core.report import build_report

    r, st = probe_stage
    assert st.status == "done"
    for role in ("tuned", "base"):
        d = st.summary.role(role)
        for t in (d.tau_occurrence, d.tau_word, d.tau_baseline, d.tau_shuffled):
            assert -1 <= t["tau"] <= 1 and 0 <= t["p"] <= 1 and t["n_words"] > 10
        assert d.tau_occurrence["tau"] > 0.2 and d.tau_occurrence["p"] < 1e-3  # the signal is there
        assert abs(d.tau_shuffled["tau"]) < 0.2
        assert 0 <= d.sign_acc_pos <= 1 and 0 <= d.sign_acc_neg <= 1
        assert d.irm["n"] == len(r.completions("tuned"))
    words = r.probe_words("tuned")
    test_words = set(words[words.split == "word"].word)
    toks = r.probe_tokens("tuned")
    assert not test_words & set(toks[toks.word_split == "train"].word)  # no test word in the word-split training set
    rep = build_report(str(quick_run))["probe"]
    assert {
        "tau_occurrence",
        "tau_word",
        "tau_baseline",
        "tau_shuffled",
        "sign_acc_pos",
        "sign_acc_neg",
        "irm",
        "logistic",
        "pca_var_ratio",
    } <= set(rep)
    lg = rep["logistic"]["imdb"]
    assert lg["ci_low"] <= lg["acc"] <= lg["ci_high"] and 0 < lg["raw_acc"] <= 1 and len(rep["pca_var_ratio"]) == 2


def test_attributions_cover_every_feature_and_sum_to_the_prediction(probe_stage):
    r, st = probe_stage
    feats = r.probe_features("tuned", limit=None)
    assert len(feats) == 512 * len(st.summary.layers) and sorted(feats["rank"]) == list(range(len(feats)))
    assert set(feats.layer) == set(st.summary.layers)
    top = r.probe_features("tuned", limit=5)
    assert list(top["rank"]) == [0, 1, 2, 3, 4] and top.importance.is_monotonic_decreasing


def test_probe_uses_each_models_own_saes(quick_run, tmp_path):
    """Base activations must go through the base model's SAEs: a base SAE path pointing at a tuned
    SAE is refused."""
    import shutil

    from lfp_core.config import RunConfig
    from lfp_core.pipeline import Context
    from lfp_core.pipeline.probes import role_features
    from lfp_core.store import RunReader, RunWriter
    from lfp_core.store.summaries import ProbesSummary
    from lfp_core.store.testing import set_sae_paths

    run = tmp_path / "mixed"
    shutil.copytree(quick_run, run)
    layers = RunReader(run).summary(ProbesSummary).layers
    w = RunWriter(run)
    main = w.reader().saes("main")
    set_sae_paths(
        run, {i: p.replace("base-", "tuned-") for i, p in zip(main.sae_id, main.path) if i.startswith("base-")}
    )
    cfg = RunConfig.from_dict(RunReader(run).run_info()["config"])
    ctx = Context(run=cfg.run, writer=w)
    assert role_features(ctx, "tuned", layers, np.arange(5)).shape == (5, 512 * len(layers))
    with pytest.raises(RuntimeError, match="not the base model"):
        role_features(ctx, "base", layers, np.arange(5))


def test_too_few_lexicon_words_says_how_many(quick_run, tmp_path):
    import shutil

    from lfp_core.config import RunConfig, preset_config
    from lfp_core.precompute import run_pipeline
    from lfp_core.store import RunReader

    run = tmp_path / "few"
    shutil.copytree(quick_run, run)
    data_dir = RunConfig.from_dict(RunReader(run).run_info()["config"]).run.data_dir
    with pytest.raises(probes.ProbeDataError, match=r"only \d+ lexicon-word positions .* raise sae_corpus_docs"):
        run_pipeline(preset_config("quick", data_dir=data_dir, probe_min_points=10**9), run)


def test_contrastive_swaps_are_neutral_or_opposite_single_tokens():
    from lfp_core.models import load_model
    from lfp_core.reward import lexicon

    tok = load_model("demo").tokenizer
    lex = lexicon()
    neutral, opposite = probes.swap_tables(tok, lex)
    assert len(neutral) > 100 and len(opposite) > 100
    for t, n in list(neutral.items())[:300]:
        a, b = tok.decode([t]), tok.decode([n])
        assert a.startswith(" ") == b.startswith(" ") and b.strip().lower() not in lex
    for t, o in list(opposite.items())[:300]:
        assert lex[tok.decode([t]).strip().lower()] * lex[tok.decode([o]).strip().lower()] < 0
    assert probes.swap_tables(tok, lex) == (neutral, opposite)  # deterministic


def test_rows_by_doc_equals_a_scan_per_document():
    from lfp_core.pipeline.probes import rows_by_doc

    row_doc = np.random.default_rng(0).integers(0, 50, size=2_000)
    docs = np.array([7, 3, 49, 60, 3])  # 60 has no rows; repeats allowed
    got = rows_by_doc(row_doc, docs)
    for d, rows in zip(docs, got):
        assert np.array_equal(rows, np.nonzero(row_doc == d)[0])


def test_fast_gcv_ridge_picks_sklearn_ridgecvs_penalty_and_coefficients():
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lfp_core.probes import RIDGE_ALPHAS, fit_ridge

    rng = np.random.default_rng(3)
    for n, p, noise in ((400, 60, 0.5), (300, 120, 3.0), (500, 40, 0.05)):
        X = (np.abs(rng.normal(size=(n, p))) * (rng.random((n, p)) < 0.3)).astype(np.float32)
        y = X[:, :10] @ rng.normal(size=10) + noise * rng.normal(size=n)
        ours = fit_ridge(X, y)
        ref = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(X, y)
        assert ours[-1].alpha_ == ref[-1].alpha_
        assert np.allclose(ours[-1].coef_, ref[-1].coef_, rtol=1e-4, atol=1e-6)
        assert np.allclose(ours.predict(X), ref.predict(X), rtol=1e-4, atol=1e-5)
