"""Per-feature statistics of an SAE over harvested activations, for the dashboard's feature pages.

Two streaming passes over the activations (memory bounded by a batch plus per-feature state):

1. density, mean and max activation, firing counts per text source (base- vs tuned-model
   completions), and a running top-M of activating rows per feature;
2. a fixed-bin histogram of non-zero activations (``n_bins`` equal bins over [0, max]) and a
   size-capped uniform subsample of firing rows, from which equal-width activation intervals
   are sampled.

Examples keep a ±``window`` token context with the feature's activation on every token of it.
Logit effects are the decoder row through the unembedding (W_dec[f] · W_U, the direct effect on
the logits, ignoring the final LayerNorm); neighbours are the nearest decoder rows by cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lfp_core.saes import encode_batches
from lfp_core.settings import FeatureSettings


@dataclass(frozen=True)
class TableLayout:
    """The fixed shape of a feature page's tables (not run settings: the dashboard is drawn for
    these sizes). The run's choices (top examples per feature, context window) are
    :class:`lfp_core.settings.FeatureSettings`."""

    n_intervals: int = 10
    per_interval: int = 2
    n_bins: int = 20
    n_logits: int = 10
    n_neighbours: int = 10
    n_top_tokens: int = 8
    subsample_cap: int = 400


class RowLookup:
    """Maps (doc_id, position) to the harvest row, or −1 for positions without a row (masked)."""

    def __init__(self, doc_id: np.ndarray, pos: np.ndarray, max_len: int = 1 << 20):
        self.max_len = max_len
        keys = doc_id.astype(np.int64) * max_len + pos.astype(np.int64)
        self.order = np.argsort(keys)
        self.keys = keys[self.order]

    def __call__(self, doc_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
        k = doc_id.astype(np.int64) * self.max_len + pos.astype(np.int64)
        i = np.clip(np.searchsorted(self.keys, k), 0, len(self.keys) - 1)
        return np.where(self.keys[i] == k, self.order[i], -1)


@torch.no_grad()
def feature_tables(
    sae,
    acts: np.ndarray,
    index: dict[str, np.ndarray],
    doc_tokens: dict[int, list[int]],
    row_source: np.ndarray,
    W_U: torch.Tensor,
    token_str,
    s: FeatureSettings,
    role: str,
    layer: int,
    seed: int = 0,
    layout: TableLayout = TableLayout(),
) -> tuple[list[dict], list[dict]]:
    """Compute the ``features`` and ``feature_examples`` rows of one SAE.

    Args:
        sae: the inference SAE.
        acts: harvested activations (rows x d_in) the SAE reads.
        index: the harvest index (doc_id, pos, token_id per row).
        doc_tokens: the corpus documents' token ids (without BOS), by doc id.
        row_source: per row, the text source of its document (e.g. 'imdb', 'base_completion').
        W_U: the model's unembedding (d_model x vocab).
        token_str: token id -> display string.
        s: the run's feature settings (top examples per feature, context window).
        seed: the run's seed (interval examples are sampled with it).
        layout: the tables' fixed shape.
    """
    d_sae = int(sae.cfg.d_sae)
    m = max(s.top_k * 5, s.top_k)
    count = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    vmax = torch.zeros(d_sae)
    top_v = torch.full((d_sae, m), -1.0)
    top_r = torch.full((d_sae, m), -1, dtype=torch.long)
    sources = {"base_completion": torch.zeros(d_sae), "tuned_completion": torch.zeros(d_sae)}
    n_src = {k: int((row_source == k).sum()) for k in sources}
    n_rows = acts.shape[0]
    fired_at = []  # per batch: (rows, features, values) of every firing, for pass 2 without encoding again
    for idx, _, f in encode_batches(sae, acts):
        f = f.float().cpu()
        fired = f > 0
        r, c = torch.nonzero(fired, as_tuple=True)
        fired_at.append((idx, r.int(), c.int(), f[r, c]))  # 12 bytes a firing (~160 MB for 410k rows at L0 32)
        count += fired.sum(0)
        total += f.sum(0).double()
        vmax = torch.maximum(vmax, f.max(0).values)
        for k, v in sources.items():
            in_source = torch.from_numpy(row_source[idx] == k)
            if in_source.any():
                v += fired[in_source].sum(0)
        cand_v = torch.cat([top_v, f.T], dim=1)
        cand_r = torch.cat([top_r, torch.from_numpy(idx).long().expand(d_sae, -1)], dim=1)
        top_v, j = cand_v.topk(m, dim=1)
        top_r = cand_r.gather(1, j)
    # pass 2 (over pass 1's firings): histogram and a capped uniform subsample of firing rows
    rng = np.random.default_rng([seed, layer, 7])
    keep_p = torch.clamp(layout.subsample_cap / count.clamp_min(1), max=1.0).float()
    hist = torch.zeros(d_sae, layout.n_bins, dtype=torch.long)
    parts_f, parts_r, parts_v = [], [], []
    safe_max = vmax.clamp_min(1e-12)
    for idx, r, c, v in fired_at:
        b = torch.clamp((v / safe_max[c] * layout.n_bins).long(), max=layout.n_bins - 1)
        hist.view(-1).index_add_(0, c * layout.n_bins + b, torch.ones_like(b))
        u = torch.from_numpy(rng.random(len(v))).float()
        keep = (u < keep_p[c]) | (v > 0.5 * vmax[c])
        parts_f.append(c[keep].numpy())
        parts_r.append(idx[r[keep].numpy()])
        parts_v.append(v[keep].numpy())
    samp_f, samp_r, samp_v = (np.concatenate(a) if a else np.zeros(0) for a in (parts_f, parts_r, parts_v))

    # examples: top-k (at most one per document) and interval samples
    examples: list[tuple[int, str, int, int, int, float]] = []  # feature, kind, rank, interval, row, act
    for feat in range(d_sae):
        seen: set[int] = set()
        rank = 0
        for v, r in zip(top_v[feat].tolist(), top_r[feat].tolist()):
            if v <= 0 or r < 0 or rank >= s.top_k:
                break
            d = int(index["doc_id"][r])
            if d in seen:
                continue
            seen.add(d)
            examples.append((feat, "top", rank, -1, r, v))
            rank += 1
    order = np.argsort(samp_f, kind="stable")
    bounds = np.searchsorted(samp_f[order], np.arange(d_sae + 1))
    for feat in range(d_sae):
        sel = order[bounds[feat] : bounds[feat + 1]]
        if len(sel) == 0:
            continue
        mx = float(vmax[feat])
        ib = np.minimum((samp_v[sel] / mx * layout.n_intervals).astype(int), layout.n_intervals - 1)
        for iv in range(layout.n_intervals):
            pool = sel[ib == iv]
            if len(pool) == 0:
                continue
            pick = rng.choice(pool, size=min(layout.per_interval, len(pool)), replace=False)
            for rank, p in enumerate(pick):
                examples.append((feat, "interval", rank, iv, int(samp_r[p]), float(samp_v[p])))

    ex_rows = _contexts(sae, acts, index, doc_tokens, examples, s.window, token_str, role, layer)
    top_tokens: dict[int, list[str]] = {}
    for e in ex_rows:  # distinct tokens the feature fires on most, in rank order (searchable in the browser)
        if e["kind"] == "top":
            toks = top_tokens.setdefault(e["feature"], [])
            if e["tokens"][e["center"]] not in toks and len(toks) < layout.n_top_tokens:
                toks.append(e["tokens"][e["center"]])

    # logit effects and decoder neighbours
    W_dec = sae.W_dec.detach().float().cpu()
    logits = W_dec @ W_U.detach().float().cpu()
    n_l = min(layout.n_logits, logits.shape[1])
    top_l = logits.topk(n_l, dim=1)
    bot_l = (-logits).topk(n_l, dim=1)
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2.0)
    n_nb = min(layout.n_neighbours, d_sae - 1)
    nb = cos.topk(n_nb, dim=1) if n_nb > 0 else None
    feats = []
    for feat in range(d_sae):
        n_fired = float(count[feat])
        feats.append(
            {
                "role": role,
                "layer": layer,
                "feature": feat,
                "density": n_fired / n_rows,
                "n_fired": int(n_fired),
                "mean_act": float(total[feat]) / n_fired if n_fired else 0.0,
                "max_act": float(vmax[feat]),
                "hist_counts": hist[feat].tolist(),
                "top_tokens": top_tokens.get(feat, []),
                "freq_base_text": float(sources["base_completion"][feat]) / n_src["base_completion"]
                if n_src["base_completion"]
                else None,
                "freq_tuned_text": float(sources["tuned_completion"][feat]) / n_src["tuned_completion"]
                if n_src["tuned_completion"]
                else None,
                "top_logit_tokens": [token_str(int(t)) for t in top_l.indices[feat]],
                "top_logit_values": top_l.values[feat].tolist(),
                "bottom_logit_tokens": [token_str(int(t)) for t in bot_l.indices[feat]],
                "bottom_logit_values": (-bot_l.values[feat]).tolist(),
                "neighbours": nb.indices[feat].tolist() if nb is not None else [],
                "neighbour_cos": nb.values[feat].tolist() if nb is not None else [],
            }
        )
    return feats, ex_rows


@torch.no_grad()
def _contexts(sae, acts, index, doc_tokens, examples, window, token_str, role, layer) -> list[dict]:
    """Token windows around each example with the feature's activation on every token."""
    if not examples:
        return []
    lookup = RowLookup(index["doc_id"], index["pos"])
    spans: list[tuple] = []
    want_rows: list[int] = []
    want_feat: list[int] = []
    for feat, kind, rank, iv, r, v in examples:
        d, p = int(index["doc_id"][r]), int(index["pos"][r])
        toks = doc_tokens[d]
        lo, hi = max(0, p - window), min(len(toks), p + window + 1)
        positions = np.arange(lo, hi)
        rows = lookup(np.full(len(positions), d), positions)
        spans.append((feat, kind, rank, iv, d, p, v, lo, toks[lo:hi], len(want_rows), len(rows)))
        want_rows.extend(rows.tolist())
        want_feat.extend([feat] * len(rows))
    want_rows_a, want_feat_a = np.asarray(want_rows), np.asarray(want_feat)
    vals = np.zeros(len(want_rows_a), dtype=np.float32)
    ok = np.nonzero(want_rows_a >= 0)[0]
    uniq, inv = np.unique(want_rows_a[ok], return_inverse=True)
    for start in range(0, len(uniq), 8192):
        rows = uniq[start : start + 8192]
        f = sae.encode(torch.from_numpy(np.asarray(acts[rows], dtype=np.float32)).to(sae.device)).float().cpu()
        sel = np.nonzero((inv >= start) & (inv < start + len(rows)))[0]
        vals[ok[sel]] = f[torch.from_numpy(inv[sel] - start), torch.from_numpy(want_feat_a[ok[sel]])].numpy()
    out = []
    for feat, kind, rank, iv, d, p, v, lo, toks, off, n in spans:
        out.append(
            {
                "role": role,
                "layer": layer,
                "feature": feat,
                "kind": kind,
                "rank": rank,
                "interval": iv,
                "doc_id": d,
                "pos": p,
                "act": v,
                "center": p - lo,
                "tokens": [token_str(int(t)) for t in toks],
                "token_ids": [int(t) for t in toks],
                "acts": [round(float(x), 4) for x in vals[off : off + n]],
            }
        )
    return out


