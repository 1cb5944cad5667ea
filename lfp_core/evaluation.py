"""Base-vs-tuned policy evaluation: reward with paired statistics, per-token KL, distinct-2, and
the words whose frequency RL changed most."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import torch
from scipy import stats

from lfp_core import reward


def reward_stats(values: np.ndarray) -> dict:
    """Mean, standard error and count of a reward sample."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    return {
        "mean": float(v.mean()) if n else float("nan"),
        "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "n": n,
    }


def cluster_bootstrap_means(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of ``values`` over ``n_boot`` resamples of whole clusters with replacement (the cluster, or
    block, bootstrap: Davison & Hinkley 1997, §3.8; Cameron, Gelbach & Miller 2008). Units sharing a
    ``groups`` label (e.g. completions or pairs of one prompt) are drawn together, so their correlation
    widens the spread instead of being counted as independent evidence. Each resample's mean pools the
    units of the drawn clusters (a cluster drawn twice counts twice).

    Returns:
        The ``n_boot`` resampled means.
    """
    v = np.asarray(values, dtype=float)
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inv.max()) + 1 if len(inv) else 0
    if n_groups == 0:
        raise ValueError("no values to resample")
    sums = np.bincount(inv, weights=v, minlength=n_groups)
    counts = np.bincount(inv, minlength=n_groups).astype(float)
    draws = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
    return (draws @ sums) / (draws @ counts)  # [n_boot]: every draw holds at least one unit


def paired_difference(
    base: np.ndarray,
    tuned: np.ndarray,
    level: float = 0.95,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Mean of tuned − base over paired completions (same prompt, same seed), its standard error,
    an interval and how many standard errors it is from zero.

    Without ``groups`` the pairs are taken as independent: a t-interval and a paired t-test. With
    ``groups`` (each pair's prompt id; several samples of one prompt are not independent) the
    standard error is the spread of a cluster bootstrap over prompts
    (:func:`cluster_bootstrap_means`), the interval its percentiles, and ``p_value`` the two-sided
    p of mean / se against a t distribution with (prompts − 1) degrees of freedom.
    """
    d = np.asarray(tuned, float) - np.asarray(base, float)
    n = len(d)
    if n < 2:
        raise ValueError("need at least two paired completions")
    if groups is not None:
        n_clusters = len(np.unique(np.asarray(groups)))
        if n_clusters < 2:
            raise ValueError("need paired completions of at least two prompts")
        boot = cluster_bootstrap_means(d, groups, n_boot, seed)
        mean, se = float(d.mean()), float(boot.std(ddof=1))
        lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
        n_se = mean / se if se > 0 else float("inf")
        return {
            "mean": mean,
            "se": se,
            "ci_low": float(lo),
            "ci_high": float(hi),
            "level": level,
            "n_se": n_se,
            "p_value": float(2 * stats.t.sf(abs(n_se), n_clusters - 1)) if se > 0 else 0.0,
            "n_clusters": n_clusters,
            "method": f"cluster bootstrap over {n_clusters} prompts ({n_boot} resamples)",
        }
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * se)
    mean = float(d.mean())
    return {
        "mean": mean,
        "se": se,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "level": level,
        "n_se": mean / se if se > 0 else float("inf"),
        "p_value": float(stats.ttest_1samp(d, 0.0).pvalue),
        "n_clusters": n,
        "method": "paired t-test (pairs independent)",
    }


def words_of(text: str) -> list[str]:
    """Lower-cased words by the reward's segmentation (so counts line up with valences)."""
    return [w.text for w in reward.segment(text)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over a set of completions."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        ws = words_of(t)
        grams += [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def word_shifts(base_texts: list[str], tuned_texts: list[str], top: int = 15) -> pd.DataFrame:
    """Words whose count RL raised or lowered most (equal numbers of completions on each side).

    Returns:
        Rows (word, base_count, tuned_count, delta, valence, direction): the ``top`` most raised and
        most lowered words by count difference, plus the ``top`` most raised and lowered among
        VADER-lexicon words (function words otherwise crowd those out).
    """
    b = Counter(w for t in base_texts for w in words_of(t))
    u = Counter(w for t in tuned_texts for w in words_of(t))
    lex = reward.lexicon()
    df = pd.DataFrame(
        [
            {"word": w, "base_count": b[w], "tuned_count": u[w], "delta": u[w] - b[w], "valence": lex.get(w, 0.0)}
            for w in set(b) | set(u)
        ]
    )
    if df.empty:
        return df.assign(direction=[])
    parts = []
    for subset in (df, df[df.valence != 0]):
        parts.append(
            subset[subset.delta > 0]
            .sort_values(["delta", "word"], ascending=[False, True])
            .head(top)
            .assign(direction="raised")
        )
        parts.append(
            subset[subset.delta < 0]
            .sort_values(["delta", "word"], ascending=[True, True])
            .head(top)
            .assign(direction="lowered")
        )
    return pd.concat(parts, ignore_index=True).drop_duplicates("word").reset_index(drop=True)


@torch.no_grad()
def per_token_kl(
    tuned_hf,
    base_hf,
    sequences: list[tuple[list[int], list[int]]],
    bos: list[int],
    device: str = "cpu",
    batch_size: int = 64,
) -> float:
    """Mean over completion tokens of the exact KL(tuned ‖ base) of the next-token distributions.

    Args:
        sequences: (prompt_ids, completion_ids) pairs, completions sampled from the tuned policy.
        bos: the BOS prefix the policies were sampled with.
    """
    total, count = 0.0, 0
    by_len: dict[int, list[tuple[list[int], list[int]]]] = {}
    for p, c in sequences:
        if c:
            by_len.setdefault(len(bos) + len(p) + len(c), []).append((p, c))
    for group in by_len.values():
        for s in range(0, len(group), batch_size):
            chunk = group[s : s + batch_size]
            ids = torch.tensor([bos + p + c for p, c in chunk], device=device)
            lt = torch.log_softmax(tuned_hf(input_ids=ids).logits.float(), -1)  # [b, pos, vocab]
            lb = torch.log_softmax(base_hf(input_ids=ids).logits.float(), -1)
            kl = (lt.exp() * (lt - lb)).sum(-1)  # [b, pos]: KL of the distribution predicting pos+1
            for row, (p, c) in enumerate(chunk):
                start = len(bos) + len(p) - 1  # position predicting the first completion token
                total += float(kl[row, start : start + len(c)].sum())
                count += len(c)
    return total / count if count else float("nan")
