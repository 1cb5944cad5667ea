"""Run configuration: dataclass configs, named presets, and where things live on disk.

A run is fully described by a :class:`RunConfig`. Each precompute stage hashes the fields it
reads (see :func:`stage_hash`), so changing a field recomputes exactly the stages that depend on
it and everything downstream of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shipped demo base model; LFP_DEMO_MODEL_DIR points elsewhere (e.g. a retrained copy).
DEMO_MODEL_DIR = Path(os.environ.get("LFP_DEMO_MODEL_DIR", REPO_ROOT / "data" / "models" / "imdb-neox-5m"))
RUNS_DIR = REPO_ROOT / "data" / "runs"


def runs_dir() -> Path:
    """Where the dashboard looks for runs: ``$LFP_RUNS_DIR``, else ``data/runs`` in the repo."""
    env = os.environ.get("LFP_RUNS_DIR")
    return Path(env).expanduser() if env else RUNS_DIR


def default_data_dir() -> Path | None:
    """The public data sets folder: ``$LFP_DATA_DIR``, else ``../shared/data`` beside the repo.

    Returns None when neither exists (a researcher's own clone): callers then fall back to the
    hub (when online) or to model-sampled prompts.
    """
    env = os.environ.get("LFP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


TASKS = ("vader", "hh")


@dataclass
class RunConfig:
    """Everything a run depends on. Field groups mirror the precompute stages.

    Attributes:
        model: ``demo`` (the shipped model), a local HF directory, or a hub id.
        task: the feedback task: ``vader`` (the paper's sentiment-lexicon reward, RL with GRPO) or
            ``hh`` (Anthropic HH-RLHF preference pairs, DPO).
        data_dir: public data sets folder (None: hub when online, else model-sampled prompts).
        seed: master seed; every stage derives its own from it.
        device: torch device for model work (``cpu`` or ``cuda``).
        n_prompts: number of RL (training) prompts, prefixes of IMDB *train* reviews.
        n_eval_prompts: number of held-out prompts, prefixes of IMDB *test* reviews; base and
            tuned policies are evaluated on these with identical sampling.
        prompt_min_tokens / prompt_max_tokens: prefix length range, inclusive (paper: 2–9).
        min_new_tokens / max_new_tokens: completion length range, inclusive (paper: 8–19).
        samples_per_prompt: completions sampled per prompt for the base-model evaluation.
        gen_batch_size: prompts per generation batch (also the resume granularity).
        rl_steps / rl_lr / rl_beta: GRPO optimiser steps, learning rate and KL coefficient.
        rl_prompts_per_step / rl_generations: prompts per step and completions per prompt (group).
        rl_save_every: checkpoint interval in steps (an interrupted RL stage resumes from it).
        n_selected_layers: how many of the most divergent layers later stages study.
        divergence_measure: which divergence picks the layers: 'activation' (default; MLP-output
            1 − cos) or 'param' (the paper's; nearly flat across equal-shaped layers under Adam, see
            lfp_core.divergence).
        divergence_sequences: held-out sequences for the activation divergence.
        n_pairs / n_eval_pairs: HH task: DPO training pairs and held-out evaluation pairs.
        dpo_*: HH task: DPO β, learning rate, epochs, batch size, max length and max prompt length
            (paper: β 0.1, length 256, prompt 128).
        sae_corpus_docs / sae_doc_tokens: activation corpus: held-out IMDB (test) reviews, each cut
            to its first ``sae_doc_tokens`` tokens (model-sampled documents when IMDB is not
            reachable), plus every base and tuned completion of the held-out prompts.
        sae_eval_every: every Nth corpus document is held out from SAE training (metrics use it).
        sae_arch / sae_expansion / sae_k / sae_l1: the main SAE of each (model, selected layer):
            architecture (topk, relu, tied), dictionary size as a multiple of d_model, TopK k,
            L1 coefficient (relu/tied).
        sae_lr / sae_batch_size / sae_train_tokens: SAE training (one pass over that many tokens). Batches
            of 1,024 at lr 6e-3 train a demo TopK SAE in half the CPU time of 256 at 3e-3, FVU 0.140 vs
            0.136 (bench/RESULTS.md); the quick preset keeps 256 so its 30k tokens still make ~117 steps.
        sae_variants: extra SAEs of the tuned model per selected layer, ``ARCH-Nx`` comma-separated
            (the paper's L1 ReLU at 1x and 2x, and its tied-decoder SAE), for the 1x/2x MMCS.
        sae_sweep_l1: L1 coefficients of the sweep (relu, 1x, tuned model, first selected layer).
        sae_ce_docs: held-out documents for the next-token loss (clean / spliced / zero-ablated).
        mfr_n / mfr_coefficient / mfr_warmup_frac: Mutual Feature Regularization group on the first
            selected layer (0 disables): members, penalty weight, warm-up share of training.
        feature_top_k / feature_window: top activating contexts per feature and their ±window.
        probe_min_points: fewest lexicon-word positions the probe stage accepts.
        probe_contrast_items: lexicon-word occurrences swapped for the contrastive variant.
        probe_texts_per_class: texts per class for the HH (chosen/rejected) and toxicity separation probes.
        labeller: ``offline`` (deterministic, no network; named as such everywhere) or ``openai`` (any
            OpenAI-compatible endpoint: ``llm_model``, ``llm_base_url``; the key from $OPENAI_API_KEY).
        label_probe_top / label_random: features labelled per run: the probe's top-ranked features of
            the tuned model, plus as many drawn at random from the rest (for the overlap test).
        label_max_tokens: token budget of an LLM labelling run (estimated before it starts).
        label_detection_n: held-out activating and non-activating excerpts per feature for detection scoring.
        ablation_n / ablation_prefix_tokens: completions sampled per feature set, from prefixes of that
            many tokens of held-out IMDB reviews (paper: 1,000 completions); lengths as in the RL.
        ablation_k: size of the probe-top set (the tuned model's firing features with the largest
            positive probe importance); ablation_random: size-matched random sets per tested set (>= 5).
        rm_samples_per_prompt / rm_epochs / rm_lr / rm_batch_size: the preference model: base
            completions sampled per RL prompt (pairs of differing VADER reward become training pairs),
            trl RewardTrainer epochs, learning rate and batch size.
        rm_layers: residual-stream layers of the preference model that get SAEs ("auto": the middle
            and the last layer, or a comma-separated list).
        atp_steps / atp_pairs / atp_top_k: attribution patching: integrated-gradient steps, held-out
            pairs with the largest oracle reward gaps to attribute over, features verified by true ablation.
    """

    model: str = "demo"
    task: str = "vader"
    data_dir: str | None = None
    seed: int = 0
    device: str = "cpu"
    n_prompts: int = 256
    n_eval_prompts: int = 256
    prompt_min_tokens: int = 2
    prompt_max_tokens: int = 9
    min_new_tokens: int = 8
    max_new_tokens: int = 19
    samples_per_prompt: int = 1
    gen_batch_size: int = 64
    rl_steps: int = 150
    rl_lr: float = 1e-4
    rl_beta: float = 0.2
    rl_prompts_per_step: int = 4
    rl_generations: int = 8
    rl_save_every: int = 25
    n_selected_layers: int = 2
    divergence_measure: str = "activation"
    divergence_sequences: int = 256
    n_pairs: int = 512
    n_eval_pairs: int = 256
    dpo_beta: float = 0.1
    dpo_lr: float = 5e-5
    dpo_epochs: int = 1
    dpo_batch_size: int = 8
    dpo_max_length: int = 256
    dpo_max_prompt_length: int = 128
    sae_corpus_docs: int = 3000
    sae_doc_tokens: int = 128
    sae_eval_every: int = 10
    sae_arch: str = "topk"
    sae_expansion: int = 2
    sae_k: int = 32
    sae_l1: float = 1.0
    sae_lr: float = 6e-3
    sae_batch_size: int = 1024
    sae_train_tokens: int = 300_000
    sae_variants: str = "relu-1x,relu-2x,tied-1x"
    sae_sweep_l1: str = "0.25,0.5,1,2,4"
    sae_ce_docs: int = 128
    mfr_n: int = 2
    mfr_coefficient: float = 30.0
    mfr_warmup_frac: float = 0.2
    feature_top_k: int = 20
    feature_window: int = 8
    probe_min_points: int = 200
    probe_contrast_items: int = 1500
    probe_texts_per_class: int = 300
    labeller: str = "offline"
    llm_model: str = "gpt-4o"
    llm_base_url: str | None = None
    label_probe_top: int = 24
    label_random: int = 24
    label_max_tokens: int = 400_000
    label_detection_n: int = 5
    ablation_n: int = 1000
    ablation_prefix_tokens: int = 30
    ablation_k: int = 16
    ablation_random: int = 5
    rm_samples_per_prompt: int = 4
    rm_epochs: int = 2
    rm_lr: float = 1e-4
    rm_batch_size: int = 16
    rm_layers: str = "auto"
    atp_steps: int = 4
    atp_pairs: int = 64
    atp_top_k: int = 20
    preset: str = "custom"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def validate(self) -> None:
        """Raise ValueError with a specific message for an impossible configuration."""
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not available; supported: {', '.join(TASKS)}")
        if self.divergence_measure not in ("param", "activation"):
            raise ValueError(f"divergence_measure must be 'param' or 'activation', got {self.divergence_measure!r}")
        if self.rl_steps < 1 or self.rl_generations < 2:
            raise ValueError("need rl_steps >= 1 and rl_generations >= 2 (GRPO compares a group)")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not 1 <= self.prompt_min_tokens <= self.prompt_max_tokens:
            raise ValueError("need 1 <= prompt_min_tokens <= prompt_max_tokens")
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("need 1 <= min_new_tokens <= max_new_tokens")
        if self.sae_arch not in ("topk", "relu", "tied"):
            raise ValueError(f"sae_arch must be topk, relu or tied, got {self.sae_arch!r}")
        self.variants()
        self.sweep_l1()
        if self.labeller not in ("offline", "openai"):
            raise ValueError(f"labeller must be 'offline' or 'openai', got {self.labeller!r}")
        if self.ablation_random < 5:
            raise ValueError(f"ablation_random must be >= 5 (random control sets per tested set), got {self.ablation_random}")
        self.rm_layer_list(4)
        if self.mfr_n == 1 or self.mfr_n < 0:
            raise ValueError("mfr_n must be 0 (off) or >= 2 (MFR regularises SAEs towards each other)")
        for name in ("sae_corpus_docs", "sae_doc_tokens", "sae_eval_every", "sae_expansion", "sae_k",
                     "sae_batch_size", "sae_train_tokens", "sae_ce_docs", "feature_top_k", "ablation_n",
                     "ablation_prefix_tokens", "ablation_k", "rm_samples_per_prompt", "rm_epochs", "rm_batch_size",
                     "atp_steps", "atp_pairs", "atp_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_prompts", "n_eval_prompts", "samples_per_prompt", "gen_batch_size", "n_selected_layers",
                     "rl_prompts_per_step", "rl_save_every", "divergence_sequences", "n_pairs", "n_eval_pairs",
                     "dpo_epochs", "dpo_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


    def variants(self) -> list[tuple[str, int]]:
        """``sae_variants`` parsed: [(arch, expansion)], e.g. 'relu-1x,tied-1x' -> [('relu', 1), ('tied', 1)]."""
        out = []
        for item in filter(None, (x.strip() for x in (self.sae_variants or "").split(","))):
            arch, _, mult = item.partition("-")
            if arch not in ("topk", "relu", "tied") or not mult.endswith("x") or not mult[:-1].isdigit():
                raise ValueError(f"sae_variants item {item!r}: expected ARCH-Nx with ARCH topk, relu or tied, e.g. relu-2x")
            out.append((arch, int(mult[:-1])))
        return out

    def rm_layer_list(self, n_layers: int) -> list[int]:
        """``rm_layers`` resolved for a model of ``n_layers`` layers."""
        if (self.rm_layers or "auto").strip() == "auto":
            return sorted({n_layers // 2, n_layers - 1})
        try:
            return sorted({int(x) for x in self.rm_layers.split(",") if x.strip()})
        except ValueError as exc:
            raise ValueError(f"rm_layers must be 'auto' or comma-separated layer numbers, got {self.rm_layers!r}") from exc

    def sweep_l1(self) -> list[float]:
        try:
            vals = [float(x) for x in (self.sae_sweep_l1 or "").split(",") if x.strip()]
        except ValueError as exc:
            raise ValueError(f"sae_sweep_l1 must be comma-separated numbers, got {self.sae_sweep_l1!r}") from exc
        if any(v <= 0 for v in vals):
            raise ValueError("sae_sweep_l1 coefficients must be > 0")
        return vals


def inference_batch(device: str, cpu: int = 32) -> int:
    """Sequences per batch of an inference-only pass (harvest, scoring, evaluation, attribution): the
    results do not depend on it, so on a GPU it is 8x the CPU size, which fills the device for the
    models this tool targets. (Sampling chunks, SAE and RL batches are hyperparameters and stay as
    configured: ``--gen-batch-size``, ``--set sae_batch_size=...``.)"""
    return cpu * 8 if str(device).startswith("cuda") else cpu


PRESETS: dict[str, dict] = {
    # quick: a smoke run of every stage, for tests and first contact (271 s on 2 cores: python -m bench stages --preset quick).
    "quick": {"n_prompts": 64, "n_eval_prompts": 64, "samples_per_prompt": 1, "gen_batch_size": 32,
              "rl_steps": 60, "n_pairs": 128, "n_eval_pairs": 64, "dpo_max_length": 128, "dpo_max_prompt_length": 64,
              "sae_corpus_docs": 300, "sae_train_tokens": 30_000, "sae_batch_size": 256, "sae_lr": 3e-3, "sae_sweep_l1": "0.5,2", "sae_ce_docs": 32,
              "label_probe_top": 8, "label_random": 8, "ablation_n": 64, "ablation_k": 8, "rm_samples_per_prompt": 4,
              "atp_pairs": 16, "atp_top_k": 10},
    # demo: the embedded demo run the quick start serves.
    "demo": {"n_prompts": 512, "n_eval_prompts": 512, "samples_per_prompt": 2, "gen_batch_size": 64, "ablation_n": 512},
    # paper: the paper's scale (1,000 completions per evaluation); meant for a GPU.
    "paper": {"n_prompts": 1000, "n_eval_prompts": 1000, "samples_per_prompt": 1, "gen_batch_size": 128},
}


def preset_config(name: str, **overrides) -> RunConfig:
    """Build the config of a named preset, with explicit overrides (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name], "preset": name}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg


def stage_hash(cfg: RunConfig, fields: tuple[str, ...], upstream: tuple[str, ...] = ()) -> str:
    """Hash of the config fields a stage reads plus the hashes of the stages it builds on."""
    payload = json.dumps(
        {"fields": {f: getattr(cfg, f) for f in fields}, "upstream": list(upstream)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
