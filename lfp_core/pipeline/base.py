"""Foundation stages: load the model, build the prompt sets, sample and score base completions."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lfp_core import corpora, reward, rewards, sampling, texts
from lfp_core.errors import BadInputError
from lfp_core.models import continuation_decoder, resolve_spec
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import reward_info, run_reward
from lfp_core.settings import (
    ModelStageSettings,
    PairsStageSettings,
    PromptsStageSettings,
    SamplesStageSettings,
)
from lfp_core.store import RunWriter, put_rows

log = logging.getLogger(__name__)


def model_fingerprint(s: ModelStageSettings) -> str:
    """Identity of the model's files (config.json content and weight file sizes)."""
    spec = resolve_spec(s.run.model)
    if spec.source == "hub":
        return spec.location
    d = Path(spec.location)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def stage_model(ctx: Context, s: ModelStageSettings, config_hash: str) -> None:
    """Load the model in HF and transformer-lens form (checks the conversion) and record it."""
    m = ctx.model
    hooked = m.hooked()
    info = m.info()
    if hooked.cfg.n_layers != info["n_layers"]:
        raise RuntimeError(f"transformer-lens built {hooked.cfg.n_layers} layers for a {info['n_layers']}-layer model")
    ctx.commit(lambda con: RunWriter.put_model(con, "base", info), {"model": info})


