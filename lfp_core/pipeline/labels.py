"""Labels stage: explain, classify and detection-score the tuned model's probe-top features and as many
random others, with an LLM (``labeller=openai``) or the offline labeller; then the agreement between
the labeller's reward-related features and the probe (the paper's frequency table, with significance).

Each feature's windows are split by document: its top examples (the explain set) are what the explainer
sees; relevance (offline labeller) and detection are scored on windows from other documents, and only
from documents that hold none of the probe's points (the text the probe was fitted and ranked on), so
neither score re-reads the text the explanation or the probe-top choice came from."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lfp_core import autointerp, reward, rewards, saes
from lfp_core.errors import BadInputError
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


SCORE_WINDOWS = 20  # held-out activating windows per feature for the offline relevance test


@dataclass
class ScorePool:
    """One layer's scoring text: every harvest row of the documents the probe never read, sorted by
    (document, position), with the tuned model's SAE activations there (sparse, rows x features)."""

    doc: np.ndarray  # [n] document of each row
    pos: np.ndarray  # [n] its position in the document
    tokens: list[str]  # [n] its token string
    acts: Any  # scipy.sparse.csc_matrix [n, d_sae]
    key: np.ndarray = field(init=False, repr=False)  # [n] ascending (document, position) key

    def __post_init__(self) -> None:
        self.key = self.doc.astype(np.int64) * (1 << 20) + self.pos

    def window(self, i: int, w: int) -> slice:
        """Rows of row ``i``'s document within ``w`` positions of it."""
        lo = np.searchsorted(self.key, self.key[i] - w, side="left")
        return slice(int(lo), int(np.searchsorted(self.key, self.key[i] + w, side="right")))


@dataclass
class ScoreSet:
    """A feature's held-out scoring windows and the documents they come from."""

    positives: list[autointerp.Excerpt]
    negatives: list[autointerp.Excerpt]
    docs: set[int]


def score_docs(all_docs, probe_docs) -> np.ndarray:
    """The documents scoring may use: those holding none of the probe's points (ascending)."""
    return np.setdiff1d(np.asarray(all_docs, dtype=np.int64), np.asarray(probe_docs, dtype=np.int64))


def score_pool(ctx: Context, layer: int, sae, docs: np.ndarray) -> ScorePool:
    """The :class:`ScorePool` of ``docs`` at ``layer`` (one encoding pass over their rows)."""
    from scipy import sparse

    r = ctx.writer.reader()
    h = harvest_dir(ctx)
    idx = h.index()
    rows = np.nonzero(np.isin(idx["doc_id"], docs))[0]
    rows = rows[np.lexsort((idx["pos"][rows], idx["doc_id"][rows]))]
    d_sae = int(sae.cfg.d_sae)
    rr, cc, vv, start = [], [], [], 0
    for ix, _, f in saes.encode_batches(sae, h.acts("tuned", layer), rows):
        f = f.float().cpu()
        i, j = np.nonzero(f.numpy() > 0)
        rr.append(i + start)
        cc.append(j)
        vv.append(f.numpy()[i, j])
        start += len(ix)
    cat = lambda a, t: np.concatenate(a) if a else np.zeros(0, t)  # noqa: E731
    acts = sparse.csc_matrix((cat(vv, np.float32), (cat(rr, np.int64), cat(cc, np.int64))), shape=(len(rows), d_sae))
    return ScorePool(
        idx["doc_id"][rows].astype(np.int64),
        idx["pos"][rows].astype(np.int64),
        r.token_strings(idx["token_id"][rows].tolist()),
        acts,
    )


