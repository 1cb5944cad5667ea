"""Probes from SAE features to the feedback signal (stage 3 of the paper), done correctly.

**Per-token VADER probe.** A data point is a lexicon word in a held-out text (IMDB test reviews
and tuned-policy completions), taken at the word's *last token*: the first position where the
model has seen the whole word (a causal model cannot know "great" is "greatly" before the last
piece). Its input is the SAE features of one model at that position, concatenated across the
selected layers in numeric layer order — the tuned model's activations through the tuned
model's SAEs, or the base model's through the base model's (never mixed). Its target is the
word's VADER valence. Ridge regression; the penalty is chosen by cross-validation on the training
split only, with folds shaped like the split it is evaluated on (:func:`fit_ridge`).

**Splits.** By occurrence (80/20 over positions; a word can fall on both sides — comparable with
the paper) and by word (about 20% of the distinct words held out, grouped by stem: no test word
shares a Snowball English stem with a training word, so "love" in training never lets "loved" or
"loving" count as unseen).

**Metrics.** Per-word mean prediction vs VADER valence: Kendall τ (on numbers) with its p-value,
for all, positive-only and negative-only words; the same for an untrained (random) linear map and
for a probe fitted to shuffled targets; sign accuracy after the paper's rescaling (10th–90th
percentile of the predictions → the lexicon's [min, max]); |error| vs how often the tuned policy
generates the word (Spearman). Baselines through the same ridge and split (token embedding, raw
activations, difference of means) and the tuned − base τ difference with a bootstrap CI over
test words (:func:`tau_difference`).

**Contrastive probe.** The paper's contrastive score signs ‖F(x) − F(x')‖ by the *true* valence,
so any features give τ ≈ 0.5; here the feature difference is the input of a ridge fitted on
training words and scored on held-out words (:func:`contrastive_probe`).

**Implicit reward model.** Out-of-fold predictions (5 folds over positions) summed over a
completion's words give a reward with the VADER reward's signature; compared with the true reward
(Pearson, Spearman) across held-out tuned completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from lfp_core.errors import BadInputError


class ProbeDataError(BadInputError):
    """Too little or degenerate data for a probe; the message says what and how much."""


@dataclass
class Positions:
    """Probe data points: harvest row, document, position, word and valence per point."""

    rows: np.ndarray
    doc_id: np.ndarray
    pos: np.ndarray
    word: np.ndarray  # object array of str
    valence: np.ndarray


def word_end_positions(
    tokenizer, docs: list[tuple[int, list[int]]], lexicon_only: bool = True
) -> list[tuple[int, int, str, float, bool]]:
    """(doc_id, position, word, valence, in_lexicon) at the last token of every word of each document."""
    from lfp_core.reward import token_valences

    out = []
    for doc_id, ids in docs:
        words, tv = token_valences(tokenizer, list(ids))
        for i, t in enumerate(tv):
            if t.word_end and t.word_index >= 0:
                w = words[t.word_index]
                if w.in_lexicon or not lexicon_only:
                    out.append((doc_id, i, w.text, w.valence, w.in_lexicon))
    return out


def kendall(pred: np.ndarray, target: np.ndarray) -> dict:
    """Kendall τ-b between two *numeric* arrays (refuses strings: the published notebooks'
    bug was τ over token strings)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.dtype.kind not in "fiu" or target.dtype.kind not in "fiu":
        raise TypeError(f"Kendall τ needs numbers, got {pred.dtype} and {target.dtype}")
    if len(pred) < 3 or np.ptp(target) == 0 or np.ptp(pred) == 0:
        return {"tau": float("nan"), "p": float("nan"), "n_words": int(len(pred))}
    r = stats.kendalltau(pred, target)
    return {"tau": float(r.statistic), "p": float(r.pvalue), "n_words": int(len(pred))}


def tau_groups(pred: np.ndarray, valence: np.ndarray) -> dict:
    """τ for all, positive-only and negative-only words."""
    return {
        "all": kendall(pred, valence),
        "pos": kendall(pred[valence > 0], valence[valence > 0]),
        "neg": kendall(pred[valence < 0], valence[valence < 0]),
    }


def rescale(pred: np.ndarray, lex_min: float, lex_max: float) -> np.ndarray:
    """The paper's display scale: the 10th–90th percentile of predictions mapped onto [min, max]."""
    lo, hi = np.percentile(pred, [10, 90])
    if hi <= lo:
        return np.full_like(pred, (lex_min + lex_max) / 2)
    return lex_min + (pred - lo) * (lex_max - lex_min) / (hi - lo)


