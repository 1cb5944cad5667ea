"""Labels stage: explain, classify and detection-score the tuned model's probe-top features and as many
random others, with an LLM (``labeller=openai``) or the offline labeller; then the agreement between
the labeller's reward-related features and the probe (the paper's frequency table, with significance)."""

from __future__ import annotations

import logging

import numpy as np

from lfp_core import autointerp, reward, saes
from lfp_core.errors import BadInputError
from lfp_core.features import RowLookup
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.label_agreement import agreement_detail
from lfp_core.pipeline.shared import harvest_dir, own_saes, selected_layers
from lfp_core.settings import LabelsStageSettings
from lfp_core.store import RunWriter, put_rows

log = logging.getLogger(__name__)
CHUNK = 8  # features per committed chunk


class LabelBudgetError(BadInputError):
    pass


class StoreCache:
    """The LLM response cache in the run's DuckDB: every answer is committed as it arrives."""

    def __init__(self, writer: RunWriter):
        self.writer, self.reader = writer, writer.reader()

    def get(self, key: str) -> str | None:
        return self.reader.llm_cached(key)

    def put(self, key: str, model: str, prompt: str, response: str) -> None:
        self.writer.put_llm_cache(key, model, prompt, response)


def choose_features(ctx: Context, s: LabelsStageSettings, layers: list[int]) -> list[tuple[int, int, str]]:
    """(layer, feature, selection): the probe's top-ranked firing features, then a seeded random draw of
    as many firing features from the rest."""
    r = ctx.writer.reader()
    pf = r.firing_probe_features("tuned")
    firing = [(int(a), int(b)) for a, b in zip(pf.layer, pf.feature) if int(a) in layers]
    top = firing[: s.labels.probe_top]
    rest = sorted(set(firing) - set(top))
    pick = np.random.default_rng([s.run.seed, 71]).permutation(len(rest))[: s.labels.random]
    return [(a, b, "probe_top") for a, b in top] + [(*rest[i], "random") for i in sorted(pick)]


def negative_pool(
    ctx: Context, s: LabelsStageSettings, layer: int, sae, n_windows: int = 300
) -> tuple[list[autointerp.Excerpt], np.ndarray]:
    """Held-out windows (±feature_window tokens) and, per window, each feature's max activation over it."""
    r = ctx.writer.reader()
    h = harvest_dir(ctx)
    idx = h.index()
    lookup = RowLookup(idx["doc_id"], idx["pos"])
    rng = np.random.default_rng([s.run.seed, layer, 73])
    centres = rng.choice(np.nonzero(idx["is_eval"])[0], size=min(n_windows, int(idx["is_eval"].sum())), replace=False)
    docs = r.act_docs(sorted({int(idx["doc_id"][c]) for c in centres}))
    toks = {int(d): list(t) for d, t in zip(docs.doc_id, docs.token_ids)}
    w = s.features.window
    spans, owner, want = [], [], []
    for k, c in enumerate(centres):
        d, p = int(idx["doc_id"][c]), int(idx["pos"][c])
        lo = max(0, p - w)
        ids = toks[d][lo : p + w + 1]
        rows = lookup(np.full(len(ids), d), np.arange(lo, lo + len(ids)))
        spans.append(ids)
        want.append(rows[rows >= 0])
        owner.append(np.full(int((rows >= 0).sum()), k))
    rows_a, owner_a = np.concatenate(want), np.concatenate(owner)
    maxes = np.zeros((len(centres), int(sae.cfg.d_sae)), dtype=np.float32)
    start = 0
    for ix, _, f in saes.encode_batches(sae, h.acts("tuned", layer), rows_a):  # all windows in one pass
        np.maximum.at(maxes, owner_a[start : start + len(ix)], f.cpu().numpy())
        start += len(ix)
    text = r.token_strings([t for ids in spans for t in ids])  # one vocabulary lookup
    excerpts, at = [], 0
    for ids in spans:
        excerpts.append(autointerp.Excerpt(text[at : at + len(ids)], [0.0] * len(ids)))
        at += len(ids)
    return excerpts, maxes


def _excerpts(df) -> list[autointerp.Excerpt]:
    return [autointerp.Excerpt(list(t), [float(a) for a in acts]) for t, acts in zip(df.tokens, df.acts)]