def given_prompts(ctx: Context, s: PromptsStageSettings) -> None:
    """The researcher's prompts (``prompts.source``), each whole, split by document (lfp_core.texts)."""
    m, p = ctx.model, s.prompts
    assert p.source is not None
    c = m.hf.config
    n_ctx = int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1024)
    limit = max(1, n_ctx // 2)  # half the context: room for the completion (and the BOS)
    rows, n_trimmed = texts.prompt_rows(m.tokenizer, texts.read_texts(p.source), p.n_train, p.n_eval, s.run.seed, limit)
    if n_trimmed:
        log.warning(
            "%d given prompts are longer than %d tokens (half the context): their last %d kept", n_trimmed, limit, limit
        )
    n_train = sum(r["split"] == "train" for r in rows)
    log.info("built %d RL and %d held-out prompts from %s", n_train, len(rows) - n_train, p.source)
    ctx.commit(
        lambda con: RunWriter.put_prompts(con, rows),
        {"n_train": n_train, "n_eval": len(rows) - n_train, "source": p.source, "n_trimmed": n_trimmed},
    )


def stage_prompts(ctx: Context, s: PromptsStageSettings, config_hash: str) -> None:
    """The paper's prompt sets: RL prompts from IMDB train reviews, held-out prompts from IMDB test
    reviews; model-sampled prefixes (two seeds) when no IMDB copy is reachable; or the researcher's
    own prompts (``prompts.source``)."""
    if s.prompts.source is not None:
        return given_prompts(ctx, s)
    m, p, seed, gen = ctx.model, s.prompts, s.run.seed, s.generation.batch_size
    lo, hi = p.min_tokens, p.max_tokens
    try:
        reviews, where = corpora.imdb_reviews(s.run.data_dir, ("train", "test"))
        rows = corpora.imdb_prompts(m.tokenizer, reviews["train"], p.n_train, lo, hi, seed)
        rows += corpora.imdb_prompts(
            m.tokenizer, reviews["test"], p.n_eval, lo, hi, seed + 1, split="eval", first_id=len(rows)
        )
    except FileNotFoundError as exc:
        log.warning("IMDB not reachable (%s): sampling prompt prefixes from the model itself", exc)
        where = "model-sampled"
        rows = corpora.model_prompts(m, p.n_train, lo, hi, seed, gen)
        rows += corpora.model_prompts(m, p.n_eval, lo, hi, seed + 1, gen, split="eval", first_id=len(rows))
    n_train = sum(r["split"] == "train" for r in rows)
    log.info("built %d RL and %d held-out prompts from %s", n_train, len(rows) - n_train, where)
    ctx.commit(
        lambda con: RunWriter.put_prompts(con, rows),
        {"n_train": n_train, "n_eval": len(rows) - n_train, "source": where},
    )


def _completion_rows(
    tokenizer, role: str, jobs: list[tuple[int, int, int]], outs, rw: rewards.Reward, prompt_text: dict[int, str]
) -> list[dict]:
    """Completion rows scored by ``rw`` on (prompt text, completion text); a lexicon reward also fills the
    lexicon words and their valences (None for a sequence reward) and the raw score, the summed valences
    before scaling and clipping (for a sequence reward, which is not scaled, its score)."""
    decode = continuation_decoder(tokenizer)  # the completion's text as it reads after its prompt
    completions = [decode(ids) for ids, _ in outs]
    scores = rw.score([prompt_text[pid] for pid, _, _ in jobs], completions)
    rows = []
    for (pid, sidx, _), (ids, seed), text, score in zip(jobs, outs, completions, scores):
        words = [w for w in reward.segment(text) if w.in_lexicon] if rw.kind == "lexicon" else []
        rows.append(
            {
                "role": role,
                "prompt_id": pid,
                "sample_idx": sidx,
                "seed": seed,
                "n_new": len(ids),
                "token_ids": [int(t) for t in ids],
                "text": text,
                "reward": float(score),
                "raw_score": sum(w.valence for w in words) if rw.kind == "lexicon" else float(score),
                "lexicon_words": [w.text for w in words] if rw.kind == "lexicon" else None,
                "lexicon_valences": [w.valence for w in words] if rw.kind == "lexicon" else None,
            }
        )
    return rows


def stage_pairs(ctx: Context, s: PairsStageSettings, config_hash: str) -> None:
    """HH task: preference pairs split at the last "\n\nAssistant:", shuffled with the run's seed
    into held-out evaluation pairs and DPO training pairs."""
    pairs, where = corpora.hh_pairs(s.run.data_dir)
    order = np.random.default_rng([s.run.seed, 29]).permutation(len(pairs))
    n_eval = min(s.pairs.n_eval, len(pairs) // 2)
    n_train = min(s.pairs.n_train, len(pairs) - n_eval)
    rows = [
        {
            "pair_id": k,
            "split": "eval" if k < n_eval else "train",
            "subset": pairs[i].get("subset"),
            "prompt": pairs[i]["prompt"],
            "chosen": pairs[i]["chosen"],
            "rejected": pairs[i]["rejected"],
        }
        for k, i in enumerate(order[: n_eval + n_train])
    ]
    log.info("HH pairs from %s: %d training, %d held-out", where, n_train, n_eval)
    ctx.commit(lambda con: put_rows(con, "pairs", rows), {"n_train": n_train, "n_eval": n_eval, "source": where})


def sample_role(ctx: Context, s: SamplesStageSettings, config_hash: str, stage: str, role: str, model) -> None:
    """Sample and score completions of the held-out prompts for one policy role, resumably.

    Jobs (prompt, sample index, length 8–19) and per-chunk seeds depend only on the config, so
    every role is sampled on the same prompts with the same lengths and seeds. Committed chunk by
    chunk (rows + a chunk marker in one transaction): a killed run resumes at the first
    unfinished chunk, and the primary key forbids duplicate rows.
    """
    w, seed = ctx.writer, s.run.seed
    prompts = w.reader().prompts("eval")
    if prompts.empty:
        raise BadInputError("the held-out prompt set is empty: run the prompts stage with --n-eval-prompts >= 1")
    rng = np.random.default_rng([seed, 17])
    lo, hi, gen = s.completions.min_new_tokens, s.completions.max_new_tokens, s.generation.batch_size
    jobs = [
        (int(pid), k, int(rng.integers(lo, hi + 1)))
        for pid in prompts.prompt_id
        for k in range(s.evaluation.samples_per_prompt)
    ]
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    text_of = dict(zip(prompts.prompt_id.astype(int), prompts.text))
    rw = run_reward(ctx, s.reward.spec)
    chunk_size = gen * 2
    chunks = [jobs[i : i + chunk_size] for i in range(0, len(jobs), chunk_size)]
    done = w.done_chunks(stage, config_hash)
    if done:
        log.info("resuming %s: %d of %d chunks already stored", stage, len(done), len(chunks))
    for ci, chunk in enumerate(tqdm(chunks, desc=f"{role} samples", unit="chunk")):
        if ci in done:
            continue
        outs = sampling.sample_completions(
            model, [list(ids_of[j[0]]) for j in chunk], [j[2] for j in chunk], seed=seed * 7919 + ci, batch_size=gen
        )
        rows = _completion_rows(model.tokenizer, role, chunk, outs, rw, text_of)
        with w.transaction() as con:
            RunWriter.put_completions(con, rows)
            RunWriter.add_chunk_marker(con, stage, config_hash, ci)


def stage_base_samples(ctx: Context, s: SamplesStageSettings, config_hash: str) -> None:
    """Base-model completions of the held-out prompts (8–19 new tokens, pure sampling), scored by the run's
    reward."""
    sample_role(ctx, s, config_hash, "base_samples", "base", ctx.model)
    rw = run_reward(ctx, s.reward.spec)
    detail: dict = {"reward": ctx.writer.reader().reward_summary("base") or {}, "reward_info": reward_info(rw)}
    if rw.kind != "lexicon":
        detail["not_applicable"] = {
            "lexicon_words": rewards.lexicon_only("the lexicon words and valences (raw score: the reward)", rw.name)
        }
    ctx.commit(lambda con: None, detail)
