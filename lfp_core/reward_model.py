"""A preference (reward) model: the base LM with a scalar head, trained with trl's RewardTrainer on
preference pairs, and its transformer-lens view for SAEs, hooks and gradients.

Demo pairs are the oracle's: two base-model completions of the same prompt, the one with the higher
VADER reward preferred (ties dropped). The model reads ``BOS + prompt + completion`` and scores the
last token (as transformers' sequence-classification heads do).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from lfp_core.errors import BadInputError, MissingInputError
from lfp_core.settings import RMSettings

log = logging.getLogger(__name__)


def oracle_pairs(groups: dict[int, list[tuple[list[int], float]]]) -> list[dict]:
    """Every pair of completions of one prompt whose oracle rewards differ, the higher one chosen.

    Args:
        groups: prompt id -> [(completion token ids, oracle reward)].
    """
    out = []
    for pid, items in sorted(groups.items()):
        for (a, ra), (b, rb) in itertools.combinations(items, 2):
            if ra == rb:
                continue
            (c, rc), (r, rr) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))
            out.append(
                {
                    "prompt_id": int(pid),
                    "chosen_ids": list(c),
                    "rejected_ids": list(r),
                    "chosen_oracle": float(rc),
                    "rejected_oracle": float(rr),
                }
            )
    return out


def train_reward_model(
    base,
    pairs: list[dict],
    prompts: dict[int, list[int]],
    settings: RMSettings,
    out_dir: Path,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Path, list[dict]]:
    """Fine-tune ``base`` (a LoadedModel) with a scalar head on ``pairs`` (see :func:`oracle_pairs`).

    Returns the model's directory (written via a temporary folder and a rename) and the training log.
    """
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    if not pairs:
        raise BadInputError(
            "no preference pairs with differing rewards: sample more completions per prompt "
            "(--set rm_samples_per_prompt=...)"
        )
    tok = base.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    data = Dataset.from_dict(
        {
            "chosen_ids": [bos + prompts[p["prompt_id"]] + p["chosen_ids"] for p in pairs],
            "rejected_ids": [bos + prompts[p["prompt_id"]] + p["rejected_ids"] for p in pairs],
        }
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base.spec.location, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RewardConfig(
            output_dir=tmp,
            num_train_epochs=settings.epochs,
            learning_rate=settings.lr,
            per_device_train_batch_size=settings.batch_size,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            seed=seed,
            data_seed=seed,
            disable_tqdm=True,
            lr_scheduler_type="linear",
            warmup_steps=0,
            gradient_checkpointing=False,
        )
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.train()
    steps = [
        {"step": int(e["step"]), "loss": float(e["loss"]), "accuracy": float(e.get("accuracy", float("nan")))}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)  # the trainer trained it in place (trainer.model is model)
    tok.save_pretrained(tmp_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir, steps


class RewardModel:
    """A trained preference model as a HookedSAETransformer body plus its scalar head.

    ``score`` equals the transformers model's output on the same tokens (tested); the hooked body is
    what SAEs are trained on and spliced into, and what attribution differentiates.
    """

    def __init__(self, path: str | Path, base, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from lfp_core.models import to_hooked

        path = Path(path)
        if not (path / "config.json").exists():
            raise MissingInputError(f"no reward model at {path}; run the reward_model stage of precompute")
        hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        body = AutoModelForCausalLM.from_pretrained(base.spec.location, dtype=torch.float32)
        body.base_model.load_state_dict(hf.base_model.state_dict(), strict=True)  # the trained body, LM head unused
        self.hf = hf.to(device)
        self.hooked = to_hooked(body.eval(), base.tokenizer, base.spec, device)
        for p in self.hooked.parameters():
            p.requires_grad_(False)
        self.head = hf.score.to(device)
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.tokenizer = base.tokenizer
        self.device = device
        self.bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def score_tokens(self, toks: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Reward [batch] of right-padded ``toks`` [batch, pos], read at positions ``last`` [batch]
        (causal attention: padding after ``last`` cannot change it). Runs under any active hooks."""
        resid = self.hooked(toks, stop_at_layer=self.hooked.cfg.n_layers)  # [batch, pos, d_model]
        x = self.hooked.ln_final(resid)
        return self.head(x[torch.arange(len(last)), last]).squeeze(-1)

    def batch(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token tensor and last positions of sequences (BOS already included)."""
        from lfp_core.attribution import right_pad

        return right_pad(seqs, self.tokenizer.pad_token_id or 0, self.device)

    @torch.no_grad()
    def score(self, seqs: list[list[int]], batch_size: int | None = None) -> np.ndarray:
        """Rewards of token sequences (BOS included); ``batch_size`` defaults to the device's (64 on a CPU)."""
        from lfp_core.config import inference_batch

        batch_size = batch_size or inference_batch(self.device, 64)
        out = []
        for i in range(0, len(seqs), batch_size):
            toks, last = self.batch(seqs[i : i + batch_size])
            out.append(self.score_tokens(toks, last).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def pair_accuracy(
    chosen: np.ndarray,
    rejected: np.ndarray,
    prompt_ids: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Held-out pair accuracy (chosen scored above rejected) with a 95% interval.

    Pairs made from completions of one prompt share that prompt (and completions), so they are not
    independent: with ``prompt_ids`` the interval is the percentile interval of a cluster bootstrap that
    resamples prompts (:func:`lfp_core.evaluation.cluster_bootstrap_means`). Where every resample gives
    the same accuracy (all pairs right, or all wrong) it is the Wilson interval of one observation per
    prompt instead. Without ``prompt_ids``: the Wilson interval over pairs (pairs taken as independent).
    """
    from lfp_core.probes import wilson_interval

    n = len(chosen)
    right = np.asarray(chosen) > np.asarray(rejected)
    acc = float(right.mean()) if n else float("nan")
    if prompt_ids is None or not n:
        lo, hi = wilson_interval(acc, n) if n else (float("nan"), float("nan"))
        return {"acc": acc, "lo": lo, "hi": hi, "n": n, "method": "Wilson over pairs (pairs independent)"}
    from lfp_core.evaluation import cluster_bootstrap_means

    n_prompts = len(np.unique(np.asarray(prompt_ids)))
    boot = cluster_bootstrap_means(right.astype(float), prompt_ids, n_boot, seed)
    if boot.min() == boot.max():
        lo, hi = wilson_interval(acc, n_prompts)
        method = f"Wilson over {n_prompts} prompts (every pair alike)"
    else:
        lo, hi = (float(x) for x in np.quantile(boot, [0.025, 0.975]))
        method = f"cluster bootstrap over {n_prompts} prompts ({n_boot} resamples)"
    return {"acc": acc, "lo": lo, "hi": hi, "n": n, "n_prompts": n_prompts, "method": method}
