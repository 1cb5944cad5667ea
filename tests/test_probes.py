"""Probes: τ on numbers, leak-free word split, ridge with CV on the training split only, exact
attributions, logistic accuracy with its CI, and the probe stage on the quick run."""

from __future__ import annotations

from collections import Counter

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
    train_stems = set(probes.stems(toks[toks.word_split == "train"].word.to_numpy()))
    assert not set(probes.stems(np.array(sorted(test_words), dtype=object))) & train_stems  # nor a test word's stem
    assert st.summary.word_split_by == "stem" and "grouped by stem" in st.summary.penalty_cv["word"]
    for split, x in st.summary.tau_difference.items():
        assert x["lo"] < x["hi"] and x["n_words"] == st.summary.tuned.tau(split)["n_words"]
        assert x["diff"] == pytest.approx(st.summary.tuned.tau(split)["tau"] - st.summary.base.tau(split)["tau"])
    assert {"sae_selected", "token_embedding", "raw_selected", "diff_means_raw", "raw_all_layers"} <= set(
        st.summary.tuned.inputs
    )
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


# --- issue 17: honest probe figures (stem split, grouped penalty search, baselines, fitted contrastive) -----
FAMILIES = [
    ["love", "loved", "loving", "loves"],
    ["hate", "hated", "hates", "hating"],
    ["enjoy", "enjoyed", "enjoying", "enjoys"],
    ["bore", "bored", "boring", "bores"],
    ["disappoint", "disappointed", "disappointing", "disappoints"],
    ["amaze", "amazed", "amazing", "amazes"],
    ["annoy", "annoyed", "annoying", "annoys"],
    ["excite", "excited", "exciting", "excites"],
    ["impress", "impressed", "impressive", "impresses"],
    ["worry", "worried", "worrying"],
    ["thank", "thanked", "thanks"],
    ["hurt", "hurting", "hurts"],
    ["kill", "killed", "killing", "kills"],
    ["win", "winning", "wins"],
    ["fail", "failed", "failing", "fails"],
    ["like", "liked", "likes"],
    ["help", "helped", "helping", "helps"],
    ["admire", "admired", "admires"],
    ["praise", "praised", "praises"],
    ["cry", "cried", "crying"],
    ["good"],
    ["bad"],
    ["great"],
    ["awful"],
    ["nice"],
]


def test_word_split_puts_no_stem_in_both_train_and_test():
    """Issue 17: a plain word split put 'loved' in test with 'love' in training (70% of test words shared a
    stem with a training word). The split now groups words by stem. Fails on 52d4a5a: its split is per word,
    and every seed below puts some stem on both sides."""
    from nltk.stem.snowball import SnowballStemmer

    stem = np.vectorize(SnowballStemmer("english").stem, otypes=[object])  # an oracle independent of probes.py
    words = np.array([w for fam in FAMILIES for w in fam for _ in range(3)], dtype=object)
    n_words = len({w for fam in FAMILIES for w in fam})
    for seed in range(5):
        test = probes.word_split(words, seed=seed)
        assert test.any() and (~test).any()
        assert not set(words[test]) & set(words[~test])
        assert not set(stem(words[test])) & set(stem(words[~test])), f"seed {seed}: a stem on both sides"
        assert 0.1 <= len(set(words[test])) / n_words <= 0.35
    assert probes.stem_overlap(words[~test], words[test]) == 0.0
    assert probes.stems(np.array(["loved", "loving", "lovely"], dtype=object)).tolist() == ["love"] * 3


def _memorisable(seed: int, n_words: int = 60, per_word: int = 8):
    """Rows of ``n_words`` words; each word has a random vector (which a small penalty can memorise the word's
    value with) and one feature that carries a generalisable part of its value."""
    rng = np.random.default_rng(seed)
    wid = np.repeat(np.arange(n_words), per_word)
    E, gen, noise = rng.normal(size=(n_words, 40)), rng.normal(size=n_words), rng.normal(size=n_words)
    X = np.hstack([E[wid], gen[wid, None]]) + 0.3 * rng.normal(size=(len(wid), 41))
    y = (gen + noise)[wid] + 0.3 * rng.normal(size=len(wid))
    return X, y, np.array([f"w{i}" for i in wid], dtype=object)


