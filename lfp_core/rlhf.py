"""Policy fine-tuning against the VADER reward (trl GRPO) — stage 1 of the paper's pipeline.

Why GRPO (trl 1.16 has GRPO and RLOO, and no PPO):

* Like the paper's PPO it optimises a Python reward of sampled completions with a KL penalty to
  the frozen base model (``beta``, the paper's KL coefficient), and needs no value head or critic,
  which a 5M-parameter policy would have to learn from scratch alongside it.
* Its group baseline (``num_generations`` samples per prompt, advantage = reward minus the group
  mean, scaled by the group std) is the lowest-variance choice when most completions of a short,
  neutral prompt score 0 under a lexicon reward; RLOO's leave-one-out baseline is similar but
  folds the KL into the reward, making the penalty depend on completion length.
* It is the configuration measured here before (see the issue): the range between reward
  hacking (lr 3e-4, β 0.05) and too little learning (lr 1e-4, β 0.3) is known.

Sampling follows the paper: pure sampling (temperature 1, top_k 0, top_p 1), the model's BOS
before the 2–9 token prompt, and a completion length drawn from 8–19 tokens once per step (as the
paper's trl PPO notebook drew one ``gen_len`` per batch).

Checkpoints go to ``artifacts/rlhf_checkpoints``; an interrupted stage resumes from the last one.
The final policy is written to a temporary directory and renamed to ``artifacts/policy``, so a
later stage never sees a half-written model.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lfp_core import reward as vader

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """The reward function returned a non-finite value; the message names the text."""


@dataclass
class RLSettings:
    """GRPO hyper-parameters (see the module docstring for the chosen defaults)."""

    steps: int = 150
    lr: float = 2e-4
    beta: float = 0.1
    prompts_per_step: int = 4
    generations: int = 8
    min_new_tokens: int = 8
    max_new_tokens: int = 19
    save_every: int = 50
    seed: int = 0
    device: str = "cpu"


def checked_rewards(texts: list[str]) -> list[float]:
    """VADER rewards, refusing NaN or infinite values with the offending text."""
    out = vader.rewards(texts)
    for t, r in zip(texts, out):
        if not math.isfinite(r):
            raise RewardError(f"reward is {r} for completion {t!r}")
    return out


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    if not ckpt_dir.is_dir():
        return None
    cks = sorted((p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
                 key=lambda p: int(p.name.split("-")[1]))
    return str(cks[-1]) if cks else None


def train_policy(base, prompt_ids: list[list[int]], settings: RLSettings, artifacts: Path,
                 config_hash: str = "") -> tuple[Path, list[dict], list[dict]]:
    """Fine-tune a copy of ``base`` with GRPO against the VADER reward.

    Args:
        base: the base :class:`lfp_core.models.LoadedModel` (left unchanged).
        prompt_ids: RL prompts as token ids (no BOS).
        settings: GRPO hyper-parameters.
        artifacts: the run's artifacts directory.
        config_hash: identity of the settings; checkpoints of other settings are discarded
            instead of resumed.

    Returns:
        (policy directory, per-step log rows, sample completion rows). The step log covers every
        step, also across a resume; the samples cover the steps of this invocation.

    Raises:
        ValueError: empty prompt set. RewardError: a non-finite reward.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if not prompt_ids:
        raise ValueError("the RL prompt set is empty: run the prompts stage with --n-prompts >= 1")
    tok = base.tokenizer
    bos = tok.bos_token or ""
    texts = [bos + tok.decode(ids) for ids in prompt_ids]
    dataset = Dataset.from_dict({"prompt": texts})
    ckpt_dir = artifacts / "rlhf_checkpoints"
    final_dir = artifacts / "policy"
    stamp = ckpt_dir / "CONFIG_HASH"
    if ckpt_dir.exists() and (not stamp.exists() or stamp.read_text() != config_hash):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(config_hash)
    samples: list[dict] = []

    def reward_fn(prompts, completions, **kwargs):
        rewards = checked_rewards(completions)
        step = trainer.state.global_step if trainer is not None else 0
        if not samples or samples[-1]["step"] != step:
            for p, c, r in list(zip(prompts, completions, rewards))[:3]:
                samples.append({"step": step, "prompt": p[len(bos):], "completion": c, "reward": r})
        return rewards

    rng = random.Random(settings.seed)

    class LengthAndLog(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            trainer.generation_config.max_new_tokens = rng.randint(settings.min_new_tokens, settings.max_new_tokens)
            trainer.generation_kwargs["max_new_tokens"] = trainer.generation_config.max_new_tokens


    cfg = GRPOConfig(
        output_dir=str(ckpt_dir),
        learning_rate=settings.lr,
        beta=settings.beta,
        num_generations=settings.generations,
        per_device_train_batch_size=settings.prompts_per_step * settings.generations,
        max_steps=settings.steps,
        max_completion_length=settings.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_every,
        save_total_limit=1,
        save_only_model=False,
        report_to=[],
        use_cpu=settings.device == "cpu",
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        log_completions=False,
        shuffle_dataset=True,
        gradient_checkpointing=False,
    )
    policy = AutoModelForCausalLM.from_pretrained(base.spec.location, dtype=torch.float32)
    trainer = None
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_fn, args=cfg, train_dataset=dataset,
                          processing_class=tok, callbacks=[LengthAndLog()])
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming RL from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    # The log history is restored from a checkpoint on resume, so the curve covers every step.
    nan = float("nan")
    steps_log = [{"step": int(e["step"]), "reward": float(e["reward"]), "reward_std": float(e.get("reward_std", nan)),
                  "kl": float(e.get("kl", nan)), "mean_length": float(e.get("completions/mean_length", nan))}
                 for e in trainer.state.log_history if "reward" in e]

    tmp = artifacts / "policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return final_dir, steps_log, samples


def load_policy(policy_dir: Path, base) -> "LoadedModel":  # noqa: F821
    """Load the tuned policy through :mod:`lfp_core.models`, checking it belongs to ``base``.

    Raises:
        FileNotFoundError: no policy at ``policy_dir`` (the rlhf stage has not finished).
        ValueError: the policy's architecture, shape or tokenizer differ from the base model's.
    """
    from lfp_core.models import load_model

    if not (policy_dir / "config.json").exists():
        raise FileNotFoundError(f"tuned policy missing at {policy_dir}; re-run the rlhf stage of precompute")
    tuned = load_model(policy_dir, device=base.device)
    b, t = base.info(), tuned.info()
    for key in ("architecture", "n_layers", "d_model", "vocab_size", "n_params"):
        if b[key] != t[key]:
            raise ValueError(f"tuned policy at {policy_dir} is not a fine-tune of {b['name']}: "
                             f"{key} {t[key]} vs base {b[key]}")
    if tuned.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise ValueError(f"tuned policy at {policy_dir} has a different tokenizer from the base model {b['name']}")
    return tuned