@torch.no_grad()
def top_tokens_of(
    sae, acts: np.ndarray, rows: np.ndarray, token_ids: np.ndarray, features: list[int], token_str, n: int = 8
) -> dict[int, list[str]]:
    """The distinct tokens at which each of ``features`` fires most strongly over harvest ``rows`` (up
    to ``n`` per feature, strongest first); ``token_ids`` is the harvest index's token column."""
    from lfp_core.saes import encode_batches

    feats = sorted({int(f) for f in features})
    if not feats:
        return {}
    cols = torch.as_tensor(feats, dtype=torch.long)
    best_v = torch.full((len(feats), 0), float("-inf"))
    best_r = torch.zeros((len(feats), 0), dtype=torch.long)
    keep = 8 * n
    for idx, _, f in encode_batches(sae, acts, rows):
        v = f[:, cols.to(f.device)].T.float().cpu()  # [n_feats, batch]
        r = torch.as_tensor(idx, dtype=torch.long).expand(len(feats), -1)
        v, r = torch.cat([best_v, v], 1), torch.cat([best_r, r], 1)
        top = v.topk(min(keep, v.shape[1]), dim=1)
        best_v, best_r = top.values, torch.gather(r, 1, top.indices)
    out: dict[int, list[str]] = {}
    for i, feat in enumerate(feats):
        toks: list[str] = []
        for val, row in zip(best_v[i].tolist(), best_r[i].tolist()):
            t = token_str(int(token_ids[row]))
            if val > 0 and t not in toks:
                toks.append(t)
            if len(toks) >= n:
                break
        out[feat] = toks
    return out