def per_word(words: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct words, mean value per word, count per word)."""
    uniq, inv, cnt = np.unique(words, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=values, minlength=len(uniq))
    return uniq, sums / cnt, cnt


def occurrence_split(n: int, seed: int, test_frac: float = 0.2) -> np.ndarray:
    """Boolean test mask over positions."""
    rng = np.random.default_rng([seed, 53])
    test = np.zeros(n, dtype=bool)
    test[rng.permutation(n)[: int(round(n * test_frac))]] = True
    return test


def stems(words: np.ndarray) -> np.ndarray:
    """The Snowball (Porter2) English stem of each word, lower-cased (nltk; needs no downloaded data):
    "love", "loved", "loving" and "lovely" share the stem "love"."""
    from nltk.stem.snowball import SnowballStemmer

    stemmer = SnowballStemmer("english")
    uniq, inv = np.unique(np.asarray(words, dtype=object).astype(str), return_inverse=True)
    return np.array([stemmer.stem(w.lower()) for w in uniq], dtype=object)[inv]


def word_split(words: np.ndarray, seed: int, test_frac: float = 0.2) -> np.ndarray:
    """Boolean test mask over positions: stems drawn at random until about ``test_frac`` of the distinct
    words are held out, so no test word occurs in training and none shares a stem with a training word."""
    uniq = np.unique(words)
    stem_of = dict(zip(uniq, stems(uniq)))
    words_of: dict[str, list] = {}
    for w in uniq:
        words_of.setdefault(stem_of[w], []).append(w)
    keys = sorted(words_of)
    rng = np.random.default_rng([seed, 59])
    target, test_words = int(round(len(uniq) * test_frac)), set[str]()
    for i in rng.permutation(len(keys)):
        if len(test_words) >= target:
            break
        test_words.update(words_of[keys[i]])
    if len(test_words) == len(uniq) and len(keys) > 1:  # one stem took every word: leave one for training
        test_words -= set(words_of[keys[i]])
    return np.array([w in test_words for w in words])


def stem_overlap(train_words, test_words) -> float:
    """Share of the distinct test words that share a stem with some training word."""
    test_u = np.unique(np.asarray(test_words, dtype=object))
    if not len(test_u):
        return float("nan")
    train_stems = set(stems(np.unique(np.asarray(train_words, dtype=object))))
    return float(np.mean([s in train_stems for s in stems(test_u)]))


RIDGE_ALPHAS = np.logspace(-1, 5, 13)


def fit_ridge(
    X: np.ndarray, y: np.ndarray, alphas: np.ndarray = RIDGE_ALPHAS, groups: np.ndarray | None = None, folds: int = 5
):
    """Standardised ridge (a sklearn pipeline: StandardScaler → Ridge) with the penalty chosen on (X, y) only.

    Without ``groups`` the penalty minimises the exact leave-one-out error over rows — the generalised CV
    of sklearn's RidgeCV — from one eigendecomposition of the centred covariance shared by every penalty
    (same penalty and coefficients as RidgeCV, tested; 1.7 s vs 7.0 s on 16,000 random sparse points ×
    1,024 features). That fits the occurrence split, whose test rows are words seen in training.

    With ``groups`` (a word or stem per row) it minimises the error of ``folds``-fold CV whose folds never
    split a group (sklearn's GroupKFold): the condition of the word split, where memorising a word cannot
    help on a held-out word, but helps every other row of the same word under leave-one-out. Each fold
    reuses the full scatter matrix minus the fold's part, then one eigendecomposition serves every
    penalty. The scaler is fitted once on all of (X, y), as in the leave-one-out path.

    ``model[-1].alpha_`` is the chosen penalty, ``model[-1].cv_`` how it was chosen.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ProbeDataError(f"NaN/inf SAE features (data point {bad[0]}, feature column {bad[1]})")
    if np.ptp(y) == 0:
        raise ProbeDataError("the probe target is constant after filtering; nothing to learn")
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X).astype(np.float64)
    y64 = np.asarray(y, dtype=np.float64)
    if groups is None:
        errors, how = _loo_errors(Z, y64, alphas), "leave-one-out over rows"
    else:
        errors, k = _grouped_errors(Z, y64, np.asarray(groups), alphas, folds)
        how = f"{k}-fold CV grouped by word"
    del Z
    best = float(alphas[int(np.argmin(errors))])
    model = make_pipeline(scaler, Ridge(alpha=best)).fit(X, y)
    model[-1].alpha_ = best
    model[-1].cv_ = how
    return model


