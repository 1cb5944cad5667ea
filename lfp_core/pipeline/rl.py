"""RL stages: fine-tune the policy (GRPO against the run's reward), evaluate it against the base model on the
held-out prompts, and measure per-layer divergence to choose the layers later stages study."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lfp_core import divergence, evaluation, rewards, rlhf
from lfp_core import tuned as tuned_models
from lfp_core.pipeline.base import sample_role
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import reward_info, run_reward, tuned_policy
from lfp_core.settings import DivergenceStageSettings, DPOStageSettings, RLStageSettings, SamplesStageSettings
from lfp_core.store import RunWriter, artifacts_dir, put_rows

log = logging.getLogger(__name__)


def given_policy(ctx: Context, path: str) -> None:
    """The rlhf stage for a given tuned model: copy it into the run's policy directory (where every later
    stage loads the tuned policy), check it against the base model, record it as given; nothing is trained,
    so there are no RL steps or samples."""
    ctx.cache.pop("tuned", None)
    policy_dir, spec = tuned_models.install_given(path, artifacts_dir(ctx.writer.run_dir))
    tuned = tuned_policy(ctx)  # rlhf.load_policy: the same architecture, shape and tokenizer as the base
    info = {**tuned.info(), "name": f"{spec.name} (given)", "source": "given", "location": spec.location}
    log.info("tuned model given: %s (not trained here)", spec.location)
    ctx.commit(
        lambda con: RunWriter.put_model(con, "tuned", info),
        {"policy_dir": str(policy_dir), "steps": 0, "given": spec.location},
    )


def stage_dpo(ctx: Context, s: DPOStageSettings, config_hash: str) -> None:
    """HH task: DPO on the training pairs (the policy starts from, and is regularised to, the base); or
    the given tuned model (``tuned.path``)."""
    if s.tuned.path is not None:
        return given_policy(ctx, s.tuned.path)
    pairs = ctx.writer.reader().pairs("train").to_dict("records")
    ctx.cache.pop("tuned", None)
    policy_dir, steps = rlhf.train_dpo(ctx.model, pairs, s, artifacts_dir(ctx.writer.run_dir), config_hash)
    tuned = tuned_policy(ctx)
    info = {**tuned.info(), "name": f"{ctx.model.spec.name} + DPO (HH)"}

    def write(con):
        RunWriter.put_model(con, "tuned", info)
        put_rows(con, "rl_steps", steps)

    ctx.commit(write, {"policy_dir": str(policy_dir), "steps": len(steps)})


def stage_dpo_eval(ctx: Context, s: DPOStageSettings, config_hash: str) -> None:
    """HH task: implicit-reward margin and accuracy of the DPO policy on held-out and training pairs."""
    r = ctx.writer.reader()
    tuned, base = tuned_policy(ctx), ctx.model
    detail: dict[str, Any] = {}
    for split, n in (("eval", None), ("train", len(r.pairs("eval")))):
        pairs = r.pairs(split).head(n).to_dict("records") if n else r.pairs(split).to_dict("records")
        chosen, rejected = rlhf.implicit_rewards(tuned.hf, base.hf, base.tokenizer, pairs, s.dpo)
        margin = np.asarray(chosen) - np.asarray(rejected)
        detail[f"{split}_margin"] = evaluation.reward_stats(margin)
        detail[f"{split}_accuracy"] = float((margin > 0).mean())
        detail[f"n_{split}"] = len(pairs)
    log.info(
        "DPO implicit-reward accuracy: held-out %.3f, training %.3f", detail["eval_accuracy"], detail["train_accuracy"]
    )
    ctx.commit(lambda con: None, detail)


def stage_rlhf(ctx: Context, s: RLStageSettings, config_hash: str) -> None:
    """GRPO fine-tuning on the RL prompts; logs per-step reward/KL and sample completions. With a given
    tuned model (``tuned.path``) nothing is trained: see :func:`given_policy`."""
    if s.tuned.path is not None:
        return given_policy(ctx, s.tuned.path)
    prompts = ctx.writer.reader().prompts("train")
    ctx.cache.pop("tuned", None)
    rw = run_reward(ctx, s.reward.spec)
    policy_dir, steps, samples = rlhf.train_policy(
        ctx.model, [list(t) for t in prompts.token_ids], s, artifacts_dir(ctx.writer.run_dir), config_hash, reward=rw
    )
    tuned = tuned_policy(ctx)
    info = {**tuned.info(), "name": f"{ctx.model.spec.name} + GRPO ({'VADER' if rw.kind == 'lexicon' else rw.name})"}
    for i, sample in enumerate(samples):
        sample["idx"] = i
    first = steps[0]["reward"] if steps else float("nan")
    last = float(np.mean([step["reward"] for step in steps[-10:]])) if steps else float("nan")

    def write(con):
        RunWriter.put_model(con, "tuned", info)
        put_rows(con, "rl_steps", steps)
        put_rows(con, "rl_samples", samples)

    ctx.commit(
        write,
        {
            "policy_dir": str(policy_dir),
            "steps": len(steps),
            "first_reward": first,
            "last10_reward": last,
            "reward_info": reward_info(rw),
        },
    )


def stage_rl_eval(ctx: Context, s: SamplesStageSettings, config_hash: str) -> None:
    """Sample the tuned policy on the held-out prompts with the base samples' lengths and seeds,
    then compare: paired reward difference, per-token KL, distinct-2 and (lexicon reward) word shifts."""
    tuned = tuned_policy(ctx)
    sample_role(ctx, s, config_hash, "rl_eval", "tuned", tuned)
    r = ctx.writer.reader()
    base = r.completions("base")
    tun = r.completions("tuned")
    pair = base.merge(tun, on=["prompt_id", "sample_idx"], suffixes=("_b", "_t"))
    if len(pair) != len(base):
        raise RuntimeError(f"{len(base)} base but {len(pair)} paired tuned completions")
    prompts = r.prompts("eval")
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    bos = [ctx.model.tokenizer.bos_token_id] if ctx.model.tokenizer.bos_token_id is not None else []
    kl = evaluation.per_token_kl(
        tuned.hf,
        ctx.model.hf,
        [(list(ids_of[int(p)]), list(c)) for p, c in zip(tun.prompt_id, tun.token_ids)],
        bos,
        device=s.run.device,
        batch_size=ctx.batch(64),
    )
    rw = run_reward(ctx, s.reward.spec)
    lexicon = rw.kind == "lexicon"
    shifts = evaluation.word_shifts(list(base.completion), list(tun.completion)) if lexicon else []
    detail: dict[str, Any] = {
        "reward_base": evaluation.reward_stats(pair.reward_b.to_numpy()),
        "reward_tuned": evaluation.reward_stats(pair.reward_t.to_numpy()),
        # samples of one prompt share it: the gain's CI and p come from a bootstrap over prompts
        "difference": evaluation.paired_difference(
            pair.reward_b.to_numpy(), pair.reward_t.to_numpy(), groups=pair.prompt_id.to_numpy(), seed=s.run.seed
        ),
        "kl_per_token": kl,
        "distinct2_base": evaluation.distinct_n(list(base.completion)),
        "distinct2_tuned": evaluation.distinct_n(list(tun.completion)),
    }
    if not lexicon:
        detail["not_applicable"] = {"word_shifts": rewards.lexicon_only("the word shifts (lexicon words)", rw.name)}
    log.info(
        "tuned %.3f vs base %.3f (%.1f s.e.), KL/token %.4f, distinct-2 %.3f vs %.3f",
        detail["reward_tuned"]["mean"],
        detail["reward_base"]["mean"],
        detail["difference"]["n_se"],
        kl,
        detail["distinct2_tuned"],
        detail["distinct2_base"],
    )
    ctx.commit(lambda con: put_rows(con, "word_shifts", shifts), detail)


def _held_out_sequences(ctx: Context, s: DivergenceStageSettings) -> list[list[int]]:
    """BOS + held-out text token ids: VADER: prompt + base completion; HH: the first 64 tokens of
    prompt + chosen response of the held-out pairs."""
    tok, r, n = ctx.model.tokenizer, ctx.writer.reader(), s.divergence.sequences
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if s.run.task == "hh":
        pairs = r.pairs("eval").head(n)
        return [
            bos + tok(p + c, add_special_tokens=False)["input_ids"][:64] for p, c in zip(pairs.prompt, pairs.chosen)
        ]
    prompts = r.prompts("eval")
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    base = r.completions("base", limit=n)
    return [bos + list(ids_of[int(p)]) + list(c) for p, c in zip(base.prompt_id, base.token_ids)]


def stage_divergence(ctx: Context, s: DivergenceStageSettings, config_hash: str) -> None:
    """Per-layer parameter and MLP-output divergence; select the top layers."""
    d = s.divergence
    tuned = tuned_policy(ctx)
    param = divergence.parameter_divergence(ctx.model.hf, tuned.hf)
    seqs = _held_out_sequences(ctx, s)
    act_cos, act_rel = divergence.activation_divergence(
        ctx.model.hooked(), tuned.hooked(), seqs, batch_size=ctx.batch()
    )
    scores = param if d.measure == "param" else act_cos
    selected = divergence.select_layers(scores, d.n_layers)
    rows = [
        {"layer": i, "param": param[i], "act_cos": act_cos[i], "act_rel_l2": act_rel[i], "selected": i in selected}
        for i in range(len(param))
    ]
    ctx.commit(lambda con: put_rows(con, "layer_divergence", rows), {"selected_layers": selected, "measure": d.measure})
