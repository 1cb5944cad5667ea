"""Probe stage: recover the VADER feedback from SAE features (per token), the implicit reward model,
attributions, and the logistic/PCA separation of IMDB reviews — for the tuned and the base model,
each through its own SAEs."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lfp_core import probes, reward, rewards, saes, seqprobes
from lfp_core.features import RowLookup
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import ROLES, harvest_dir, harvest_hook, own_saes, selected_layers
from lfp_core.settings import ProbesStageSettings, RunSettings
from lfp_core.store import put_rows

log = logging.getLogger(__name__)


def role_features(ctx: Context, role: str, layers: list[int], rows: np.ndarray) -> np.ndarray:
    """SAE features of ``role``'s activations through ``role``'s own main SAEs, layers in numeric order."""
    h = harvest_dir(ctx)
    parts = []
    for layer, sae in own_saes(ctx, role, layers).items():
        acts = h.acts(role, layer)
        parts.append(
            np.concatenate([f.cpu().numpy() for _, _, f in saes.encode_batches(sae, acts, rows)])
            if len(rows)
            else np.zeros((0, sae.cfg.d_sae), dtype=np.float32)
        )
    return np.concatenate(parts, axis=1)


def rows_by_doc(row_doc: np.ndarray, doc_ids) -> list[np.ndarray]:
    """Harvest rows of each document in ``doc_ids`` (ascending row order; empty where it has none),
    from one sort of the row index instead of a scan of every row per document."""
    order = np.argsort(row_doc, kind="stable")
    sorted_doc = row_doc[order]
    lo = np.searchsorted(sorted_doc, doc_ids, side="left")
    hi = np.searchsorted(sorted_doc, doc_ids, side="right")
    return [order[a:b] for a, b in zip(lo, hi)]


def _pooled(ctx: Context, role: str, layers: list[int], doc_rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over each document's harvest rows of its SAE features and of its raw activations (layers
    concatenated), accumulated batch by batch: memory holds one batch and the per-document sums."""
    import torch

    flat = np.concatenate(doc_rows)
    owner = torch.from_numpy(np.repeat(np.arange(len(doc_rows)), [len(x) for x in doc_rows]))
    counts = np.array([len(x) for x in doc_rows], dtype=np.float64)[:, None]
    h = harvest_dir(ctx)
    feats, raws = [], []
    for layer, sae in own_saes(ctx, role, layers).items():
        fsum = torch.zeros(len(doc_rows), int(sae.cfg.d_sae), dtype=torch.float64)
        rsum = torch.zeros(len(doc_rows), int(sae.cfg.d_in), dtype=torch.float64)
        start = 0
        for idx, x, f in saes.encode_batches(sae, h.acts(role, layer), flat):
            who = owner[start : start + len(idx)]
            fsum.index_add_(0, who, f.double().cpu())
            rsum.index_add_(0, who, x.double().cpu())
            start += len(idx)
        feats.append(fsum.numpy() / counts)
        raws.append(rsum.numpy() / counts)
    return np.concatenate(feats, axis=1), np.concatenate(raws, axis=1)


def _forward_batches(
    ctx: Context, role: str, layers: list[int], seqs: list[list[int]], batch_size: int, last_only: bool = False
):
    """Run ``role``'s model over ``seqs`` batched by length (nothing padded); yield (sequence indices,
    SAE features [batch, pos, d_sae·L] through its own SAEs, the raw activations they read (the MLP
    outputs by default) [batch, pos, d_model·L]);
    ``last_only``: only the last position of each (pos = 1), without encoding the others."""
    import torch

    from lfp_core.pipeline.saes import role_model

    hooked = role_model(ctx, role).hooked()
    sae_of = own_saes(ctx, role, layers)
    names = [sae.cfg.metadata.hook_name for sae in sae_of.values()]  # the hook each SAE reads
    batch_size = ctx.batch(batch_size)
    by_len: dict[int, list[int]] = {}
    for i, sq in enumerate(seqs):
        by_len.setdefault(len(sq), []).append(i)
    with torch.no_grad():
        for idxs in by_len.values():
            for start in range(0, len(idxs), batch_size):
                part = idxs[start : start + batch_size]
                _, cache = hooked.run_with_cache(
                    torch.tensor([seqs[i] for i in part]), names_filter=names, stop_at_layer=max(layers) + 1
                )
                acts = {n: cache[n][:, -1:] if last_only else cache[n] for n in names}
                yield (
                    part,
                    torch.cat([sae.encode(acts[n]) for sae, n in zip(sae_of.values(), names)], -1),
                    torch.cat([acts[n] for n in names], -1),
                )


