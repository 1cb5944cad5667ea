"""Do the labeller's reward-related features agree with the probe? The paper's frequency table: how
often each feature set fires on high- vs low-reward completions of the tuned policy (paired Wilcoxon
test over the set's features), and the overlap of the labeller-flagged set with the probe-top set
(hypergeometric p-value over the labelled features).

What the overlap tests: the offline labeller calls a feature reward-related when its activation tracks
|VADER valence| on held-out text; the probe ranks features by a ridge fit to VADER valence on its own
text. The scoring text holds none of the probe's points, so the two do not share a sample, but both
read word valence: a large overlap shows the two readings agree (consistency), not that an independent
judge confirms the probe. With an LLM labeller relevance is the LLM's reading of an explanation written
from the feature's top examples, a judgement that does not read valence values."""

from __future__ import annotations

import numpy as np

from lfp_core import saes
from lfp_core.features import RowLookup
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import harvest_dir


def completion_firing(ctx: Context, layers: list[int], sae_of: dict) -> tuple[dict, np.ndarray]:
    """Per (layer, feature): a boolean vector over the tuned policy's completions (fires on any completion
    token); and the completions' rewards in the same order."""
    r = ctx.writer.reader()
    docs = r.corpus_docs(sources=("tuned_completion",))
    comps = r.completions("tuned")
    reward_of = {(int(a), int(b)): float(x) for a, b, x in zip(comps.prompt_id, comps.sample_idx, comps.reward)}
    rewards = np.array([reward_of[(int(a), int(b))] for a, b in zip(docs.prompt_id, docs.sample_idx)])
    idx = harvest_dir(ctx).index()
    lookup = RowLookup(idx["doc_id"], idx["pos"])
    owner, rows = [], []
    for k, (d, n0, n) in enumerate(zip(docs.doc_id, docs.n_prefix, docs.n_tokens)):
        rr = lookup(np.full(int(n) - int(n0), int(d)), np.arange(int(n0), int(n)))
        rr = rr[rr >= 0]
        rows.append(rr)
        owner.append(np.full(len(rr), k))
    rows_a, owner_a = np.concatenate(rows), np.concatenate(owner)
    out = {}
    h = harvest_dir(ctx)
    for layer, sae in sae_of.items():
        fired = np.zeros((len(docs), int(sae.cfg.d_sae)), dtype=bool)
        start = 0
        for ix, _, f in saes.encode_batches(sae, h.acts("tuned", layer), rows_a):
            np.logical_or.at(fired, owner_a[start : start + len(ix)], (f > 0).cpu().numpy())
            start += len(ix)
        for j in range(fired.shape[1]):
            out[(layer, j)] = fired[:, j]
    return out, rewards


def frequency_table(firing: dict, rewards: np.ndarray, sets: dict[str, list]) -> list[dict]:
    """Per feature set: mean firing rate on the top- and bottom-quartile completions by reward, and the
    paired Wilcoxon p-value over the set's features (high vs low)."""
    from scipy.stats import wilcoxon

    hi, lo = rewards >= np.quantile(rewards, 0.75), rewards <= np.quantile(rewards, 0.25)
    out = []
    for name, keys in sets.items():
        fh = np.array([firing[k][hi].mean() for k in keys]) if keys else np.zeros(0)
        fl = np.array([firing[k][lo].mean() for k in keys]) if keys else np.zeros(0)
        p = float(wilcoxon(fh, fl).pvalue) if len(keys) >= 5 and np.any(fh != fl) else None
        out.append(
            {
                "set": name,
                "n_features": len(keys),
                "freq_high": float(fh.mean()) if len(fh) else None,
                "freq_low": float(fl.mean()) if len(fl) else None,
                "p": p,
                "n_high": int(hi.sum()),
                "n_low": int(lo.sum()),
            }
        )
    return out


def overlap(labelled: list, flagged: set, probe_top: set) -> dict:
    """Overlap of the flagged and probe-top sets among the labelled features; P(X ≥ overlap) under random
    draws (hypergeometric)."""
    from scipy.stats import hypergeom

    N, K, n = len(labelled), len(flagged), len(probe_top)
    k = len(flagged & probe_top)
    p = float(hypergeom.sf(k - 1, N, K, n)) if N else None
    return {"n": k, "n_labelled": N, "n_flagged": K, "n_probe_top": n, "p": p, "expected": K * n / N if N else None}


def agreement_detail(ctx: Context, layers: list[int], sae_of: dict) -> dict:
    labels = ctx.writer.reader().labels("tuned")
    firing, rewards = completion_firing(ctx, layers, sae_of)
    key = lambda df: [(int(a), int(b)) for a, b in zip(df.layer, df.feature)]  # noqa: E731
    flagged = labels[labels.relevant.fillna(False).astype(bool)]
    top = labels[labels.selection == "probe_top"]
    sets = {
        "all features": sorted(firing),
        "labelled": key(labels),
        "labeller: reward-related": key(flagged),
        "labeller: not related": key(labels[labels.relevant.notna() & ~labels.relevant.fillna(False).astype(bool)]),
        "probe top": key(top),
    }
    acc = labels.detection_acc.dropna()
    return {
        "n_labelled": int(len(labels)),
        "n_relevant": int(len(flagged)),
        "n_unparsed": int(labels.n_unparsed.fillna(0).sum()),
        "detection_acc_mean": float(acc.mean()) if len(acc) else None,
        "n_not_detection_scored": int(len(labels) - len(acc)),  # no held-out window where it fires (or none quiet)
        "frequency": frequency_table(firing, rewards, sets),
        "overlap": overlap(key(labels), set(key(flagged)), set(key(top))),
    }
