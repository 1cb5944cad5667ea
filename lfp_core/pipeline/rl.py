"""RL stages: fine-tune the policy (GRPO against VADER), evaluate it against the base model on the
held-out prompts, and measure per-layer divergence to choose the layers later stages study."""

from __future__ import annotations

import logging

import numpy as np

from lfp_core import divergence, evaluation, rlhf
from lfp_core.pipeline.base import sample_role
from lfp_core.pipeline.core import Context, Stage
from lfp_core.store import RunWriter, artifacts_dir, put_rows

log = logging.getLogger(__name__)


def tuned_policy(ctx: Context):
    """The run's tuned policy (loaded once per invocation, checked against the base model)."""
    if "tuned" not in ctx.cache:
        ctx.cache["tuned"] = rlhf.load_policy(artifacts_dir(ctx.writer.run_dir) / "policy", ctx.model)
    return ctx.cache["tuned"]


def _dpo_settings(cfg) -> rlhf.DPOSettings:
    return rlhf.DPOSettings(beta=cfg.dpo_beta, lr=cfg.dpo_lr, epochs=cfg.dpo_epochs, batch_size=cfg.dpo_batch_size,
                            max_length=cfg.dpo_max_length, max_prompt_length=cfg.dpo_max_prompt_length,
                            save_every=cfg.rl_save_every, seed=cfg.seed, device=cfg.device)


def stage_dpo(ctx: Context, config_hash: str) -> None:
    """HH task: DPO on the training pairs (the policy starts from, and is regularised to, the base)."""
    pairs = ctx.writer.reader().pairs("train").to_dict("records")
    ctx.cache.pop("tuned", None)
    policy_dir, steps = rlhf.train_dpo(ctx.model, pairs, _dpo_settings(ctx.cfg), artifacts_dir(ctx.writer.run_dir),
                                       config_hash)
    tuned = tuned_policy(ctx)
    info = {**tuned.info(), "name": f"{ctx.model.spec.name} + DPO (HH)"}

    def write(con):
        RunWriter.put_model(con, "tuned", info)
        put_rows(con, "rl_steps", steps)

    ctx.commit(write, {"policy_dir": str(policy_dir), "steps": len(steps)})


def stage_dpo_eval(ctx: Context, config_hash: str) -> None:
    """HH task: implicit-reward margin and accuracy of the DPO policy on held-out and training pairs."""
    r = ctx.writer.reader()
    tuned, base, s = tuned_policy(ctx), ctx.model, _dpo_settings(ctx.cfg)
    detail = {}
    for split, n in (("eval", None), ("train", len(r.pairs("eval")))):
        pairs = r.pairs(split).head(n).to_dict("records") if n else r.pairs(split).to_dict("records")
        chosen, rejected = rlhf.implicit_rewards(tuned.hf, base.hf, base.tokenizer, pairs, s)
        margin = np.asarray(chosen) - np.asarray(rejected)
        detail[f"{split}_margin"] = evaluation.reward_stats(margin)
        detail[f"{split}_accuracy"] = float((margin > 0).mean())
        detail[f"n_{split}"] = len(pairs)
    log.info("DPO implicit-reward accuracy: held-out %.3f, training %.3f", detail["eval_accuracy"],
             detail["train_accuracy"])
    ctx.commit(lambda con: None, detail)


def stage_rlhf(ctx: Context, config_hash: str) -> None:
    """GRPO fine-tuning on the RL prompts; logs per-step reward/KL and sample completions."""
    cfg = ctx.cfg
    prompts = ctx.writer.reader().prompts("train")
    settings = rlhf.RLSettings(steps=cfg.rl_steps, lr=cfg.rl_lr, beta=cfg.rl_beta,
                               prompts_per_step=cfg.rl_prompts_per_step, generations=cfg.rl_generations,
                               min_new_tokens=cfg.min_new_tokens, max_new_tokens=cfg.max_new_tokens,
                               save_every=cfg.rl_save_every, seed=cfg.seed, device=cfg.device)
    ctx.cache.pop("tuned", None)
    policy_dir, steps, samples = rlhf.train_policy(ctx.model, [list(t) for t in prompts.token_ids], settings,
                                                   artifacts_dir(ctx.writer.run_dir), config_hash)
    tuned = tuned_policy(ctx)
    info = {**tuned.info(), "name": f"{ctx.model.spec.name} + GRPO (VADER)"}
    for i, s in enumerate(samples):
        s["idx"] = i
    first = steps[0]["reward"] if steps else float("nan")
    last = float(np.mean([s["reward"] for s in steps[-10:]])) if steps else float("nan")

    def write(con):
        RunWriter.put_model(con, "tuned", info)
        put_rows(con, "rl_steps", steps)
        put_rows(con, "rl_samples", samples)

    ctx.commit(write, {"policy_dir": str(policy_dir), "steps": len(steps), "first_reward": first,
                       "last10_reward": last})


