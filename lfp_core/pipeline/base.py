"""Foundation stages: load the model, build the prompt sets, sample and score base completions."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lfp_core import corpora, reward, sampling
from lfp_core.config import RunConfig
from lfp_core.models import resolve_spec
from lfp_core.pipeline.core import Context, Stage
from lfp_core.store import RunWriter, put_rows

log = logging.getLogger(__name__)


def model_fingerprint(cfg: RunConfig) -> str:
    """Identity of the model's files (config.json content and weight file sizes)."""
    spec = resolve_spec(cfg.model)
    if spec.source == "hub":
        return spec.location
    d = Path(spec.location)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def stage_model(ctx: Context, config_hash: str) -> None:
    """Load the model in HF and transformer-lens form (checks the conversion) and record it."""
    m = ctx.model
    hooked = m.hooked()
    info = m.info()
    if hooked.cfg.n_layers != info["n_layers"]:
        raise RuntimeError(f"transformer-lens built {hooked.cfg.n_layers} layers for a {info['n_layers']}-layer model")
    ctx.commit(lambda con: RunWriter.put_model(con, "base", info), {"model": info})


def stage_prompts(ctx: Context, config_hash: str) -> None:
    """The paper's prompt sets: RL prompts from IMDB train reviews, held-out prompts from IMDB test
    reviews; model-sampled prefixes (two seeds) when no IMDB copy is reachable."""
    cfg, m = ctx.cfg, ctx.model
    lo, hi = cfg.prompt_min_tokens, cfg.prompt_max_tokens
    try:
        reviews, where = corpora.imdb_reviews(cfg.data_dir, ("train", "test"))
        rows = corpora.imdb_prompts(m.tokenizer, reviews["train"], cfg.n_prompts, lo, hi, cfg.seed)
        rows += corpora.imdb_prompts(m.tokenizer, reviews["test"], cfg.n_eval_prompts, lo, hi, cfg.seed + 1,
                                     split="eval", first_id=len(rows))
    except FileNotFoundError as exc:
        log.warning("IMDB not reachable (%s): sampling prompt prefixes from the model itself", exc)
        where = "model-sampled"
        rows = corpora.model_prompts(m, cfg.n_prompts, lo, hi, cfg.seed, cfg.gen_batch_size)
        rows += corpora.model_prompts(m, cfg.n_eval_prompts, lo, hi, cfg.seed + 1, cfg.gen_batch_size,
                                      split="eval", first_id=len(rows))
    n_train = sum(r["split"] == "train" for r in rows)
    log.info("built %d RL and %d held-out prompts from %s", n_train, len(rows) - n_train, where)
    ctx.commit(lambda con: RunWriter.put_prompts(con, rows),
               {"n_train": n_train, "n_eval": len(rows) - n_train, "source": where})


def _completion_rows(tokenizer, role: str, jobs: list[tuple[int, int, int]], outs) -> list[dict]:
    rows = []
    for (pid, sidx, _), (ids, seed) in zip(jobs, outs):
        text = tokenizer.decode(ids)
        words = [w for w in reward.segment(text) if w.in_lexicon]
        raw = sum(w.valence for w in words)
        rows.append({
            "role": role, "prompt_id": pid, "sample_idx": sidx, "seed": seed, "n_new": len(ids),
            "token_ids": [int(t) for t in ids], "text": text, "reward": reward.reward(text), "raw_score": raw,
            "lexicon_words": [w.text for w in words], "lexicon_valences": [w.valence for w in words],
        })
    return rows