def _filled(rows: list[np.ndarray | None]) -> list[np.ndarray]:
    """``rows`` with every slot filled (a batch that skipped a sequence is a bug, not missing data)."""
    missing = [i for i, x in enumerate(rows) if x is None]
    if missing:
        raise RuntimeError(f"{len(missing)} sequences got no features (first: {missing[0]})")
    return [x for x in rows if x is not None]


def last_position_features(
    ctx: Context, role: str, layers: list[int], seqs: list[list[int]], batch_size: int = 64
) -> np.ndarray:
    """SAE features (own SAEs, layers concatenated) at the last token of each sequence (BOS included)."""
    out: list[np.ndarray | None] = [None] * len(seqs)
    for part, f, _ in _forward_batches(ctx, role, layers, seqs, batch_size, last_only=True):
        for i, row in zip(part, f[:, -1].cpu().numpy()):
            out[i] = row
    return np.stack(_filled(out))


def pooled_features(
    ctx: Context, role: str, layers: list[int], seqs: list[list[int]], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over each sequence's tokens (BOS excluded) of its SAE features (own SAEs, layers
    concatenated) and of its raw MLP outputs. Sequences are batched by length: nothing is padded."""
    feats: list[np.ndarray | None] = [None] * len(seqs)
    raws: list[np.ndarray | None] = [None] * len(seqs)
    for part, f, raw in _forward_batches(ctx, role, layers, seqs, batch_size):
        for i, a, b in zip(part, f[:, 1:].mean(1).cpu().numpy(), raw[:, 1:].mean(1).cpu().numpy()):
            feats[i], raws[i] = a, b
    return np.stack(_filled(feats)), np.stack(_filled(raws))


def mlp_outputs_at(
    ctx: Context,
    role: str,
    doc_tokens: dict[int, list[int]],
    doc_a: np.ndarray,
    pos_a: np.ndarray,
    layers: list[int],
    batch_size: int = 32,
    hook: str = "hook_mlp_out",
) -> np.ndarray:
    """Raw ``blocks.L.<hook>`` (the harvested hook; the MLP output by default) of ``layers`` (concatenated,
    numeric order) at each (document, position), with BOS prepended as in the harvest; documents batched by
    length (nothing padded)."""
    import torch

    from lfp_core.pipeline.saes import role_model

    hooked = role_model(ctx, role).hooked()
    bos = [ctx.model.tokenizer.bos_token_id] if ctx.model.tokenizer.bos_token_id is not None else []
    names = [f"blocks.{layer}.{hook}" for layer in sorted(layers)]
    batch_size = ctx.batch(batch_size)
    out = np.zeros((len(doc_a), hooked.cfg.d_model * len(names)), dtype=np.float32)
    where: dict[int, list[int]] = {}
    for i, d in enumerate(doc_a):
        where.setdefault(int(d), []).append(i)
    by_len: dict[int, list[int]] = {}
    for d in where:
        by_len.setdefault(len(doc_tokens[d]), []).append(d)
    with torch.no_grad():
        for group in by_len.values():
            for start in range(0, len(group), batch_size):
                part = group[start : start + batch_size]
                _, cache = hooked.run_with_cache(
                    torch.tensor([bos + list(doc_tokens[d]) for d in part]),
                    names_filter=names,
                    stop_at_layer=max(layers) + 1,
                )
                acts = torch.cat([cache[n][:, len(bos) :] for n in names], -1).cpu().numpy()  # [batch, pos, d_model·L]
                for b, d in enumerate(part):
                    idx = where[d]
                    out[idx] = acts[b, pos_a[idx]]
    return out


def input_controls(
    ctx: Context,
    role: str,
    layers: list[int],
    rows: np.ndarray,
    doc_tokens: dict[int, list[int]],
    doc_a: np.ndarray,
    pos_a: np.ndarray,
    words: np.ndarray,
    y: np.ndarray,
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
    lex_range: tuple[float, float],
) -> dict:
    """Baselines beside the SAE probe — the same ridge, splits and penalty search on other inputs — to say
    where the feedback signal lives: the token's input embedding in ``role``'s model (token identity: what a
    lookup of the token alone recovers), the raw MLP outputs the SAEs read (does the SAE basis lose
    anything?), a difference-of-means direction on those (no fitted weights but one mean per sign), and raw
    MLP outputs of every layer (how much of it sits outside the layers RL changed most?). ``splits`` maps
    a split to (its test mask, its penalty-search groups or None). τ per split, as for the probe."""
    from lfp_core.pipeline.saes import role_model

    h = harvest_dir(ctx)
    n_layers = ctx.model.hooked().cfg.n_layers
    raw = np.concatenate([np.asarray(h.acts(role, layer)[rows], dtype=np.float32) for layer in sorted(layers)], axis=1)
    tok_ids = np.array([doc_tokens[int(d)][int(p)] for d, p in zip(doc_a, pos_a)], dtype=np.int64)
    embed = role_model(ctx, role).hooked().W_E.detach().float().cpu().numpy()[tok_ids]  # [n_points, d_model]
    inputs = {
        "token_embedding": embed,
        "raw_selected": raw,
        "raw_all_layers": mlp_outputs_at(
            ctx, role, doc_tokens, doc_a, pos_a, list(range(n_layers)), hook=harvest_hook(ctx)
        ),
    }
    return probes.score_inputs(inputs, y, words, splits, lex_range)


def labelled_texts(run: RunSettings, tok, n: int) -> dict[str, tuple[list[list[int]], np.ndarray]]:
    """The other separation tasks, when their data is reachable: HH-RLHF chosen vs rejected responses
    and toxic (hate/offensive) vs non-toxic tweets (Davidson et al.), ``n`` texts per class, first 64 tokens."""
    from lfp_core import corpora

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    enc = lambda t: bos + tok(t, add_special_tokens=False)["input_ids"][:64]  # noqa: E731
    rng = np.random.default_rng([run.seed, 67])
    out = {}
    try:
        pairs, _ = corpora.hh_pairs(run.data_dir)
        pick = rng.permutation(len(pairs))[:n]
        texts = [enc(pairs[i]["chosen"]) for i in pick] + [enc(pairs[i]["rejected"]) for i in pick]
        out["hh"] = (texts, np.array(["chosen"] * len(pick) + ["rejected"] * len(pick)))
    except (FileNotFoundError, corpora.DataFormatError) as exc:
        log.warning("HH-RLHF not reachable for the separation probe: %s", exc)
    try:
        if run.data_dir is None:
            raise FileNotFoundError("no data dir")
        tweets = corpora.davidson_tweets(run.data_dir)
        toxic = [t for t in tweets if t["label"] in (0, 1)]
        clean = [t for t in tweets if t["label"] == 2]
        a = [toxic[i] for i in rng.permutation(len(toxic))[:n]]
        b = [clean[i] for i in rng.permutation(len(clean))[:n]]
        out["toxicity"] = ([enc(t["text"]) for t in a + b], np.array(["toxic"] * len(a) + ["non-toxic"] * len(b)))
    except (FileNotFoundError, corpora.DataFormatError) as exc:
        log.warning("toxicity data not reachable for the separation probe: %s", exc)
    return {k: ([t for t in texts if len(t) > 1], lab[[len(t) > 1 for t in texts]]) for k, (texts, lab) in out.items()}


def contrastive(
    ctx: Context,
    role: str,
    layers: list[int],
    items: list[tuple[list[int], int, str, float]],
    swaps: tuple[dict, dict],
    lexicon: dict,
    train_stems: set,
    lex_range: tuple[float, float],
) -> dict:
    """The paper's contrastive variant as a fitted probe (:func:`lfp_core.probes.contrastive_probe`): per
    lexicon-word occurrence, D = F(x) − F(x with a neutral word) at the word, also for the word swapped to
    an opposite-valence one; a ridge from D to the word's valence, fitted on the sentence variants whose
    word's stem is a training stem of the word split and scored on the rest (held-out words, no stem in
    training). The paper's own score signs ‖D‖ by the true valence, so it is not computed."""
    neutral, opposite = swaps
    tok = ctx.model.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    seqs: list[list[int]] = []
    meta: list[tuple] = []
    for ids, pos, word, val in items:
        t = ids[pos]
        if t not in neutral:
            continue
        prefix = bos + list(ids[:pos])
        i_orig, i_neu = len(seqs), len(seqs) + 1
        seqs += [prefix + [t], prefix + [neutral[t]]]
        meta.append((word, val, i_orig, i_neu))
        if t in opposite:
            ow = tok.decode([opposite[t]]).strip().lower()
            meta.append((ow, lexicon[ow], len(seqs), i_neu))
            seqs.append(prefix + [opposite[t]])
    if not meta:
        return {}
    F = last_position_features(ctx, role, layers, seqs)
    words = np.array([m[0] for m in meta], dtype=object)
    valence = np.array([m[1] for m in meta], dtype=float)
    D = np.stack([F[i] - F[j] for _, _, i, j in meta])  # [n_variants, d_sae·L]
    stem = probes.stems(words)
    test = np.array([x not in train_stems for x in stem])
    res = probes.contrastive_probe(D, words, valence, test, stem, *lex_range)
    return {**res, "n_sentences": len(seqs)} if res else {}