def test_penalty_search_is_grouped_by_word():
    """Issue 17: leave-one-out over rows rewards memorising a word (its other rows stay in training), so it
    picks a penalty that fits word identity; CV grouped by word cannot, and picks a larger penalty that does
    better on unseen words. Fails on 52d4a5a: fit_ridge/evaluate_split take no groups (row-wise LOO only)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold

    loo_err, grp_err = [], []
    for seed in range(3):
        X, y, words = _memorisable(seed)
        loo, grouped = probes.fit_ridge(X, y), probes.fit_ridge(X, y, groups=words)
        assert grouped[-1].alpha_ >= 10 * loo[-1].alpha_
        assert "grouped by word" in grouped[-1].cv_ and "leave-one-out" in loo[-1].cv_
        Xn, yn, _ = _memorisable(seed + 100)  # other words
        loo_err.append(np.mean((loo.predict(Xn) - yn) ** 2))
        grp_err.append(np.mean((grouped.predict(Xn) - yn) ** 2))
    assert np.mean(grp_err) < np.mean(loo_err)
    # the word split's fit uses the grouped search
    X, y, words = _memorisable(0)
    test = probes.word_split(words, seed=0)
    e = probes.evaluate_split(X, y, words, test, -4.0, 4.0, 0, groups=words)
    assert e["alpha"] == probes.fit_ridge(X[~test], y[~test], groups=words[~test])[-1].alpha_
    # the fold errors equal sklearn's Ridge refitted per GroupKFold fold (same standardised inputs)
    Z = (X - X.mean(0)) / X.std(0)
    ours, k = probes._grouped_errors(Z, y, words, probes.RIDGE_ALPHAS[:4], 5)
    ref = [
        sum(
            ((Ridge(alpha=a).fit(Z[tr], y[tr]).predict(Z[te]) - y[te]) ** 2).sum()
            for tr, te in GroupKFold(k).split(Z, y, words)
        )
        / len(y)
        for a in probes.RIDGE_ALPHAS[:4]
    ]
    assert np.allclose(ours, ref)


def test_contrastive_figure_of_uninformative_features_is_not_significant():
    """Issue 17, defect 3: the paper's contrastive score sign(valence)·‖F(x) − F(x')‖ takes its sign from the
    answer, so features that know nothing give τ ≈ 0.5 with a tiny p (shown below). The fitted contrastive
    probe (trained on training words, scored on held-out words) gives no significant τ on such features and a
    high one when the difference carries the valence. Fails on 52d4a5a: no fitted contrastive probe (the
    stage computed only the circular score)."""
    rng = np.random.default_rng(0)
    n_words = 300
    valence = rng.choice([-1, 1], n_words) * rng.uniform(0.5, 3.5, n_words)
    wid = np.repeat(np.arange(n_words), 3)
    words = np.array([f"w{i}" for i in wid], dtype=object)
    v = valence[wid]
    D = rng.normal(size=(len(wid), 64))  # uninformative feature differences
    circular = np.sign(v) * np.linalg.norm(D, axis=1)
    _, cw, _ = probes.per_word(words, circular)
    _, vw, _ = probes.per_word(words, v)
    old = probes.kendall(cw, vw)
    assert old["tau"] > 0.4 and old["p"] < 1e-20  # the retired figure: "significant" on noise
    test = probes.word_split(words, seed=0)
    stem = probes.stems(words)
    null = probes.contrastive_probe(D, words, v, test, stem, -4.0, 4.0)
    assert null["n_words"] == len(set(words[test])) and null["n_train_words"] == len(set(words[~test]))
    assert not (null["p"] < 0.01) and abs(null["tau"]) < 0.2
    D_sig = D + np.outer(v, rng.normal(size=64)) * 0.5
    assert probes.contrastive_probe(D_sig, words, v, test, stem, -4.0, 4.0)["tau"] > 0.5


def test_baselines_tau_difference_and_diff_of_means():
    """Baselines through the same ridge and split, the difference of means, and the tuned − base τ difference
    with a bootstrap CI over words. Fails on 52d4a5a: none of them exists."""
    rng = np.random.default_rng(1)
    n_words = 120
    valence = rng.choice([-1, 1], n_words) * rng.uniform(0.5, 3.5, n_words)
    wid = np.repeat(np.arange(n_words), 4)
    words, y = np.array([f"w{i}" for i in wid], dtype=object), valence[wid]
    signal = rng.normal(size=16)
    good = np.outer(y, signal) + rng.normal(size=(len(y), 16))
    noise = rng.normal(size=(len(y), 16))
    occ, wsp = probes.occurrence_split(len(y), 0), probes.word_split(words, 0)
    splits = {"occurrence": (occ, None), "word": (wsp, probes.stems(words))}
    out = probes.score_inputs({"token_embedding": noise, "raw_selected": good}, y, words, splits, (-4.0, 4.0))
    assert list(out) == ["token_embedding", "raw_selected", "diff_means_raw"]
    assert out["raw_selected"]["word"]["tau"] > 0.5 and out["diff_means_raw"]["word"]["tau"] > 0.5
    assert abs(out["token_embedding"]["word"]["tau"]) < 0.25
    assert out["diff_means_raw"]["dim"] == 16
    # tuned − base: a better predictor gives a positive difference whose CI excludes 0; equal ones straddle 0
    test = wsp
    pa = probes.fit_ridge(good[~test], y[~test]).predict(good[test])
    pb = probes.fit_ridge(noise[~test], y[~test]).predict(noise[test])
    _, pwa, _ = probes.per_word(words[test], pa)
    _, pwb, _ = probes.per_word(words[test], pb)
    _, vw, _ = probes.per_word(words[test], y[test])
    d = probes.tau_difference(pwa, pwb, vw, seed=0, n_boot=300)
    assert d["lo"] <= d["diff"] <= d["hi"] and d["lo"] > 0 and d["n_words"] == len(vw)
    same = probes.tau_difference(pwa, pwa + 1e-9 * rng.normal(size=len(pwa)), vw, seed=0, n_boot=300)
    assert same["lo"] <= 0 <= same["hi"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A tiny run (tests/tiny_run.py) with a probes stage computed by the stage's own functions on synthetic
    features: the tuned model's carry valence, the base model's less; words in stem families."""
    from lfp_core.pipeline.probes import LexiconPoints, tau_differences, token_probe
    from lfp_core.store import put_rows
    from tests.tiny_run import TinyRun

    rng = np.random.default_rng(5)
    vocab = [w for fam in FAMILIES for w in fam] + [f"word{i}" for i in range(60)]
    valence = dict(zip(vocab, rng.choice([-1, 1], len(vocab)) * rng.uniform(0.5, 3.5, len(vocab))))
    words = np.array([w for w in vocab for _ in range(4)], dtype=object)
    y = np.array([valence[w] for w in words])
    n = len(y)
    pts = LexiconPoints(*(np.arange(n),) * 3, np.ones(n, bool), np.zeros(n, bool), words, y,
                        probes.occurrence_split(n, 0), probes.word_split(words, 0), probes.stems(words))  # fmt: skip
    signal = rng.normal(size=24)
    X = {
        "tuned": np.outer(y, signal) + 2 * rng.normal(size=(n, 24)),
        "base": np.outer(y, signal) + 6 * rng.normal(size=(n, 24)),
    }
    splits = {"occurrence": (pts.occ, None), "word": (pts.wsp, pts.stem)}
    detail: dict = {"layers": [1, 2], "n_points": n, "n_words": len(vocab), "n_test_occurrence": int(pts.occ.sum())}
    detail.update(n_test_word=int(pts.wsp.sum()), word_split_by="stem", n_stems=len(set(pts.stem)))
    detail["penalty_cv"] = {"occurrence": "leave-one-out over positions", "word": "5-fold CV grouped by stem"}
    fits, word_rows = {}, []
    for role in ("tuned", "base"):
        d, res, rows = token_probe(X[role], pts, role, (-3.9, 3.4), Counter(), 0)
        fits[role] = {split: e["words"] for split, e in res.items()}
        word_rows += rows
        d["inputs"].update(
            probes.score_inputs(
                {"token_embedding": rng.normal(size=(n, 8)), "raw_selected": X[role]}, y, words, splits, (-3.9, 3.4)
            )
        )
        d["irm"] = {"pearson": 0.5, "spearman": 0.5, "n": 10}
        D = np.outer(y, signal) + 3 * rng.normal(size=(n, 24))
        d["contrastive_probe"] = {
            **probes.contrastive_probe(D, words, y, pts.wsp, pts.stem, -3.9, 3.4),
            "n_sentences": 2 * n,
        }
        d["sign_acc_pos"], d["sign_acc_neg"] = d["sign_acc_pos_occurrence"], d["sign_acc_neg_occurrence"]
        detail[role] = d
    detail["tau_difference"] = tau_differences(fits, 0)
    tiny = TinyRun(tmp_path_factory.mktemp("runs") / "probe")
    tiny.until("features")
    with tiny.writer.transaction() as con:
        put_rows(con, "probe_words", word_rows)
        tiny._done(con, "probes", detail)
    return tiny.run_dir


