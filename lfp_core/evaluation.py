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


def paired_difference(base: np.ndarray, tuned: np.ndarray, level: float = 0.95) -> dict:
    """Mean of tuned − base over paired completions (same prompt, same seed), its standard error,
    a t-interval and how many standard errors it is from zero."""
    d = np.asarray(tuned, float) - np.asarray(base, float)
    n = len(d)
    if n < 2:
        raise ValueError("need at least two paired completions")
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