@dataclass
class LexiconPoints:
    """Word-end positions of the activation corpus: every word (``*_a`` arrays, for the implicit reward
    model) and the lexicon words that have a harvest row (the probe's points), with both held-out splits."""

    doc_a: np.ndarray  # [n_words] document of each word end
    pos_a: np.ndarray  # [n_words] its position
    rows_all: np.ndarray  # [n_words] its harvest row (-1: none)
    in_lex: np.ndarray  # [n_words] a lexicon word with a row: a probe point
    in_comp: np.ndarray  # [n_words] inside a tuned completion, with a row
    words: np.ndarray  # [n_points] the probe points' words
    y: np.ndarray  # [n_points] their VADER valences
    occ: np.ndarray  # [n_points] held out in the occurrence split
    wsp: np.ndarray  # [n_points] held out in the word split (no test word, nor its stem, is seen in training)
    stem: np.ndarray  # [n_points] the word's Snowball stem: the word split's and its penalty search's groups

    @property
    def rows(self) -> np.ndarray:
        return self.rows_all[self.in_lex]


def lexicon_points(ctx: Context, s: ProbesStageSettings, docs, idx: dict) -> LexiconPoints:
    """The probe's points and splits; refuses a corpus with fewer than ``probes.min_points``."""
    tok, seed = ctx.model.tokenizer, s.run.seed
    lookup = RowLookup(idx["doc_id"], idx["pos"])
    pts = probes.word_end_positions(tok, list(zip(docs.doc_id.astype(int), docs.token_ids)), lexicon_only=False)
    doc_a = np.array([p[0] for p in pts])
    pos_a = np.array([p[1] for p in pts])
    rows_all = lookup(doc_a, pos_a)
    in_lex = np.array([p[4] for p in pts]) & (rows_all >= 0)
    n_lex = int(in_lex.sum())
    if n_lex < s.probes.min_points:
        raise probes.ProbeDataError(
            f"only {n_lex} lexicon-word positions in the activation corpus; the probe needs at least "
            f"{s.probes.min_points}: raise sae_corpus_docs (or lower probe_min_points)"
        )
    words = np.array([p[2] for p in pts], dtype=object)[in_lex]
    y = np.array([p[3] for p in pts])[in_lex]
    occ = probes.occurrence_split(len(y), seed)
    wsp = probes.word_split(words, seed)
    stem = probes.stems(words)
    assert not set(stem[wsp]) & set(stem[~wsp]), "word split leaks test words (or their stems) into training"
    # completion words for the implicit reward model: every word of each tuned completion
    comp = docs[docs.source == "tuned_completion"]
    prefix = dict(zip(comp.doc_id.astype(int), comp.n_prefix.astype(int)))
    in_comp = np.array([d in prefix and p >= prefix[d] for d, p in zip(doc_a, pos_a)]) & (rows_all >= 0)
    return LexiconPoints(doc_a, pos_a, rows_all, in_lex, in_comp, words, y, occ, wsp, stem)