def score_windows(
    pool: ScorePool, feature: int, explain_docs: set[int], n: int, window: int, rng: np.random.Generator
) -> ScoreSet:
    """Held-out windows of ``feature`` (one per document, none from ``explain_docs``): up to ``n``
    activating ones, each centred on the feature's strongest activation in a document drawn at random
    among those where it fires, and up to ``n`` from documents where it never fires (random centre)."""
    col = pool.acts[:, feature].toarray().ravel() if pool.acts.shape[0] else np.zeros(0)
    ok = ~np.isin(pool.doc, np.fromiter(explain_docs, dtype=np.int64, count=len(explain_docs)))
    docs, first = np.unique(pool.doc, return_index=True)
    ends = np.append(first[1:], len(pool.doc))
    peak = np.maximum.reduceat(col, first) if len(first) else np.zeros(0)
    usable = ok[first]
    fire = np.nonzero(usable & (peak > 0))[0]
    quiet = np.nonzero(usable & (peak <= 0))[0]

    def excerpt(i: int) -> autointerp.Excerpt:
        sl = pool.window(i, window)
        return autointerp.Excerpt(pool.tokens[sl], [float(a) for a in col[sl]])

    fire, quiet = rng.permutation(fire)[:n], rng.permutation(quiet)[:n]
    pos = [excerpt(int(first[k] + np.argmax(col[first[k] : ends[k]]))) for k in fire]
    neg = [excerpt(int(rng.integers(first[k], ends[k]))) for k in quiet]
    return ScoreSet(pos, neg, {int(docs[k]) for k in np.concatenate([fire, quiet])})


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
    # a sequence reward has no per-word valences: the offline labeller's relevance (activation vs |valence|)
    # does not apply, and the LLM is asked about what the reward plug-in scores instead of sentiment
    lexicon_reward = rewards.reward_kind(s.reward.spec) == "lexicon"
    rw_name = rewards.reward_name(s.reward.spec)
    label_task = task if lexicon_reward else f"whatever the reward '{rw_name}' scores in a text"
    sae_of = own_saes(ctx, "tuned", layers)
    probe_docs = r.probe_point_docs("tuned")
    held = score_docs(r.corpus_docs().doc_id, probe_docs)
    log.info(
        "labels: scoring on %d documents that hold none of the probe's points (%d do), never on a feature's "
        "own top-example documents",
        len(held),
        len(probe_docs),
    )
    pools: dict[int, ScorePool] = {}
    done = w.done_chunks("labels", config_hash)
    skipped = 0
    for ci in range(0, len(chosen), CHUNK):
        if ci // CHUNK in done:
            continue
        rows = []
        for layer, fid, selection in chosen[ci : ci + CHUNK]:
            if layer not in pools:
                pools[layer] = score_pool(ctx, layer, sae_of[layer], held)
            top = r.feature_examples("tuned", layer, fid, "top")
            if top.empty:
                skipped += 1
                continue
            f = r.feature("tuned", layer, fid)
            if f is None:  # examples without a feature row: the features stage and the store disagree
                raise RuntimeError(f"feature tuned L{layer} #{fid} has examples but no row in the features table")
            # explain set: the feature's top examples (its top tokens come from them); scoring: other documents
            scored = score_windows(
                pools[layer],
                fid,
                {int(d) for d in top.doc_id},
                max(SCORE_WINDOWS, lab_s.detection_n),
                s.features.window,
                np.random.default_rng([seed, layer, fid]),
            )
            pos, neg = scored.positives[: lab_s.detection_n], scored.negatives[: lab_s.detection_n]
            if client is None:
                lab = autointerp.offline_label(
                    list(f["top_tokens"] if f["top_tokens"] is not None else []),
                    label_task,
                    pos,
                    neg,
                    lexicon,
                    relevance_windows=scored.positives,
                )
            else:
                lab = autointerp.llm_label(
                    client, _excerpts(top.head(10)), f["max_act"], label_task, pos, neg, seed=seed + fid
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
        "n_score_docs": len(held),
        "n_probe_docs": len(probe_docs),
        "n_skipped_no_examples": skipped,
        **(
            {"llm_requests": client.n_requests, "llm_cached": client.n_cached, "llm_tokens": client.tokens_used}
            if client is not None
            else {}
        ),
    }
    if not lexicon_reward and client is None:
        detail["not_applicable"] = {
            "relevance": rewards.lexicon_only(
                "the offline labeller's reward relevance (activation vs |valence|)", rw_name
            )
        }
    detail.update(agreement_detail(ctx, layers, sae_of))
    ctx.commit(lambda con: None, detail)