def test_report_and_page_show_baselines_the_tuned_minus_base_ci_and_the_stem_split(probe_run, monkeypatch):
    """The report and the Token scores page put each baseline beside the SAE probe's τ, give the tuned − base
    τ difference with its bootstrap CI, say the word split is by stem, and show the fitted contrastive probe."""
    from lfp_core.report import build_report, format_report
    from lfp_core.store import RunReader
    from lfp_core.store.summaries import ProbesSummary
    from tests.helpers import open_page

    pr = RunReader(probe_run).summary(ProbesSummary)
    diff = pr.tau_difference["word"]
    assert diff["lo"] <= diff["diff"] <= diff["hi"] and diff["diff"] == pytest.approx(
        diff["tau_tuned"] - diff["tau_base"]
    )
    assert diff["tau_tuned"] == pytest.approx(pr.tuned.tau_word["tau"])
    rep = build_report(str(probe_run))["probe"]
    assert {"token_embedding", "raw_selected", "diff_means_raw", "sae_selected"} <= set(rep["inputs"])
    assert rep["word_split_by"] == "stem" and rep["tau_difference"]["word"] == diff and "tau_contrastive" not in rep
    text = format_report(build_report(str(probe_run)))
    assert "no test word sharing a stem with a training word" in text and "grouped by stem" in text
    assert f"tuned − base {diff['diff']:+.3f}" in text and f"{diff['lo']:+.3f} to {diff['hi']:+.3f}" in text
    assert "baseline: token identity" in text and "baseline: difference of means" in text
    assert "contrastive probe" in text and "fitted on training words" in text

    at = open_page(monkeypatch, probe_run.parent, "views/token_scores.py", run=probe_run)
    assert not at.exception
    table = at.dataframe[1].value
    shown = dict(zip(table["probe input"], table["τ word"]))
    assert any("token identity" in k for k in shown) and any("difference of means" in k for k in shown)
    assert shown[next(k for k in shown if "(the probe)" in k)] == pytest.approx(pr.tuned.tau_word["tau"])
    captions = " ".join(c.value for c in at.caption)
    assert (
        "grouped by stem" in captions
        and f"word split {diff['diff']:+.3f} ({diff['lo']:+.3f} to {diff['hi']:+.3f}" in captions
    )
    assert "Contrastive probe" in " ".join(m.value for m in at.markdown)