def stage_labels(ctx: Context, s: LabelsStageSettings, config_hash: str) -> None:
    lab_s, seed, task, w = s.labels, s.run.seed, s.run.task, ctx.writer
    r = w.reader()
    layers = selected_layers(ctx)
    chosen = choose_features(ctx, s, layers)
    client = None
    if lab_s.labeller == "openai":
        settings = autointerp.LLMSettings.from_env(model=lab_s.llm_model, base_url=lab_s.llm_base_url)
        client = autointerp.LLMClient(settings, StoreCache(w))
        first = r.feature_examples("tuned", chosen[0][0], chosen[0][1], "top").head(10) if chosen else None
        chars = int(1.5 * sum(len("".join(t)) * 2 for t in first.tokens)) + 3000 if first is not None else 3000
        per = autointerp.estimate(1, chars, settings.max_tokens)["tokens"]
        if per > lab_s.max_tokens:
            raise LabelBudgetError(
                f"label_max_tokens {lab_s.max_tokens:,} is smaller than one feature (≈ {per:,} tokens); raise it"
            )
        if per * len(chosen) > lab_s.max_tokens:
            keep = lab_s.max_tokens // per
            log.warning(
                "labels: the token budget covers %d of %d features; labelling the first %d", keep, len(chosen), keep
            )
            chosen = chosen[:keep]
        est = autointerp.estimate(len(chosen), chars, settings.max_tokens)
        log.info(
            "labels: %d features with %s at %s: at most %d calls, ≈ %d tokens (budget %d); cached answers "
            "are not re-sent",
            len(chosen),
            settings.model,
            settings.base_url or "the OpenAI API",
            est["calls"],
            est["tokens"],
            lab_s.max_tokens,
        )
    labeller = autointerp.OFFLINE if client is None else f"openai:{lab_s.llm_model}"
    lexicon = reward.lexicon()
    sae_of = own_saes(ctx, "tuned", layers)
    pools = {}
    done = w.done_chunks("labels", config_hash)
    skipped = 0
    for ci in range(0, len(chosen), CHUNK):
        if ci // CHUNK in done:
            continue
        rows = []
        for layer, fid, selection in chosen[ci : ci + CHUNK]:
            if layer not in pools:
                pools[layer] = negative_pool(ctx, s, layer, sae_of[layer])
            top = r.feature_examples("tuned", layer, fid, "top")
            if top.empty:
                skipped += 1
                continue
            f = r.feature("tuned", layer, fid)
            if f is None:  # examples without a feature row: the features stage and the store disagree
                raise RuntimeError(f"feature tuned L{layer} #{fid} has examples but no row in the features table")
            iv = r.feature_examples("tuned", layer, fid, "interval")
            rng = np.random.default_rng([seed, layer, fid])
            pos = _excerpts(iv.iloc[rng.permutation(len(iv))[: lab_s.detection_n]])
            zero = np.nonzero(pools[layer][1][:, fid] <= 0)[0]
            neg = [pools[layer][0][i] for i in rng.choice(zero, size=min(lab_s.detection_n, len(zero)), replace=False)]
            if client is None:
                lab = autointerp.offline_label(
                    _excerpts(top),
                    list(f["top_tokens"] if f["top_tokens"] is not None else []),
                    task,
                    pos,
                    neg,
                    lexicon,
                )
            else:
                lab = autointerp.llm_label(
                    client, _excerpts(top.head(10)), f["max_act"], task, pos, neg, seed=seed + fid
                )
            if lab["explanation"] is None and client is None:
                skipped += 1
                continue
            rows.append(
                {
                    "role": "tuned",
                    "layer": layer,
                    "feature": fid,
                    "labeller": labeller,
                    "model": None if client is None else lab_s.llm_model,
                    "selection": selection,
                    **{
                        k: lab.get(k)
                        for k in (
                            "explanation",
                            "relevant",
                            "detection_acc",
                            "detection_f1",
                            "detection_n",
                            "n_unparsed",
                            "relevance_rho",
                        )
                    },
                }
            )
        with w.transaction() as con:
            if rows:
                put_rows(con, "feature_labels", rows)
            RunWriter.add_chunk_marker(con, "labels", config_hash, ci // CHUNK)
        log.info("labels: %d of %d features done", min(ci + CHUNK, len(chosen)), len(chosen))
    detail = {
        "labeller": labeller,
        "n_chosen": len(chosen),
        "n_skipped_no_examples": skipped,
        **(
            {"llm_requests": client.n_requests, "llm_cached": client.n_cached, "llm_tokens": client.tokens_used}
            if client is not None
            else {}
        ),
    }
    detail.update(agreement_detail(ctx, layers, sae_of))
    ctx.commit(lambda con: None, detail)
