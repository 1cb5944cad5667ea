"""Probes from SAE features to the feedback signal (stage 3 of the paper), done correctly.

**Per-token VADER probe.** A data point is a lexicon word in a held-out text (IMDB test reviews
and tuned-policy completions), taken at the word's *last token*: the first position where the
model has seen the whole word (a causal model cannot know "great" is "greatly" before the last
piece). Its input is the SAE features of one model at that position, concatenated across the
selected layers in numeric layer order — the tuned model's activations through the tuned
model's SAEs, or the base model's through the base model's (never mixed). Its target is the
word's VADER valence. Ridge regression; the penalty is chosen by cross-validation on the training
split only.

**Splits.** By occurrence (80/20 over positions; a word can fall on both sides — comparable with
the paper) and by word (80/20 over distinct words: test words never occur in training).

**Metrics.** Per-word mean prediction vs VADER valence: Kendall τ (on numbers) with its p-value,
for all, positive-only and negative-only words; the same for an untrained (random) linear map and
for a probe fitted to shuffled targets; sign accuracy after the paper's rescaling (10th–90th
percentile of the predictions → the lexicon's [min, max]); |error| vs how often the tuned policy
generates the word (Spearman).

**Implicit reward model.** Out-of-fold predictions (5 folds over positions) summed over a
completion's words give a reward with the VADER reward's signature; compared with the true reward
(Pearson, Spearman) across held-out tuned completions.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def word_split(words: np.ndarray, seed: int, test_frac: float = 0.2) -> np.ndarray:
    """Boolean test mask over positions such that no test word occurs in training."""
    uniq = np.unique(words)
    rng = np.random.default_rng([seed, 59])
    test_words = set(uniq[rng.permutation(len(uniq))[: int(round(len(uniq) * test_frac))]])
    return np.array([w in test_words for w in words])


RIDGE_ALPHAS = np.logspace(-1, 5, 13)


def fit_ridge(X: np.ndarray, y: np.ndarray, alphas: np.ndarray = RIDGE_ALPHAS):
    """Standardised ridge (a sklearn pipeline: StandardScaler → Ridge); the penalty chosen by exact
    leave-one-out cross-validation on (X, y) only — the generalised CV of sklearn's RidgeCV — from one
    eigendecomposition of the centred covariance shared by every penalty. Same penalty and
    coefficients as RidgeCV (tested); 1.7 s vs 7.0 s on 16,000 random sparse points × 1,024
    features, where sklearn recomputes the hat-matrix diagonal from scratch per penalty.
    ``model[-1].alpha_`` is the chosen penalty."""
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
    Z -= Z.mean(0)
    yc = np.asarray(y, dtype=np.float64) - np.mean(y)
    s2, V = np.linalg.eigh(Z.T @ Z)
    s2 = np.clip(s2, 0.0, None)
    Q = Z @ V  # Z in the covariance's eigenbasis: hat(α) = Q diag(1/(s² + α)) Qᵀ (+ 1/n for the intercept)
    Qty, Q2, n = Q.T @ yc, Q * Q, len(yc)
    del Z
    errors = []
    for a in alphas:
        d = 1.0 / (s2 + a)
        resid = yc - Q @ (d * Qty)
        h = Q2 @ d + 1.0 / n
        errors.append(float(np.mean((resid / (1.0 - h)) ** 2)))
    best = float(alphas[int(np.argmin(errors))])
    model = make_pipeline(scaler, Ridge(alpha=best)).fit(X, y)
    model[-1].alpha_ = best
    return model


def evaluate_split(
    X: np.ndarray, y: np.ndarray, words: np.ndarray, test: np.ndarray, lex_min: float, lex_max: float, seed: int
) -> dict:
    """Fit on ~test, evaluate per word on test: τ groups, sign accuracy, and the per-word table."""
    model = fit_ridge(X[~test], y[~test])
    pred = model.predict(X[test])
    uw, pw, cnt = per_word(words[test], pred)
    _, vw, _ = per_word(words[test], y[test])
    scaled = rescale(pw, lex_min, lex_max)
    pos, neg = vw > 0, vw < 0
    return {
        "model": model,
        "alpha": float(model[-1].alpha_),
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
    for tid in range(len(tokenizer)):
        m = word.match(tokenizer.decode([tid]))
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
