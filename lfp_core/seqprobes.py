"""Sequence-level probes: a completion's reward from its mean-pooled SAE features.

For a reward that is not a per-word lexicon (an HF classifier, a preference model, a python function) there
is no per-token target, so the probe works on whole completions; for VADER it runs beside the token probe.

**Data point.** One completion of a held-out prompt, by either policy (the ``completions`` table's base
and tuned completions). Its input is one model's SAE features averaged over the completion's tokens (the
prompt's positions and special tokens excluded), layers concatenated in numeric order: the tuned model's
activations through the tuned model's SAEs, or the base model's through the base model's, on the same
completions, so the two models are compared on the same targets. Its target is the stored reward.

**Split.** By prompt (:func:`prompt_split`): about 20% of the prompts are held out with every completion of
theirs, so no held-out completion shares its prompt with a training one. The ridge penalty
(:func:`lfp_core.probes.fit_ridge`) is chosen on the training split by K-fold CV whose folds are groups of
prompts (leave-one-out over completions would let a completion's sibling from the same prompt help).

**Metrics** (:func:`score`), on the held-out completions only: Spearman ρ and Kendall τ with scipy's
p-values (they treat completions as independent), out-of-sample R², and the percentile bootstrap 95% CI
of ρ over held-out prompts (a prompt's completions are resampled together): the figure's uncertainty,
whose null (ρ = 0: the features carry no reward) is the question asked.

**Controls and baselines** (:func:`sequence_probe`): the same pipeline fitted to targets permuted within
the training split; an untrained random linear map; and other inputs through the same ridge, split and
penalty search, each with ρ(SAE probe) − ρ(input) and its paired CI over prompts. The caller supplies the
inputs (mean-pooled raw activations, mean-pooled input embeddings, length, which policy wrote it).

**Logistic variant** (:func:`logistic_above_median`): reward above the training median vs not; held-out
accuracy beside the training majority class, each with a bootstrap CI over prompts, and their difference.

**Tuned vs base** (:func:`rho_difference`): ρ of the probe on the tuned model's features minus ρ on the
base model's, over the same held-out completions, paired bootstrap CI over prompts.

**Which probes apply** (:func:`reward_kind`, :func:`not_applicable`): a per-word lexicon reward (VADER) keeps
the per-token probe and gets this one beside it; any other reward gets only this one, and the probes stage
records why the token-level parts do not apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from scipy import stats

from lfp_core.probes import ProbeDataError, effective_weights, fit_ridge

MIN_PROMPTS = 10  # fewest distinct prompts: >= 2 held out for the bootstrap, >= 5 training groups for the CV
N_BOOT = 1000
LEVEL = 0.95
SPLIT = "by prompt: {pct:.0%} of the prompts held out with all their completions"
PENALTY_CV = "5-fold CV grouped by prompt on the training split"
POOLING = "mean over the completion's tokens (prompt positions and special tokens excluded), layers concatenated"


def reward_kind(spec: str) -> Literal["lexicon", "sequence"]:
    """``lexicon`` for a per-word lexicon reward (VADER), else ``sequence`` (:func:`lfp_core.rewards.reward_kind`)."""
    from lfp_core.rewards import reward_kind as kind

    return kind(spec)


def not_applicable(spec: str) -> dict[str, str]:
    """{part of the probes stage: why it does not apply} for a reward that is not a per-word lexicon."""
    why = (
        f"the reward {spec!r} is not a per-word lexicon: it scores whole completions, so no word or token has "
        "a target value of its own"
    )
    return {
        "token_probe": f"{why}; the sequence probe (pooled SAE features → the completion's reward) runs instead",
        "implicit_reward": f"{why}; the implicit reward model sums the token probe's per-word predictions",
        "contrastive_probe": f"{why}; the contrastive probe swaps lexicon words for neutral or opposite ones",
        "token_attributions": f"{why}; per-token contributions are those of the token probe (the feature ranking "
        "comes from the sequence probe's weights)",
    }


def check_sequence_probe(cfg) -> None:
    """Pre-flight (precompute, before anything is written): a reward that is not a per-word lexicon is probed
    only by the sequence probe, which needs :data:`MIN_PROMPTS` held-out prompts.

    Raises:
        ProbeDataError: too few held-out prompts for such a reward (the message says how many are needed).
    """
    if cfg.run.task != "vader" or reward_kind(cfg.reward.spec) == "lexicon":
        return  # VADER: the token probe runs; the sequence probe beside it is skipped, with why, if too few
    if cfg.prompts.n_eval < MIN_PROMPTS:
        raise ProbeDataError(
            f"--reward {cfg.reward.spec} is probed by the sequence probe, which holds out prompts: it needs at "
            f"least {MIN_PROMPTS} held-out prompts, n_eval_prompts is {cfg.prompts.n_eval}"
        )


def prompt_split(prompts: np.ndarray, seed: int, test_frac: float = 0.2) -> np.ndarray:
    """Boolean test mask over completions: about ``test_frac`` of the distinct prompts, drawn at random, are
    held out with every completion of theirs.

    Raises:
        ProbeDataError: fewer than :data:`MIN_PROMPTS` distinct prompts.
    """
    prompts = np.asarray(prompts)
    uniq = np.unique(prompts)
    if len(uniq) < MIN_PROMPTS:
        raise ProbeDataError(
            f"only {len(uniq)} prompts have scored completions; the sequence probe needs at least {MIN_PROMPTS} "
            "(raise n_eval_prompts)"
        )
    rng = np.random.default_rng([seed, 79])
    n_test = min(len(uniq) - 5, max(2, int(round(len(uniq) * test_frac))))
    held = uniq[rng.permutation(len(uniq))[:n_test]]
    return np.isin(prompts, held)


def _draws(prompts: np.ndarray, seed: int, n_boot: int) -> tuple[np.ndarray, np.ndarray]:
    """(the prompt drawn [n_boot, n_prompts] per resample, each row's prompt index [n_rows])."""
    _, inv = np.unique(np.asarray(prompts), return_inverse=True)
    rng = np.random.default_rng([seed, 83])
    k = int(inv.max()) + 1
    return rng.integers(0, k, (n_boot, k)), inv


def prompt_resamples(prompts: np.ndarray, seed: int, n_boot: int = N_BOOT) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap resamples that draw prompts with replacement (all rows of a drawn
    prompt, as often as it is drawn); :func:`prompt_weights` gives the same resamples as row counts."""
    draws, inv = _draws(prompts, seed, n_boot)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(inv.max() + 2))
    members = [order[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1)]
    for pick in draws:
        yield np.concatenate([members[k] for k in pick])


def prompt_weights(prompts: np.ndarray, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """How often each row occurs in each of :func:`prompt_resamples`' resamples: [n_boot, n_rows]."""
    draws, inv = _draws(prompts, seed, n_boot)
    counts = np.zeros((n_boot, draws.shape[1]))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts[:, inv]


def _midranks(v: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mid-ranks of ``v`` in each resample of row counts ``W`` [B, n] (a row drawn c times is c tied
    copies): [B, n], the ranks scipy's rankdata gives the resample's rows."""
    u, inv = np.unique(v, return_inverse=True)
    onehot = np.zeros((len(v), len(u)))
    onehot[np.arange(len(v)), inv] = 1.0
    G = W @ onehot  # [B, n_unique] copies of each distinct value
    mid = np.cumsum(G, axis=1) - G + (G + 1.0) / 2.0
    return mid[:, inv]


def _spearman_resampled(a: np.ndarray, b: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Spearman ρ of (a, b) in each resample of row counts ``W`` [B, n] (NaN where either is constant):
    Pearson's r of the mid-ranks weighted by the counts, equal to scipy's spearmanr of the resample."""
    Ra, Rb = _midranks(a, W), _midranks(b, W)
    sw = W.sum(1)
    da = Ra - (W * Ra).sum(1, keepdims=True) / sw[:, None]
    db = Rb - (W * Rb).sum(1, keepdims=True) / sw[:, None]
    cov, va, vb = (W * da * db).sum(1), (W * da * da).sum(1), (W * db * db).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((va > 1e-12) & (vb > 1e-12), cov / np.sqrt(va * vb), np.nan)


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _interval(values, level: float) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def score(
    pred: np.ndarray,
    y: np.ndarray,
    prompts: np.ndarray,
    seed: int,
    fitted: bool = True,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Held-out predictions against the rewards: ρ, τ (with p), R² (when ``fitted``), bootstrap CI of ρ over
    prompts."""
    pred, y = np.asarray(pred, dtype=float), np.asarray(y, dtype=float)
    n = len(y)
    out: dict[str, Any] = {"n": int(n), "n_prompts": int(len(np.unique(prompts))), "n_boot": n_boot, "level": level}
    if n < 3 or np.ptp(pred) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        return {**out, "rho": nan, "p": nan, "tau": nan, "p_tau": nan, "r2": None, "lo": nan, "hi": nan}
    rs, kt = stats.spearmanr(pred, y), stats.kendalltau(pred, y)
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / sst if fitted else None
    lo, hi = _interval(_spearman_resampled(pred, y, prompt_weights(prompts, seed, n_boot)), level)
    out.update(rho=float(rs.statistic), p=float(rs.pvalue), tau=float(kt.statistic), p_tau=float(kt.pvalue))
    return {**out, "r2": r2, "lo": lo, "hi": hi}


def rho_difference(
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    y: np.ndarray,
    prompts: np.ndarray,
    seed: int,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
) -> dict[str, Any]:
    """ρ(pred_a, y) − ρ(pred_b, y) over the same completions, with a paired bootstrap CI over prompts."""
    pred_a, pred_b, y = (np.asarray(v, dtype=float) for v in (pred_a, pred_b, y))
    ra, rb = _rho(pred_a, y), _rho(pred_b, y)
    W = prompt_weights(prompts, seed + 1, n_boot)
    lo, hi = _interval(_spearman_resampled(pred_a, y, W) - _spearman_resampled(pred_b, y, W), level)
    return {
        "diff": ra - rb,
        "lo": lo,
        "hi": hi,
        "rho_a": ra,
        "rho_b": rb,
        "level": level,
        "n": int(len(y)),
        "n_prompts": int(len(np.unique(prompts))),
        "n_boot": n_boot,
    }


def fit_score(
    X: np.ndarray, y: np.ndarray, prompts: np.ndarray, test: np.ndarray, seed: int, y_fit: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Ridge fitted on the training completions (penalty by CV grouped by prompt) to ``y_fit`` (default ``y``),
    scored on the held-out ones against ``y``. Returns (score, held-out predictions, the fitted model)."""
    tr = ~test
    model = fit_ridge(X[tr], (y if y_fit is None else y_fit)[tr], groups=prompts[tr])
    pred = model.predict(X[test])
    s = score(pred, y[test], prompts[test], seed)
    return {**s, "alpha": float(model[-1].alpha_), "dim": int(X.shape[1])}, pred, model


def logistic_above_median(
    X: np.ndarray, y: np.ndarray, prompts: np.ndarray, test: np.ndarray, seed: int, n_boot: int = N_BOOT
) -> dict[str, Any]:
    """Reward above the training median vs not: held-out accuracy of an L2 logistic regression (penalty by
    3-fold CV grouped by prompt) beside the training majority class, bootstrap CIs over held-out prompts.
    Returns {} when the training labels have one class."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr = ~test
    threshold = float(np.median(y[tr]))
    lab = y > threshold
    if lab[tr].all() or not lab[tr].any():
        return {}
    k = min(3, len(np.unique(prompts[tr])))
    folds = list(GroupKFold(n_splits=k).split(X[tr], lab[tr], prompts[tr]))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=folds, max_iter=500))
    model.fit(X[tr], lab[tr])
    right = (model.predict(X[test]) == lab[test]).astype(float)
    majority = bool(lab[tr].mean() > 0.5)
    right_major = (lab[test] == majority).astype(float)
    W = prompt_weights(prompts[test], seed + 2, n_boot)
    acc_b, maj_b = W @ right / W.sum(1), W @ right_major / W.sum(1)
    acc_ci, maj_ci, diff_ci = (_interval(v, LEVEL) for v in (acc_b, maj_b, acc_b - maj_b))
    return {
        "acc": float(right.mean()),
        "lo": acc_ci[0],
        "hi": acc_ci[1],
        "majority_acc": float(right_major.mean()),
        "majority_lo": maj_ci[0],
        "majority_hi": maj_ci[1],
        "diff": float(right.mean() - right_major.mean()),
        "diff_lo": diff_ci[0],
        "diff_hi": diff_ci[1],
        "threshold": threshold,
        "share_above": float(lab[tr].mean()),
        "n": int(test.sum()),
        "n_prompts": int(len(np.unique(prompts[test]))),
        "n_boot": n_boot,
    }


def sequence_probe(
    X: np.ndarray,
    y: np.ndarray,
    prompts: np.ndarray,
    test: np.ndarray,
    seed: int,
    inputs: dict[str, np.ndarray] | None = None,
    policy: np.ndarray | None = None,
    logistic: bool = True,
) -> tuple[dict[str, Any], np.ndarray, Any]:
    """The ridge probe from pooled features ``X`` [n_completions, dim] to the rewards ``y``, with its controls
    (shuffled targets, an untrained map), the baselines ``inputs`` ({name: [n_completions, dim]}) through the
    same ridge and split, the logistic variant, and (``policy``: which policy wrote each completion) ρ within
    each policy's held-out completions.

    Returns:
        (the :class:`~lfp_core.store.stats.SequenceRole` dict, held-out predictions, the fitted model).
    """
    y = np.asarray(y, dtype=float)
    if not np.isfinite(y).all():
        raise ProbeDataError(f"{int((~np.isfinite(y)).sum())} completions have a non-finite reward")
    probe, pred, model = fit_score(X, y, prompts, test, seed)
    rng = np.random.default_rng([seed, 89])
    y_shuf = y.copy()
    y_shuf[~test] = rng.permutation(y[~test])  # permuted within the training split only
    shuffled, _, _ = fit_score(X, y, prompts, test, seed, y_fit=y_shuf)
    w = rng.normal(size=X.shape[1])
    untrained = {**score(X[test] @ w, y[test], prompts[test], seed, fitted=False), "dim": int(X.shape[1])}
    out: dict[str, Any] = {"probe": probe, "shuffled": shuffled, "untrained": untrained, "inputs": {}}
    for name, Z in (inputs or {}).items():
        s, p_in, _ = fit_score(np.asarray(Z, dtype=np.float64), y, prompts, test, seed)
        out["inputs"][name] = {**s, "vs_probe": rho_difference(pred, p_in, y[test], prompts[test], seed)}
    if logistic:
        out["logistic"] = logistic_above_median(X, y, prompts, test, seed)
    if policy is not None:
        pol = np.asarray(policy)[test]
        out["by_policy"] = {
            str(v): score(pred[pol == v], y[test][pol == v], prompts[test][pol == v], seed) for v in np.unique(pol)
        }
    return out, pred, model


def feature_rows(role: str, layers: list[int], X: np.ndarray, model) -> list[dict]:
    """probe_features rows of a fitted probe: weight on the unstandardised feature, mean activation over
    ``X`` (the rows it was fitted on), importance |weight × mean| and its rank (0 = largest)."""
    w_eff = effective_weights(model)
    mean_act = X.mean(0)
    imp = np.abs(w_eff * mean_act)
    rank = np.empty(len(imp), dtype=int)
    rank[np.argsort(-imp)] = np.arange(len(imp))
    d_sae = X.shape[1] // len(layers)
    return [
        {
            "role": role,
            "layer": sorted(layers)[j // d_sae],
            "feature": j % d_sae,
            "weight": float(w_eff[j]),
            "mean_act": float(mean_act[j]),
            "importance": float(imp[j]),
            "rank": int(rank[j]),
        }
        for j in range(X.shape[1])
    ]