def _loo_errors(Z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> list[float]:
    """Exact leave-one-out mean squared error of ridge (with an intercept) on standardised Z, per penalty."""
    Z = Z - Z.mean(0)
    yc = y - y.mean()
    s2, V = np.linalg.eigh(Z.T @ Z)
    s2 = np.clip(s2, 0.0, None)
    Q = Z @ V  # Z in the covariance's eigenbasis: hat(α) = Q diag(1/(s² + α)) Qᵀ (+ 1/n for the intercept)
    Qty, Q2, n = Q.T @ yc, Q * Q, len(yc)
    errors = []
    for a in alphas:
        d = 1.0 / (s2 + a)
        resid = yc - Q @ (d * Qty)
        h = Q2 @ d + 1.0 / n
        errors.append(float(np.mean((resid / (1.0 - h)) ** 2)))
    return errors


def _grouped_errors(
    Z: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: np.ndarray, folds: int
) -> tuple[list[float], int]:
    """Mean squared error of group-wise K-fold CV of ridge (with an intercept) per penalty, and K."""
    from sklearn.model_selection import GroupKFold

    k = min(folds, len(np.unique(groups)))
    if k < 2:
        raise ProbeDataError("the penalty search needs at least two words in the training split")
    G, zs, zy, ys = Z.T @ Z, Z.sum(0), Z.T @ y, y.sum()  # full scatter; each fold subtracts its own part
    sse = np.zeros(len(alphas))
    for _, te in GroupKFold(n_splits=k).split(Z, y, groups):
        Zf, yf = Z[te], y[te]
        n_tr = len(y) - len(te)
        mu = (zs - Zf.sum(0)) / n_tr  # training-fold means
        ybar = (ys - yf.sum()) / n_tr
        C = G - Zf.T @ Zf - n_tr * np.outer(mu, mu)  # centred training-fold scatter
        b = zy - Zf.T @ yf - n_tr * mu * ybar
        s2, V = np.linalg.eigh(C)
        s2 = np.clip(s2, 0.0, None)
        P, Vb = (Zf - mu) @ V, V.T @ b  # held-out rows in the eigenbasis
        for i, a in enumerate(alphas):
            sse[i] += float(np.sum((yf - ybar - P @ (Vb / (s2 + a))) ** 2))
    return list(sse / len(y)), k


def evaluate_split(
    X: np.ndarray,
    y: np.ndarray,
    words: np.ndarray,
    test: np.ndarray,
    lex_min: float,
    lex_max: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict:
    """Fit on ~test (penalty grouped by ``groups`` where given: the word split), evaluate per word on test:
    τ groups, sign accuracy, and the per-word table."""
    model = fit_ridge(X[~test], y[~test], groups=None if groups is None else groups[~test])
    pred = model.predict(X[test])
    return {"model": model, "alpha": float(model[-1].alpha_), **score_words(pred, y, words, test, lex_min, lex_max)}


def score_words(
    pred: np.ndarray, y: np.ndarray, words: np.ndarray, test: np.ndarray, lex_min: float, lex_max: float
) -> dict:
    """Per-word means of the test rows' predictions against their valences: τ groups, sign accuracy after
    the paper's rescaling, and the per-word table."""
    uw, pw, cnt = per_word(words[test], pred)
    _, vw, _ = per_word(words[test], y[test])
    scaled = rescale(pw, lex_min, lex_max)
    pos, neg = vw > 0, vw < 0
    return {
        "tau": tau_groups(pw, vw),
        "sign_acc_pos": float((scaled[pos] > 0).mean()) if pos.any() else float("nan"),
        "sign_acc_neg": float((scaled[neg] < 0).mean()) if neg.any() else float("nan"),
        "n_train": int((~test).sum()),
        "n_test": int(test.sum()),
        "words": {"word": uw, "valence": vw, "pred": pw, "pred_rescaled": scaled, "n_test": cnt},
        "test_pred": pred,
    }


def baselines(X: np.ndarray, y: np.ndarray, words: np.ndarray, test: np.ndarray, seed: int) -> dict:
    """The paper's untrained linear map and a probe fitted to shuffled targets (both should give τ ≈ 0)."""
    rng = np.random.default_rng([seed, 61])
    w = rng.normal(size=X.shape[1])
    uw, pw, _ = per_word(words[test], X[test] @ w)
    _, vw, _ = per_word(words[test], y[test])
    untrained = kendall(pw, vw)
    y_shuf = y[~test][rng.permutation(int((~test).sum()))]
    model = fit_ridge(X[~test], y_shuf)
    uw, ps, _ = per_word(words[test], model.predict(X[test]))
    return {"untrained": untrained, "shuffled": kendall(ps, vw)}


def diff_of_means(X: np.ndarray, y: np.ndarray, words: np.ndarray, test: np.ndarray) -> dict:
    """Difference-of-means baseline: direction = mean of the training rows with positive valence minus
    that of those with negative valence; score = projection on it; τ of per-word mean scores on test."""
    tr = ~test
    pos, neg = tr & (y > 0), tr & (y < 0)
    if not pos.any() or not neg.any():
        return kendall(np.zeros(0), np.zeros(0))
    direction = X[pos].mean(0) - X[neg].mean(0)
    _, pw, _ = per_word(words[test], X[test] @ direction)
    _, vw, _ = per_word(words[test], y[test])
    return kendall(pw, vw)


def score_inputs(
    inputs: dict[str, np.ndarray],
    y: np.ndarray,
    words: np.ndarray,
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
    lex_range: tuple[float, float],
) -> dict:
    """τ per split of the same ridge (same splits, same penalty search) on each input, and of the difference
    of means on ``raw_selected`` (listed after it)."""
    out: dict[str, dict[str, Any]] = {}
    for name, Z in inputs.items():
        kinds = [name] + (["diff_means_raw"] if name == "raw_selected" else [])
        for kind in kinds:
            out[kind] = {"dim": int(Z.shape[1])}
            for split, (test, groups) in splits.items():
                if kind == "diff_means_raw":
                    t = diff_of_means(Z, y, words, test)
                else:
                    t = evaluate_split(Z, y, words, test, *lex_range, 0, groups=groups)["tau"]["all"]
                out[kind][split] = {k: t[k] for k in ("tau", "p", "n_words")}
    return out


def tau_difference(
    pred_a: np.ndarray, pred_b: np.ndarray, valence: np.ndarray, seed: int, n_boot: int = 1000, level: float = 0.95
) -> dict:
    """τ(pred_a, valence) − τ(pred_b, valence) over the same test words, with a percentile bootstrap CI
    that resamples words (with replacement; both predictions of a word move together)."""
    pred_a, pred_b, valence = (np.asarray(v, dtype=float) for v in (pred_a, pred_b, valence))
    n = len(valence)
    ta, tb = kendall(pred_a, valence)["tau"], kendall(pred_b, valence)["tau"]
    out = {"diff": ta - tb, "tau_a": ta, "tau_b": tb, "lo": float("nan"), "hi": float("nan")}
    out.update({"level": level, "n_words": n, "n_boot": n_boot})
    if n < 3 or not np.isfinite(ta - tb):
        return out
    rng = np.random.default_rng([seed, 71])
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        a, b = stats.kendalltau(pred_a[i], valence[i]).statistic, stats.kendalltau(pred_b[i], valence[i]).statistic
        boots.append(a - b)
    boots = np.asarray(boots, dtype=float)
    boots = boots[np.isfinite(boots)]
    if len(boots):
        out["lo"], out["hi"] = (float(q) for q in np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return out


def contrastive_probe(
    D: np.ndarray,
    words: np.ndarray,
    valence: np.ndarray,
    test: np.ndarray,
    groups: np.ndarray,
    lex_min: float,
    lex_max: float,
) -> dict:
    """The contrastive variant as a fitted probe: a ridge from the feature difference D = F(x) − F(x with a
    neutral word) (one row per sentence variant) to the valence of the word in x, fitted on the training
    words (penalty by CV grouped by ``groups``) and scored on held-out words (τ of per-word means).

    The paper's own score, sign(valence)·‖D‖, takes its sign from the answer: any features give τ ≈ 0.5 with
    a tiny p. A fitted probe on held-out words gives τ ≈ 0 for features that carry no valence.
    Returns {} where either side has too little data.
    """
    if test.sum() < 3 or (~test).sum() < 3 or np.ptp(valence[~test]) == 0:
        return {}
    try:
        e = evaluate_split(D, valence, words, test, lex_min, lex_max, 0, groups=groups)
    except ProbeDataError:
        return {}
    t = e["tau"]
    return {**t["all"], "pos": t["pos"], "neg": t["neg"], "n_train_words": int(len(np.unique(words[~test])))}


def out_of_fold(X: np.ndarray, y: np.ndarray, alpha: float, seed: int, folds: int = 5) -> np.ndarray:
    """Predictions for every point from a ridge (fixed penalty) that did not see it."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return cross_val_predict(
        make_pipeline(StandardScaler(), Ridge(alpha=alpha)), X, y, cv=KFold(folds, shuffle=True, random_state=seed)
    )


def contributions(model, x: np.ndarray, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-feature contributions to one prediction of a standardised ridge: w_j (x_j − μ_j)/σ_j.

    Returns the indices and values of the ``top`` largest |contributions| per row of ``x``.
    """
    scaler, ridge = model[0], model[-1]
    c = (x - scaler.mean_) / scaler.scale_ * ridge.coef_
    idx = np.argsort(-np.abs(c), axis=1)[:, :top]
    return idx, np.take_along_axis(c, idx, axis=1)


def effective_weights(model) -> np.ndarray:
    """Weights on the unstandardised features (w_j / σ_j)."""
    return model[-1].coef_ / model[0].scale_


def correlation(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": int(len(a))}
    return {
        "pearson": float(stats.pearsonr(a, b).statistic),
        "spearman": float(stats.spearmanr(a, b).statistic),
        "n": int(len(a)),
    }


def logistic_probe(X: np.ndarray, labels: np.ndarray, seed: int, test_frac: float = 0.3) -> dict:
    """Held-out accuracy (95% Wilson CI) of an L2 logistic regression, next to the majority rate."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ProbeDataError("the logistic probe needs two classes; only one is present")
    test = occurrence_split(len(labels), seed + 7, test_frac)
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=3, max_iter=500))
    model.fit(X[~test], labels[~test])
    acc = float((model.predict(X[test]) == labels[test]).mean())
    n = int(test.sum())
    lo, hi = wilson_interval(acc, n)
    values, counts = np.unique(labels[~test], return_counts=True)
    majority = values[np.argmax(counts)]
    return {
        "acc": acc,
        "ci_low": lo,
        "ci_high": hi,
        "n_test": n,
        "majority_acc": float((labels[test] == majority).mean()),
    }


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def pca(X: np.ndarray, n: int = 2) -> tuple[np.ndarray, list[float]]:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    p = PCA(n_components=n, random_state=0).fit(Z)
    return p.transform(Z), [float(v) for v in p.explained_variance_ratio_]


# --- the paper's contrastive variant -------------------------------------------------------------------
def swap_tables(tokenizer, lexicon: dict[str, float]) -> tuple[dict[int, int], dict[int, int]]:
    """Deterministic single-token swaps for lexicon words.

    Over the tokenizer's vocabulary, a *word token* is a token that decodes to an optional leading
    space plus 3+ letters. For each lexicon word token w (valence v): its **neutral** swap is the
    non-lexicon word token with the same leading-space form whose id is nearest to w's (BPE ids
    follow merge order, so neighbours have similar frequency); its **opposite** swap is the
    lexicon word token of the same form whose valence is nearest to −v (ties: nearest id), taken
    only when that valence has the opposite sign.

    Returns:
        ({token: neutral token}, {token: opposite token}).
    """
    import re

    word = re.compile(r"^( ?)([A-Za-z]{3,})$")
    lex_tok: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
    neutral_tok: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
    from lfp_core.models import continuation_decoder

    piece = continuation_decoder(tokenizer)  # each token with its own leading space (Llama's "▁good" too)
    for tid in range(len(tokenizer)):
        m = word.match(piece([tid]))
        if not m:
            continue
        space, w = bool(m.group(1)), m.group(2).lower()
        (lex_tok if w in lexicon else neutral_tok)[space].append((tid, lexicon.get(w, 0.0)))
    neutral, opposite = {}, {}
    for space in (True, False):
        n_ids = np.array([t for t, _ in neutral_tok[space]])
        lex = lex_tok[space]
        vals = np.array([v for _, v in lex])
        ids = np.array([t for t, _ in lex])
        for tid, v in lex:
            if len(n_ids):
                neutral[tid] = int(n_ids[np.argmin(np.abs(n_ids - tid))])
            cand = np.nonzero(np.sign(vals) == -np.sign(v))[0] if v != 0 else np.array([], dtype=int)
            if len(cand):
                key = np.lexsort((np.abs(ids[cand] - tid), np.abs(vals[cand] + v)))
                opposite[tid] = int(ids[cand[key[0]]])
    return neutral, opposite