def contrast_items(tok, pts: LexiconPoints, ids_of: dict, n: int) -> list[tuple[list[int], int, str, float]]:
    """The first ``n`` lexicon-word occurrences whose word is one token (for the contrastive swaps)."""
    items: list[tuple[list[int], int, str, float]] = []
    for dd, pp, w, v in zip(pts.doc_a[pts.in_lex], pts.pos_a[pts.in_lex], pts.words, pts.y):
        if len(items) >= n:
            break  # (the loop went on decoding every remaining point: ~14% of the stage)
        ids = list(ids_of[int(dd)])
        if tok.decode([ids[pp]]).strip().lower() == w:
            items.append((ids, int(pp), w, float(v)))
    return items


def token_probe(
    X: np.ndarray, pts: LexiconPoints, role: str, lex_range: tuple[float, float], tuned_counts: Counter, seed: int
) -> tuple[dict, dict, list[dict]]:
    """Ridge probe from SAE features to per-token valence on both splits, with its controls (untrained,
    shuffled) and per-word rows. Returns (summary, the two splits' fits, probe_words rows)."""
    y, words = pts.y, pts.words
    res = {
        "occurrence": probes.evaluate_split(X, y, words, pts.occ, *lex_range, seed),
        "word": probes.evaluate_split(X, y, words, pts.wsp, *lex_range, seed, groups=pts.stem),
    }
    base = probes.baselines(X, y, words, pts.occ, seed)
    d: dict = {}
    word_rows: list[dict] = []
    for split, e in res.items():
        t = e["words"]
        err = np.abs(t["pred_rescaled"] - t["valence"])
        counts = np.array([tuned_counts.get(w, 0) for w in t["word"]])
        d[f"tau_{split}"] = {**e["tau"]["all"], "pos": e["tau"]["pos"], "neg": e["tau"]["neg"]}
        d[f"sign_acc_pos_{split}"], d[f"sign_acc_neg_{split}"] = e["sign_acc_pos"], e["sign_acc_neg"]
        d[f"alpha_{split}"] = e["alpha"]
        d[f"error_vs_tuned_freq_{split}"] = probes.correlation(err, counts)
        word_rows += [
            {
                "role": role,
                "split": split,
                "word": w,
                "valence": float(v),
                "pred": float(p),
                "pred_rescaled": float(sc),
                "n_test": int(n),
                "tuned_count": int(c),
                "abs_error": float(a),
            }
            for w, v, p, sc, n, c, a in zip(
                t["word"], t["valence"], t["pred"], t["pred_rescaled"], t["n_test"], counts, err
            )
        ]
    d["tau_baseline"], d["tau_shuffled"] = base["untrained"], base["shuffled"]
    d["inputs"] = {
        "sae_selected": {
            "dim": int(X.shape[1]),
            **{split: {k: e["tau"]["all"][k] for k in ("tau", "p", "n_words")} for split, e in res.items()},
        }
    }
    return d, res, word_rows