def stage_rl_eval(ctx: Context, config_hash: str) -> None:
    """Sample the tuned policy on the held-out prompts with the base samples' lengths and seeds,
    then compare: paired reward difference, per-token KL, distinct-2 and word shifts."""
    tuned = tuned_policy(ctx)
    sample_role(ctx, config_hash, "rl_eval", "tuned", tuned)
    r = ctx.writer.reader()
    base = r.completions("base")
    tun = r.completions("tuned")
    pair = base.merge(tun, on=["prompt_id", "sample_idx"], suffixes=("_b", "_t"))
    if len(pair) != len(base):
        raise RuntimeError(f"{len(base)} base but {len(pair)} paired tuned completions")
    prompts = r.prompts("eval")
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    bos = [ctx.model.tokenizer.bos_token_id] if ctx.model.tokenizer.bos_token_id is not None else []
    kl = evaluation.per_token_kl(tuned.hf, ctx.model.hf,
                                 [(list(ids_of[int(p)]), list(c)) for p, c in zip(tun.prompt_id, tun.token_ids)],
                                 bos, device=ctx.cfg.device, batch_size=ctx.batch(64))
    shifts = evaluation.word_shifts(list(base.completion), list(tun.completion))
    detail = {
        "reward_base": evaluation.reward_stats(pair.reward_b.to_numpy()),
        "reward_tuned": evaluation.reward_stats(pair.reward_t.to_numpy()),
        "difference": evaluation.paired_difference(pair.reward_b.to_numpy(), pair.reward_t.to_numpy()),
        "kl_per_token": kl,
        "distinct2_base": evaluation.distinct_n(list(base.completion)),
        "distinct2_tuned": evaluation.distinct_n(list(tun.completion)),
    }
    log.info("tuned %.3f vs base %.3f (%.1f s.e.), KL/token %.4f, distinct-2 %.3f vs %.3f",
             detail["reward_tuned"]["mean"], detail["reward_base"]["mean"], detail["difference"]["n_se"], kl,
             detail["distinct2_tuned"], detail["distinct2_base"])
    ctx.commit(lambda con: put_rows(con, "word_shifts", shifts), detail)


def _held_out_sequences(ctx: Context) -> list[list[int]]:
    """BOS + held-out text token ids: VADER: prompt + base completion; HH: the first 64 tokens of
    prompt + chosen response of the held-out pairs."""
    cfg, tok, r = ctx.cfg, ctx.model.tokenizer, ctx.writer.reader()
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if cfg.task == "hh":
        pairs = r.pairs("eval").head(cfg.divergence_sequences)
        return [bos + tok(p + c, add_special_tokens=False)["input_ids"][:64] for p, c in zip(pairs.prompt, pairs.chosen)]
    prompts = r.prompts("eval")
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    base = r.completions("base", limit=cfg.divergence_sequences)
    return [bos + list(ids_of[int(p)]) + list(c) for p, c in zip(base.prompt_id, base.token_ids)]


def stage_divergence(ctx: Context, config_hash: str) -> None:
    """Per-layer parameter and MLP-output divergence; select the top layers."""
    cfg = ctx.cfg
    tuned = tuned_policy(ctx)
    param = divergence.parameter_divergence(ctx.model.hf, tuned.hf)
    seqs = _held_out_sequences(ctx)
    act_cos, act_rel = divergence.activation_divergence(ctx.model.hooked(), tuned.hooked(), seqs,
                                                         batch_size=ctx.batch())
    scores = param if cfg.divergence_measure == "param" else act_cos
    selected = divergence.select_layers(scores, cfg.n_selected_layers)
    rows = [{"layer": i, "param": param[i], "act_cos": act_cos[i], "act_rel_l2": act_rel[i],
             "selected": i in selected} for i in range(len(param))]
    ctx.commit(lambda con: put_rows(con, "layer_divergence", rows),
               {"selected_layers": selected, "measure": cfg.divergence_measure})


_RL_FIELDS = ("rl_steps", "rl_lr", "rl_beta", "rl_prompts_per_step", "rl_generations", "rl_save_every",
              "min_new_tokens", "max_new_tokens", "seed", "device")

_DPO_FIELDS = ("dpo_beta", "dpo_lr", "dpo_epochs", "dpo_batch_size", "dpo_max_length", "dpo_max_prompt_length",
               "rl_save_every", "seed", "device")
_RL_CLEARS = {"rl_steps": ("true", []), "rl_samples": ("true", []), "models": ("role = ?", ["tuned"])}
_DIV = ("n_selected_layers", "divergence_measure", "divergence_sequences")

STAGES = [
    Stage("rlhf", _RL_FIELDS, ("prompts",), stage_rlhf, _RL_CLEARS, tasks=("vader",),
          describe="fine-tune the policy with GRPO against the VADER reward (KL to the base model)"),
    Stage("rl_eval", ("min_new_tokens", "max_new_tokens", "samples_per_prompt", "gen_batch_size", "seed"),
          ("rlhf", "base_samples"), stage_rl_eval,
          {"completions": ("role = ?", ["tuned"]), "word_shifts": ("true", [])}, chunked=True, tasks=("vader",),
          version=2,  # 2: word shifts also list the top lexicon words
          describe="sample the tuned policy on the held-out prompts; reward gain, KL, distinct-2, word shifts"),
    Stage("rlhf", _DPO_FIELDS, ("pairs",), stage_dpo, _RL_CLEARS, tasks=("hh",),
          describe="fine-tune the policy with DPO on HH-RLHF chosen/rejected pairs"),
    Stage("rl_eval", (), ("rlhf",), stage_dpo_eval, {}, tasks=("hh",),
          describe="DPO implicit-reward margin and accuracy on held-out and training pairs"),
    Stage("divergence", _DIV, ("rlhf", "base_samples"), stage_divergence, {"layer_divergence": ("true", [])},
          tasks=("vader",), describe="per-layer parameter and activation divergence; choose the layers to study"),
    Stage("divergence", _DIV, ("rlhf", "pairs"), stage_divergence, {"layer_divergence": ("true", [])},
          tasks=("hh",), describe="per-layer parameter and activation divergence; choose the layers to study"),
]