def stage_pairs(ctx: Context, config_hash: str) -> None:
    """HH task: preference pairs split at the last "\n\nAssistant:", shuffled with the run's seed
    into held-out evaluation pairs and DPO training pairs."""
    cfg = ctx.cfg
    pairs, where = corpora.hh_pairs(cfg.data_dir)
    order = np.random.default_rng([cfg.seed, 29]).permutation(len(pairs))
    n_eval = min(cfg.n_eval_pairs, len(pairs) // 2)
    n_train = min(cfg.n_pairs, len(pairs) - n_eval)
    rows = [{"pair_id": k, "split": "eval" if k < n_eval else "train", "subset": pairs[i].get("subset"),
             "prompt": pairs[i]["prompt"], "chosen": pairs[i]["chosen"], "rejected": pairs[i]["rejected"]}
            for k, i in enumerate(order[: n_eval + n_train])]
    log.info("HH pairs from %s: %d training, %d held-out", where, n_train, n_eval)
    ctx.commit(lambda con: put_rows(con, "pairs", rows), {"n_train": n_train, "n_eval": n_eval, "source": where})


def sample_role(ctx: Context, config_hash: str, stage: str, role: str, model) -> None:
    """Sample and score completions of the held-out prompts for one policy role, resumably.

    Jobs (prompt, sample index, length 8–19) and per-chunk seeds depend only on the config, so
    every role is sampled on the same prompts with the same lengths and seeds. Committed chunk by
    chunk (rows + a chunk marker in one transaction): a killed run resumes at the first
    unfinished chunk, and the primary key forbids duplicate rows.
    """
    cfg, w = ctx.cfg, ctx.writer
    prompts = w.reader().prompts("eval")
    if prompts.empty:
        raise ValueError("the held-out prompt set is empty: run the prompts stage with --n-eval-prompts >= 1")
    rng = np.random.default_rng([cfg.seed, 17])
    jobs = [(int(pid), s, int(rng.integers(cfg.min_new_tokens, cfg.max_new_tokens + 1)))
            for pid in prompts.prompt_id for s in range(cfg.samples_per_prompt)]
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    chunk_size = cfg.gen_batch_size * 2
    chunks = [jobs[i : i + chunk_size] for i in range(0, len(jobs), chunk_size)]
    done = w.done_chunks(stage, config_hash)
    if done:
        log.info("resuming %s: %d of %d chunks already stored", stage, len(done), len(chunks))
    for ci, chunk in enumerate(tqdm(chunks, desc=f"{role} samples", unit="chunk")):
        if ci in done:
            continue
        outs = sampling.sample_completions(model, [list(ids_of[j[0]]) for j in chunk], [j[2] for j in chunk],
                                           seed=cfg.seed * 7919 + ci, batch_size=cfg.gen_batch_size)
        rows = _completion_rows(model.tokenizer, role, chunk, outs)
        with w.transaction() as con:
            RunWriter.put_completions(con, rows)
            RunWriter.add_chunk_marker(con, stage, config_hash, ci)


def stage_base_samples(ctx: Context, config_hash: str) -> None:
    """Base-model completions of the held-out prompts (8–19 new tokens, pure sampling), scored."""
    sample_role(ctx, config_hash, "base_samples", "base", ctx.model)
    ctx.commit(lambda con: None, {"reward": ctx.writer.reader().reward_summary("base") or {}})


STAGES = [
    Stage("model", ("model", "device"), (), stage_model, {"models": ("role = ?", ["base"])},
          fingerprint=model_fingerprint, describe="load the base model (HF + transformer-lens)"),
    Stage("prompts", ("data_dir", "n_prompts", "n_eval_prompts", "prompt_min_tokens", "prompt_max_tokens", "seed"),
          ("model",), stage_prompts, {"prompts": ("true", [])}, tasks=("vader",),
          describe="build the RL and held-out prompt sets (IMDB train / test prefixes)"),
    Stage("base_samples", ("min_new_tokens", "max_new_tokens", "samples_per_prompt", "gen_batch_size", "seed"),
          ("prompts",), stage_base_samples, {"completions": ("role = ?", ["base"])}, chunked=True, tasks=("vader",),
          describe="sample base-model completions of held-out prompts, score them with the VADER reward"),
    Stage("pairs", ("data_dir", "n_pairs", "n_eval_pairs", "seed"), ("model",), stage_pairs,
          {"pairs": ("true", [])}, tasks=("hh",),
          describe="load HH-RLHF preference pairs; split into DPO training and held-out pairs"),
]
