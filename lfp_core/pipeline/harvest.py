"""The activations stage: build the activation corpus and harvest one block hook (the MLP output by
default, ``sae_source.hook``) of the tuned and the base model at the layers the later stages study."""

from __future__ import annotations

import logging

import numpy as np

from lfp_core import activations, corpora, sae_sources
from lfp_core import texts as given_texts
from lfp_core.models import continuation_decoder
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import ROLES, divergence_layers, harvest_dir, role_model, special_tokens
from lfp_core.settings import ActivationsStageSettings
from lfp_core.store import put_rows

log = logging.getLogger(__name__)


def text_corpus(ctx: Context, s: ActivationsStageSettings) -> tuple[list[tuple[str, list[int], dict]], str]:
    """The text part of the activation corpus and where it came from: the researcher's documents
    (``corpus.source``, :mod:`lfp_core.texts`), else held-out IMDB reviews, else model-sampled documents;
    each cut to ``corpus.doc_tokens`` tokens, at most ``corpus.docs`` of them."""
    tok, c, seed = ctx.model.tokenizer, s.corpus, s.run.seed
    texts: list[tuple[str, list[int], dict]] = []
    if c.source is not None:
        docs = given_texts.corpus_token_docs(
            tok, given_texts.read_texts(c.source, "corpus"), c.docs, c.doc_tokens, seed
        )
        given_texts.check_corpus_size(len(docs), c.eval_every, c.source)
        return [("corpus", ids, {}) for ids in docs], c.source
    try:
        reviews, where = corpora.imdb_reviews(s.run.data_dir, ("test",))
        pool = sorted(reviews["test"], key=lambda x: x.doc_id)
        pick = np.random.default_rng([seed, 41]).permutation(len(pool))
        for i in pick:
            ids = tok(pool[int(i)].text[: c.doc_tokens * 12], add_special_tokens=False)["input_ids"]
            if len(ids) >= 16:
                texts.append(("imdb", ids[: c.doc_tokens], {"label": pool[int(i)].label}))
            if len(texts) >= c.docs:
                break
    except FileNotFoundError as exc:
        from lfp_core.sampling import sample_batch

        log.warning("IMDB not reachable (%s): sampling the activation corpus from the base model", exc)
        where = "model-sampled"
        gen = s.generation.batch_size
        for start in range(0, c.docs, gen):
            n = min(gen, c.docs - start)
            for ids in sample_batch(
                ctx.model, [[] for _ in range(n)], c.doc_tokens, seed=seed * 31 + start, allow_eos=False
            ):
                texts.append(("model_sampled", list(ids), {}))
    return texts, where


def build_corpus(ctx: Context, s: ActivationsStageSettings) -> tuple[list[activations.Doc], str]:
    """The text corpus (:func:`text_corpus`: the given documents, held-out IMDB reviews or model-sampled
    documents), then every base and tuned completion (prompt + completion). Every
    ``corpus.eval_every``-th document is held out from SAE training."""
    r, c = ctx.writer.reader(), s.corpus
    texts, where = text_corpus(ctx, s)
    prompts = r.prompts("eval")
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    for role in ("base", "tuned"):
        comp = r.completions(role)
        texts += [
            (
                f"{role}_completion",
                list(ids_of[int(p)]) + list(t),
                {"prompt_id": int(p), "sample_idx": int(k), "n_prefix": len(ids_of[int(p)])},
            )
            for p, k, t in zip(comp.prompt_id, comp.sample_idx, comp.token_ids)
        ]
    docs = [
        activations.Doc(i, src, "eval" if i % c.eval_every == 0 else "train", [int(t) for t in ids], **meta)
        for i, (src, ids, meta) in enumerate(texts)
    ]
    return docs, where


def stage_activations(ctx: Context, s: ActivationsStageSettings, config_hash: str) -> None:
    """Harvest ``blocks.L.<sae_source.hook>`` (``hook_mlp_out`` by default) of the tuned and the base model
    at the layers the later stages study: the divergence stage's choice, or, when SAEs are given, their
    layers (the divergence stage still measures and records its own choice)."""
    tok = ctx.model.tokenizer
    hook = s.sae_source.hook
    sae_sources.check_hook(sae_sources.shape_of_hooked(ctx.model.hooked(), ctx.model.spec.name), hook)
    chosen = divergence_layers(ctx)
    given = sae_sources.given_layers(s.sae_source)
    layers = given or chosen
    layers_from = "divergence"
    if given:
        layers_from = (
            f"the given SAEs' layers ({', '.join(f'{r}={src}' for r, src in s.sae_source.given().items())}); "
            f"the divergence stage chose {chosen}"
        )
        log.info("activations: harvesting %s at the given SAEs' layers %s (divergence chose %s)", hook, given, chosen)
    docs, where = build_corpus(ctx, s)
    h = harvest_dir(ctx)
    special = special_tokens(tok)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    idx = activations.write_index(h.root, docs, special)
    detail: dict = {
        "layers": layers,
        "hook": hook,
        "layers_from": layers_from,
        "divergence_layers": chosen,
        "source": where,
        "n_docs": len(docs),
        "n_rows": int(len(idx["doc_id"])),
        "n_train_rows": int((~idx["is_eval"]).sum()),
        "n_eval_rows": int(idx["is_eval"].sum()),
    }
    for role in ROLES:
        m = role_model(ctx, role)
        detail[role] = activations.harvest_role(
            m.hooked(),
            docs,
            layers,
            h.root,
            role,
            bos,
            special,
            batch_size=ctx.batch(),
            device=s.run.device,
            hook_of=lambda layer: activations.hook_name(layer, hook),
        )
    rows = [
        {
            "doc_id": d.doc_id,
            "source": d.source,
            "split": d.split,
            "n_tokens": len(d.token_ids),
            "token_ids": d.token_ids,
            "text": tok.decode(d.token_ids),
            "label": d.label,
            "prompt_id": d.prompt_id,
            "sample_idx": d.sample_idx,
            "n_prefix": d.n_prefix,
        }
        for d in docs
    ]
    log.info(
        "activation corpus: %d documents from %s, %d rows (%d held out) at layers %s",
        len(docs),
        where,
        detail["n_rows"],
        detail["n_eval_rows"],
        layers,
    )
    piece = continuation_decoder(tok)  # each token with its own leading space (Llama tokenizers drop it alone)
    vocab = [{"token_id": i, "text": piece([i])} for i in range(ctx.model.hooked().cfg.d_vocab)]

    def write(con):
        put_rows(con, "act_docs", rows)
        put_rows(con, "vocab", vocab)

    ctx.commit(write, detail)