def implicit_reward(
    ctx: Context, role: str, layers: list[int], pts: LexiconPoints, X: np.ndarray, model, oof: np.ndarray, comp, comps
) -> dict:
    """The probe as an implicit reward model: summed predictions over each tuned completion's lexicon
    words (out-of-fold) and over all its words, against the VADER oracle; the worst disagreements."""
    pred_of = dict(zip(zip(pts.doc_a[pts.in_lex], pts.pos_a[pts.in_lex]), oof))
    other = pts.in_comp & ~pts.in_lex
    Xo = role_features(ctx, role, layers, pts.rows_all[other]) if other.any() else np.zeros((0, X.shape[1]))
    pred_of.update(zip(zip(pts.doc_a[other], pts.pos_a[other]), model.predict(Xo) if len(Xo) else []))
    irm_lex: Counter = Counter()
    irm_all: Counter = Counter()
    for dd, pp, lexw, ok in zip(pts.doc_a, pts.pos_a, pts.in_lex, pts.in_comp):
        if ok and (dd, pp) in pred_of:
            irm_all[dd] += pred_of[(dd, pp)]
            if lexw:
                irm_lex[dd] += pred_of[(dd, pp)]
    key = {(int(a), int(b)): int(dd) for dd, a, b in zip(comp.doc_id, comp.prompt_id, comp.sample_idx)}
    true_raw = np.array(comps.raw_score)
    docs_c = [key[(int(a), int(b))] for a, b in zip(comps.prompt_id, comps.sample_idx)]
    lex_sum = np.array([irm_lex.get(x, 0.0) for x in docs_c])
    all_sum = np.array([irm_all.get(x, 0.0) for x in docs_c])
    d: dict = {"irm": probes.correlation(lex_sum, true_raw), "irm_all_words": probes.correlation(all_sum, true_raw)}
    z = lambda v: (v - v.mean()) / (v.std() or 1.0)  # noqa: E731
    gap = z(all_sum) - z(true_raw)
    worst = np.argsort(-np.abs(gap))[:10]
    d["irm_disagreements"] = [
        {
            "prompt": comps.prompt.iloc[i],
            "completion": comps.completion.iloc[i],
            "reward_raw": float(true_raw[i]),
            "irm": float(all_sum[i]),
        }
        for i in worst
    ]
    return d


