"""Policy fine-tuning against the run's reward (trl GRPO; VADER by default) — stage 1 of the paper's
pipeline. The reward is a plug-in (:mod:`lfp_core.rewards`) scoring each (prompt, completion) the
policy samples; the measurements below are the VADER default's.

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

Defaults (lr 1e-4, β 0.2, 150 steps of 4 prompts × 8 completions, constant lr): measured on the
demo model with the demo preset (1,024 held-out completions, same prompts and seeds for both
policies), as ``python -m lfp_core.precompute --preset demo --set rl_lr=… --set rl_beta=…`` printed:

=========  =====  ================  =============  ===========  =============================
lr         β      tuned vs base     gain in s.e.   KL / token   distinct-2 tuned (base 0.801)
=========  =====  ================  =============  ===========  =============================
2e-4       0.1    5.712 vs 0.056    99.0           3.6528       0.109  (collapsed: "great great…")
1e-4       0.1    ≈5.0 vs 0.056     87.5           3.0967       0.133  (collapsed)
1.5e-4     0.2    ≈1.36 vs 0.056    45.3           0.6180       0.542
**1e-4**   **0.2** **0.956 vs 0.056** **37.5**     **0.3598**   **0.612** (fluent, sentiment-laden)
=========  =====  ================  =============  ===========  =============================

β decides collapse more than lr: at β 0.1 both learning rates hack the lexicon; at β 0.2 the
policy keeps writing reviews ("a great movie drama and enjoyed it for all the great story") and
the gain is still far beyond 3 standard errors.

Sampling follows the paper: pure sampling (temperature 1, top_k 0, top_p 1), the model's BOS
before the 2–9 token prompt, and a completion length drawn from 8–19 tokens once per step (as the
paper's trl PPO notebook drew one ``gen_len`` per batch).

Checkpoints go to ``artifacts/rlhf_checkpoints``; an interrupted stage resumes from the last one.
The final policy is written to a temporary directory and renamed to ``artifacts/policy``, so a
later stage never sees a half-written model.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lfp_core.errors import BadInputError, MissingInputError
from lfp_core.rewards import Reward, RewardError, load_reward
from lfp_core.settings import DPOSettings, DPOStageSettings, NullStageSettings, RLSettings, RLStageSettings

if TYPE_CHECKING:
    from lfp_core.models import LoadedModel

log = logging.getLogger(__name__)
__all__ = [
    "RewardError",
    "implicit_rewards",
    "load_policy",
    "null_reward_transform",
    "train_dpo",
    "train_policy",
    "truncate_pair",
]


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    if not ckpt_dir.is_dir():
        return None
    cks = sorted(
        (p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return str(cks[-1]) if cks else None


def train_policy(
    base,
    prompt_ids: list[list[int]],
    s: RLStageSettings | NullStageSettings,
    artifacts: Path,
    config_hash: str = "",
    reward: Reward | None = None,
    name: str = "policy",
    reward_transform: Callable[[int, list[float]], list[float]] | None = None,
) -> tuple[Path, list[dict], list[dict]]:
    """Fine-tune a copy of ``base`` with GRPO against the run's reward (``s.reward``).

    Args:
        base: the base :class:`lfp_core.models.LoadedModel` (left unchanged).
        prompt_ids: RL prompts as token ids (no BOS).
        s: the RL stage's settings: GRPO hyper-parameters (``s.rl``), completion lengths, seed and device.
        artifacts: the run's artifacts directory.
        config_hash: identity of the settings; checkpoints of other settings are discarded
            instead of resumed.
        reward: the loaded ``s.reward`` plug-in (loaded here when not given). It scores each sampled
            (prompt text without BOS, completion text); its scores are GRPO's rewards.
        name: the policy's directory under ``artifacts`` (``policy``; the null fine-tune's ``null_policy``),
            its checkpoints in ``rlhf_checkpoints`` (``{name}_checkpoints`` for another name).
        reward_transform: ``(step, rewards) -> rewards`` applied to each step's scores before GRPO sees them
            (the null control's shuffle, :func:`null_reward_transform`); the step log records what GRPO saw.

    Returns:
        (policy directory, per-step log rows, sample completion rows). The step log covers every
        step, also across a resume; the samples cover the steps of this invocation.

    Raises:
        ValueError: empty prompt set. RewardError: the reward gave the wrong count or non-finite values.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if not prompt_ids:
        raise BadInputError("the RL prompt set is empty: run the prompts stage with --n-prompts >= 1")
    tok = base.tokenizer
    # trl tokenises the prompt texts with the tokenizer's own special tokens: prepend BOS only where the
    # tokenizer does not add it itself (Llama's does; a second one would train on "<s><s>prompt")
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    bos = "" if adds_bos else (tok.bos_token or "")
    texts = [bos + tok.decode(ids) for ids in prompt_ids]
    dataset = Dataset.from_dict({"prompt": texts})
    ckpt_dir = _fresh_checkpoint_dir(
        artifacts, config_hash, "rlhf_checkpoints" if name == "policy" else f"{name}_checkpoints"
    )
    final_dir = artifacts / name
    samples: list[dict] = []
    rw = reward if reward is not None else load_reward(s.reward.spec, device=s.run.device)

    def reward_fn(prompts, completions, **kwargs):
        plain = [p[len(bos) :] if bos and p.startswith(bos) else p for p in prompts]
        rewards = [float(x) for x in rw.score(plain, completions)]
        step = trainer.state.global_step if trainer is not None else 0
        if reward_transform is not None:
            rewards = [float(x) for x in reward_transform(step, rewards)]
        if not samples or samples[-1]["step"] != step:
            for p, c, r in list(zip(prompts, completions, rewards))[:3]:
                samples.append({"step": step, "prompt": p[len(bos) :], "completion": c, "reward": r})
        return rewards

    settings: RLSettings = s.rl
    lengths, seed, device = s.completions, s.run.seed, s.run.device
    # one completion length per step, drawn up front: step i gets the i-th draw whether the run went through
    # uninterrupted or resumed at a checkpoint (a generator drawn per step restarted at the first draw)
    rng = random.Random(seed)
    step_lengths = [rng.randint(lengths.min_new_tokens, lengths.max_new_tokens) for _ in range(settings.steps)]

    class LengthAndLog(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            assert trainer is not None  # callbacks run inside trainer.train()
            trainer.generation_config.max_new_tokens = step_lengths[min(state.global_step, len(step_lengths) - 1)]
            trainer.generation_kwargs["max_new_tokens"] = trainer.generation_config.max_new_tokens

    cfg = GRPOConfig(
        output_dir=str(ckpt_dir),
        learning_rate=settings.lr,
        beta=settings.beta,
        num_generations=settings.generations,
        per_device_train_batch_size=settings.prompts_per_step * settings.generations,
        max_steps=settings.steps,
        max_completion_length=lengths.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_every,
        save_total_limit=1,
        save_only_model=False,
        report_to=[],
        use_cpu=device == "cpu",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        log_completions=False,
        shuffle_dataset=True,
        gradient_checkpointing=False,
    )
    policy = AutoModelForCausalLM.from_pretrained(base.spec.location, dtype=torch.float32)
    trainer = None
    trainer = _resumable_grpo(GRPOTrainer)(
        model=policy,
        reward_funcs=reward_fn,
        args=cfg,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[LengthAndLog()],
    )
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming RL from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    # The log history is restored from a checkpoint on resume, so the curve covers every step.
    nan = float("nan")
    steps_log = [
        {
            "step": int(e["step"]),
            "reward": float(e["reward"]),
            "reward_std": float(e.get("reward_std", nan)),
            "kl": float(e.get("kl", nan)),
            "mean_length": float(e.get("completions/mean_length", nan)),
        }
        for e in trainer.state.log_history
        if "reward" in e
    ]

    _publish(trainer.model, tok, artifacts, ckpt_dir, final_dir)
    return final_dir, steps_log, samples


def null_reward_transform(recipe: str, seed: int) -> Callable[[int, list[float]], list[float]]:
    """The null control's reward (:class:`lfp_core.settings.DiffingSettings`): 'shuffled' permutes each step's
    rewards across its completions with a permutation drawn from (seed, step) — the same on a resumed run —
    so GRPO sees the reward's distribution with its link to the text broken; 'constant' gives every
    completion 0 (every advantage is 0)."""
    import numpy as np

    if recipe not in ("shuffled", "constant"):
        raise ValueError(f"no null reward {recipe!r}: 'shuffled' or 'constant'")

    def transform(step: int, rewards: list[float]) -> list[float]:
        if recipe == "constant":
            return [0.0] * len(rewards)
        perm = np.random.default_rng([int(seed), 7919, int(step)]).permutation(len(rewards))
        return [rewards[int(i)] for i in perm]

    return transform


def _weights_as_saved(trainer_cls: type) -> type:
    """``trainer_cls`` resuming with the checkpoint's weights read as from_pretrained reads them.

    transformers 5's Trainer loads a checkpoint's model.safetensors without the key renames from_pretrained
    applies: a GPT-NeoX checkpoint stores its unembedding as ``embed_out.weight``, the model names it
    ``lm_head.weight``, so a resumed policy kept its *initial* unembedding (the log says "missing keys ...
    lm_head.weight") with the optimizer state of the trained one, and every step after a resume differed
    from the uninterrupted run."""

    class WeightsAsSaved(trainer_cls):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            from transformers import AutoModelForCausalLM

            target = model if model is not None else self.model
            saved = AutoModelForCausalLM.from_pretrained(resume_from_checkpoint, dtype=torch.float32)
            target.load_state_dict(saved.state_dict(), strict=True)

    return WeightsAsSaved


def _resumable_grpo(grpo_trainer: type) -> type:
    """GRPOTrainer whose prompt order survives a resume.

    trl's RepeatSampler shuffles with one generator seeded once, so epoch e's order is its (e+1)-th
    permutation; a trainer resumed from a checkpoint builds a fresh sampler and replays epoch 0's order
    from the epoch it resumes at (measured: every step after a resume differed from the uninterrupted
    run). This sampler re-derives epoch e's permutation from the seed when the trainer calls
    ``set_epoch(e)``, which is the sequence an uninterrupted run draws, so neither kind of run changes
    order and both reach the same weights. The RNG, optimizer and step state come from the checkpoint
    (``save_only_model=False``); the completion length of each step is drawn up front; the weights are
    read back as from_pretrained reads them (see ``_load_from_checkpoint``)."""
    from trl.trainer.utils import RepeatSampler

    class EpochSeededRepeatSampler(RepeatSampler):
        def set_epoch(self, epoch: int) -> None:
            if self.shuffle:
                self.generator.manual_seed(self.seed if self.seed is not None else 0)
                for _ in range(epoch):  # the permutations the epochs before this one drew
                    torch.randperm(self.num_samples, generator=self.generator)

    class ResumableGRPOTrainer(_weights_as_saved(grpo_trainer)):  # type: ignore[misc]
        def _get_train_sampler(self, dataset=None):
            base = super()._get_train_sampler(dataset)
            return EpochSeededRepeatSampler(
                data_source=base.data_source,
                mini_repeat_count=base.mini_repeat_count,
                batch_size=base.batch_size,
                repeat_count=base.repeat_count,
                shuffle=base.shuffle,
                seed=base.seed,
            )

    return ResumableGRPOTrainer


def load_policy(policy_dir: Path, base) -> LoadedModel:
    """Load the tuned policy through :mod:`lfp_core.models`, checking it belongs to ``base``.

    Raises:
        FileNotFoundError: no policy at ``policy_dir`` (the rlhf stage has not finished).
        ValueError: the policy's architecture, shape or tokenizer differ from the base model's.
    """
    from lfp_core.models import load_model

    if not (policy_dir / "config.json").exists():
        raise MissingInputError(f"tuned policy missing at {policy_dir}; re-run the rlhf stage of precompute")
    tuned = load_model(policy_dir, device=base.device)
    b, t = base.info(), tuned.info()
    for key in ("architecture", "n_layers", "d_model", "vocab_size", "n_params"):
        if b[key] != t[key]:
            raise BadInputError(
                f"tuned policy at {policy_dir} is not a fine-tune of {b['name']}: {key} {t[key]} vs base {b[key]}"
            )
    if tuned.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise BadInputError(f"tuned policy at {policy_dir} has a different tokenizer from the base model {b['name']}")
    return tuned


# --- DPO on preference pairs (the HH task) -------------------------------------------------------


def truncate_pair(tok, pair: dict, s: DPOSettings) -> dict:
    """Keep the last ``max_prompt_length`` prompt tokens (the latest turns) and cut the responses so
    prompt + response fits ``max_length``; returns texts re-decoded from the kept tokens."""
    p = tok(pair["prompt"], add_special_tokens=False)["input_ids"][-s.max_prompt_length :]
    room = s.max_length - len(p)
    out = {"prompt": tok.decode(p)}
    for key in ("chosen", "rejected"):
        out[key] = tok.decode(tok(pair[key], add_special_tokens=False)["input_ids"][:room])
    return out


def train_dpo(
    base,
    pairs: list[dict],
    s: DPOStageSettings,
    artifacts: Path,
    config_hash: str = "",
) -> tuple[Path, list[dict]]:
    """DPO-tune a copy of ``base`` on {prompt, chosen, rejected} pairs with trl's DPOTrainer.

    Resumes from ``artifacts/rlhf_checkpoints`` like :func:`train_policy`; the final policy is
    renamed into ``artifacts/policy`` only when complete.

    Returns:
        (policy directory, per-step log rows with loss, reward margin and accuracy on the batch).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise BadInputError("the preference-pair set is empty")
    tok, settings, seed, device = base.tokenizer, s.dpo, s.run.seed, s.run.device
    data = Dataset.from_list([truncate_pair(tok, p, settings) for p in pairs])
    ckpt_dir, final_dir = _fresh_checkpoint_dir(artifacts, config_hash), artifacts / "policy"
    cfg = DPOConfig(
        output_dir=str(ckpt_dir),
        learning_rate=settings.lr,
        beta=settings.beta,
        max_length=settings.max_length,
        truncation_mode="keep_start",
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_every,
        save_total_limit=1,
        report_to=[],
        use_cpu=device == "cpu",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        dataset_num_proc=None,
    )
    policy = AutoModelForCausalLM.from_pretrained(base.spec.location, dtype=torch.float32)
    trainer = _weights_as_saved(DPOTrainer)(model=policy, args=cfg, train_dataset=data, processing_class=tok)
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming DPO from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    nan = float("nan")
    steps = [
        {
            "step": int(e["step"]),
            "reward": float(e.get("rewards/margins", nan)),
            "reward_std": nan,
            "kl": nan,
            "mean_length": nan,
            "loss": float(e.get("loss", nan)),
            "accuracy": float(e.get("rewards/accuracies", nan)),
        }
        for e in trainer.state.log_history
        if "loss" in e and "step" in e
    ]
    _publish(trainer.model, tok, artifacts, ckpt_dir, final_dir)
    return final_dir, steps


@torch.no_grad()
def implicit_rewards(
    policy_hf, ref_hf, tok, pairs: list[dict], settings: DPOSettings, batch_size: int = 16
) -> tuple[list[float], list[float]]:
    """DPO implicit rewards β·(log π(y|x) − log π_ref(y|x)) of each pair's chosen and rejected response."""

    def seqs(key):
        out = []
        for pair in pairs:
            t = truncate_pair(tok, pair, settings)
            p = tok(t["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(t[key], add_special_tokens=False)["input_ids"][: settings.max_length - len(p)]
            out.append((p, c))
        return out

    def logp(model, items):
        res = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, c) in enumerate(chunk):
                ids[r, : len(p) + len(c)] = torch.tensor(p + c)
                mask[r, : len(p) + len(c)] = 1
            lp = torch.log_softmax(
                model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float(), -1
            ).cpu()
            for r, (p, c) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # positions predicting the response
                res.append(float(lp[r, pos, torch.tensor(c)].sum()) if c else 0.0)
        return res

    out = []
    for key in ("chosen", "rejected"):
        items = seqs(key)
        out.append([settings.beta * (a - b) for a, b in zip(logp(policy_hf, items), logp(ref_hf, items))])
    return out[0], out[1]


def _fresh_checkpoint_dir(artifacts: Path, config_hash: str, sub: str = "rlhf_checkpoints") -> Path:
    """``artifacts/<sub>`` (``rlhf_checkpoints``), emptied when it holds checkpoints of other settings."""
    ckpt_dir = artifacts / sub
    stamp = ckpt_dir / "CONFIG_HASH"
    if ckpt_dir.exists() and (not stamp.exists() or stamp.read_text() != config_hash):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(config_hash)
    return ckpt_dir


def _publish(model, tok, artifacts: Path, ckpt_dir: Path, final_dir: Path) -> None:
    """Write the policy to a temporary directory, rename it into place, drop the checkpoints."""
    tmp = artifacts / f"{final_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