def attributions(
    role: str, layers: list[int], X: np.ndarray, model, pts: LexiconPoints, oof: np.ndarray
) -> tuple[list[dict], list[dict]]:
    """Per-feature weights and importance |w * mean activation| (probe_features rows), and per-token top
    contributions (probe_tokens rows)."""
    feat_rows = seqprobes.feature_rows(role, layers, X, model)  # one definition of importance and rank
    d_sae = X.shape[1] // len(layers)
    top_i, top_v = probes.contributions(model, X)
    doc_l, pos_l = pts.doc_a[pts.in_lex], pts.pos_a[pts.in_lex]  # once: masking inside the loop made it quadratic
    token_rows = [
        {
            "role": role,
            "doc_id": int(doc_l[k]),
            "pos": int(pos_l[k]),
            "word": pts.words[k],
            "valence": float(pts.y[k]),
            "pred": float(oof[k]),
            "occurrence_split": "test" if pts.occ[k] else "train",
            "word_split": "test" if pts.wsp[k] else "train",
            "top_layers": [sorted(layers)[j // d_sae] for j in top_i[k]],
            "top_features": [int(j % d_sae) for j in top_i[k]],
            "top_contributions": [float(v) for v in top_v[k]],
        }
        for k in range(len(pts.y))
    ]
    return feat_rows, token_rows


def separation(ctx: Context, role: str, layers: list[int], docs, idx: dict, seed: int) -> tuple[dict, list[dict]]:
    """Logistic probe (mean-pooled SAE features vs raw activations) and PCA of IMDB positive vs negative
    reviews. Returns (summary, probe_pca rows)."""
    d: dict = {}
    pca_rows: list[dict] = []
    imdb = docs[docs.label.isin(["pos", "neg"])]
    if len(imdb) >= 20:
        doc_rows = rows_by_doc(idx["doc_id"], imdb.doc_id.astype(int))
        keep = [i for i, x in enumerate(doc_rows) if len(x)]
        pooled, raw = _pooled(ctx, role, layers, [doc_rows[i] for i in keep])
        labels = imdb.label.to_numpy()[keep]
        lg = probes.logistic_probe(pooled, labels, seed)
        lg["raw_acc"] = probes.logistic_probe(raw, labels, seed)["acc"]
        d["logistic"] = {"imdb": lg}
        coords, ratio = probes.pca(pooled)
        d["pca_var_ratio"] = ratio
        d["pca_var_ratio_by_task"] = {"imdb": ratio}
        pca_rows += [
            {"role": role, "task": "imdb", "doc_id": int(dd), "label": lb, "pc1": float(a), "pc2": float(b)}
            for dd, lb, (a, b) in zip(imdb.doc_id.to_numpy()[keep], labels, coords)
        ]
    return d, pca_rows


def extra_separation(ctx: Context, role: str, layers: list[int], extra_tasks: dict, seed: int, d: dict) -> list[dict]:
    """The HH and toxicity separation probes (when their data is reachable), added to ``d``."""
    pca_rows: list[dict] = []
    for task, (seqs, lab) in extra_tasks.items():
        pooled, raw = pooled_features(ctx, role, layers, seqs)
        lg = probes.logistic_probe(pooled, lab, seed)
        lg["raw_acc"] = probes.logistic_probe(raw, lab, seed)["acc"]
        d.setdefault("logistic", {})[task] = lg
        coords, ratio = probes.pca(pooled)
        d.setdefault("pca_var_ratio_by_task", {})[task] = ratio
        pca_rows += [
            {"role": role, "task": task, "doc_id": i, "label": lb, "pc1": float(a), "pc2": float(b)}
            for i, (lb, (a, b)) in enumerate(zip(lab, coords))
        ]
    return pca_rows


def tau_differences(fits: dict[str, dict], seed: int) -> dict:
    """Per split, τ(tuned) − τ(base) of the SAE probe over the same test words, with a bootstrap CI over words."""
    out = {}
    for split in ("occurrence", "word"):
        t, b = fits["tuned"][split], fits["base"][split]
        if not np.array_equal(t["word"], b["word"]):
            raise RuntimeError(f"the {split} split scored different words for the tuned and the base model")
        r = probes.tau_difference(t["pred"], b["pred"], t["valence"], seed)
        out[split] = {"diff": r["diff"], "lo": r["lo"], "hi": r["hi"], "tau_tuned": r["tau_a"], "tau_base": r["tau_b"]}
        out[split].update({"level": r["level"], "n_words": r["n_words"], "n_boot": r["n_boot"]})
    return out


TOKEN_PROBE_PARTS = (
    "the per-token probe (with its controls, input variants and τ difference), the implicit reward model, "
    "the probe's attributions and the contrastive probe"
)


def stage_probes(ctx: Context, s: ProbesStageSettings, config_hash: str) -> None:
    """Per role (tuned, base), through its own SAEs: for a lexicon reward (VADER) the token probe with its
    controls and input variants, the implicit reward model, attributions and the contrastive probe; for
    any reward the sequence probe (:mod:`lfp_core.pipeline.seqprobes`) and the separation probes. For a
    reward that is not a lexicon the token-level parts are recorded as not applicable, with why, and the
    feature ranking comes from the sequence probe."""
    from lfp_core.pipeline.seqprobes import sequence_probes

    r = ctx.writer.reader()
    layers = selected_layers(ctx)
    docs = r.corpus_docs(sources=("imdb", "model_sampled", "corpus", "tuned_completion"))  # corpus: given texts
    if docs.empty:
        raise RuntimeError("no activation corpus: run the activations stage")
    idx = harvest_dir(ctx).index()
    detail: dict
    tables: dict[str, list[dict]]
    if rewards.reward_kind(s.reward.spec) == "lexicon":
        detail, tables = token_probes(ctx, s, layers, docs, idx)
        detail["feature_ranking"] = "token"
    else:
        detail = {"layers": layers, "not_applicable": seqprobes.not_applicable(s.reward.spec)}
        tables = {"probe_pca": []}
        extra_tasks = labelled_texts(s.run, ctx.model.tokenizer, s.probes.texts_per_class)
        for role in ROLES:
            sep, p_rows = separation(ctx, role, layers, docs, idx, s.run.seed)
            tables["probe_pca"] += p_rows + extra_separation(ctx, role, layers, extra_tasks, s.run.seed, sep)
            detail[role] = sep
        detail["feature_ranking"] = "sequence"
    try:
        detail["sequence"], tables["probe_sequences"], seq_features = sequence_probes(ctx, s, layers, idx)
    except probes.ProbeDataError as exc:
        if detail["feature_ranking"] == "sequence":
            raise  # the only probe such a reward has
        detail.setdefault("not_applicable", {})["sequence_probe"] = str(exc)  # beside the token probe: skipped
    if detail["feature_ranking"] == "sequence":
        tables["probe_features"] = seq_features

    def write(con):
        for table, rows_ in tables.items():
            put_rows(con, table, rows_)

    ctx.commit(write, detail)


def token_probes(
    ctx: Context, s: ProbesStageSettings, layers: list[int], docs, idx: dict
) -> tuple[dict, dict[str, list[dict]]]:
    """The lexicon reward's part of the stage (as before the sequence probe): per role the token probe, its
    controls and input variants, the implicit reward model, attributions, the contrastive probe and the
    separation probes; the tuned − base τ differences. Returns (the summary, {table: rows})."""
    r, tok, seed = ctx.writer.reader(), ctx.model.tokenizer, s.run.seed
    pts = lexicon_points(ctx, s, docs, idx)
    rows = pts.rows
    lex = reward.lexicon()
    lex_range = (min(lex.values()), max(lex.values()))
    tuned_counts = Counter(w for ws in r.completions("tuned").lexicon_words for w in (ws if ws is not None else []))
    comp = docs[docs.source == "tuned_completion"]
    swaps = probes.swap_tables(tok, lex)
    ids_of = dict(zip(docs.doc_id.astype(int), docs.token_ids))
    items = contrast_items(tok, pts, ids_of, s.probes.contrast_items)
    extra_tasks = labelled_texts(s.run, tok, s.probes.texts_per_class)
    train_stems = set(pts.stem[~pts.wsp])
    detail: dict = {
        "layers": layers,
        "n_points": int(len(pts.y)),
        "n_words": int(len(np.unique(pts.words))),
        "n_test_occurrence": int(pts.occ.sum()),
        "n_test_word": int(pts.wsp.sum()),
        "word_split_by": "stem",
        "n_stems": int(len(np.unique(pts.stem))),
        "n_test_words_word_split": int(len(np.unique(pts.words[pts.wsp]))),
        "penalty_cv": {"occurrence": "leave-one-out over positions", "word": "5-fold CV grouped by stem"},
        "occurrence_test_stem_overlap": probes.stem_overlap(pts.words[~pts.occ], pts.words[pts.occ]),
    }
    fits: dict[str, dict] = {}
    word_rows, token_rows, feat_rows, pca_rows = [], [], [], []
    for role in ROLES:
        X = role_features(ctx, role, layers, rows)
        d, res, w_rows = token_probe(X, pts, role, lex_range, tuned_counts, seed)
        fits[role] = {split: e["words"] for split, e in res.items()}
        word_rows += w_rows
        d["inputs"].update(
            input_controls(
                ctx,
                role,
                layers,
                rows,
                ids_of,
                pts.doc_a[pts.in_lex],
                pts.pos_a[pts.in_lex],
                pts.words,
                pts.y,
                {"occurrence": (pts.occ, None), "word": (pts.wsp, pts.stem)},
                lex_range,
            )
        )
        d["sign_acc_pos"], d["sign_acc_neg"] = d["sign_acc_pos_occurrence"], d["sign_acc_neg_occurrence"]
        model = res["occurrence"]["model"]
        # implicit reward model: out-of-fold predictions at lexicon words, the model at other words
        oof = probes.out_of_fold(X, pts.y, res["occurrence"]["alpha"], seed)
        d.update(implicit_reward(ctx, role, layers, pts, X, model, oof, comp, r.completions("tuned")))
        f_rows, t_rows = attributions(role, layers, X, model, pts, oof)
        feat_rows += f_rows
        token_rows += t_rows
        sep, p_rows = separation(ctx, role, layers, docs, idx, seed)
        d.update(sep)
        pca_rows += p_rows
        d["contrastive_probe"] = contrastive(ctx, role, layers, items, swaps, lex, train_stems, lex_range)
        pca_rows += extra_separation(ctx, role, layers, extra_tasks, seed, d)
        detail[role] = d
        log.info(
            "probe (%s): τ occurrence %.3f (p %.1e, %d words), τ word %.3f (p %.1e, %d words), untrained %.3f, "
            "shuffled %.3f, sign acc %.2f/%.2f, IRM pearson %.3f%s",
            role,
            d["tau_occurrence"]["tau"],
            d["tau_occurrence"]["p"],
            d["tau_occurrence"]["n_words"],
            d["tau_word"]["tau"],
            d["tau_word"]["p"],
            d["tau_word"]["n_words"],
            d["tau_baseline"]["tau"],
            d["tau_shuffled"]["tau"],
            d["sign_acc_pos"],
            d["sign_acc_neg"],
            d["irm"]["pearson"],
            f", IMDB logistic {d['logistic']['imdb']['acc']:.3f} (raw {d['logistic']['imdb']['raw_acc']:.3f})"
            if "imdb" in d.get("logistic", {})  # no IMDB reviews in a given corpus (HH/toxicity may still be there)
            else "",
        )
    detail["tau_difference"] = tau_differences(fits, seed)
    tables = {"probe_words": word_rows, "probe_tokens": token_rows, "probe_features": feat_rows, "probe_pca": pca_rows}
    return detail, tables
