"""Typed run settings: one frozen dataclass per group, composed into :class:`RunConfig`.

A precompute stage receives a *stage settings* object (e.g. :class:`SAEStageSettings`) holding
exactly the groups it reads, and its hash is computed from that object
(:func:`settings_hash`). A stage therefore cannot read a setting its hash does not cover: the
settings it is handed are the settings it is hashed on.

Every field has a dotted name (``rl.steps``) and a flat alias (``rl_steps``, the names of the
settings layout before these groups existed); ``--set`` takes either. Values are typed: choices
are ``Literal``, lists are tuples; ``--set`` strings are turned into the field's
type or raises :class:`ConfigError` naming the field and what it expects (see
:meth:`RunConfig.with_values`).

Settings layout 2 stores the config as ``{"layout": 2, "run": {...}, "rl": {...}, ...}``. A
layout-1 config (flat names) is read through the aliases (the dashboard and the report can show
an old run); the precompute refuses to extend an old-layout run, because its stage hashes cannot
be compared with today's (see :mod:`lfp_core.precompute`).

This module imports nothing heavy (no torch), so the stage registry, the dashboard and the report
can import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from lfp_core.errors import ConfigError

LAYOUT = 2

Task = Literal["vader", "hh"]
SAEArch = Literal["topk", "relu", "tied"]
DivergenceMeasure = Literal["activation", "param"]
Labeller = Literal["offline", "openai"]
# transformer-lens hook points that are a d_model-wide stream of every block (what an SAE of this tool reads)
SAEHook = Literal["hook_mlp_out", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out"]


def _flat(name: str) -> dict:
    return {"flat": name}


def _check_positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    group = _GROUP_OF_CLASS.get(type(obj).__name__, type(obj).__name__)
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{group}.{name} ({flat_name(type(obj), name)}) must be {bound}, got {value!r}")


def _check_choice(obj: Any, name: str) -> None:
    hint = get_type_hints(type(obj))[name]
    allowed = get_args(hint)
    value = getattr(obj, name)
    if value not in allowed:
        group = _GROUP_OF_CLASS.get(type(obj).__name__, type(obj).__name__)
        raise ConfigError(
            f"{group}.{name} ({flat_name(type(obj), name)}) must be one of "
            f"{', '.join(map(str, allowed))}; got {value!r}"
        )


# --- the groups ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """What every stage depends on.

    Attributes:
        model: ``demo`` (the shipped model), a local HF directory, or a hub id.
        task: ``vader`` (the paper's sentiment-lexicon reward, RL with GRPO) or ``hh`` (Anthropic
            HH-RLHF preference pairs, DPO).
        data_dir: public data sets folder (None: hub when online, else model-sampled prompts).
        seed: master seed; every stage derives its own from it.
        device: torch device for model work (``cpu``, ``cuda`` or ``cuda:N``).
    """

    model: str = "demo"
    task: Task = "vader"
    data_dir: str | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_choice(self, "task")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"run.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not self.model:
            raise ConfigError("run.model must name the demo model, a local directory or a hub id")


@dataclass(frozen=True)
class RewardSettings:
    """The reward every stage scores text with (:mod:`lfp_core.rewards`): ``vader`` (the paper's
    lexicon reward, the default), ``classifier:PATH_OR_ID[:LABEL][@prob]``, ``reward-model:PATH_OR_ID``
    or ``python:MODULE:FUNCTION``. The spec is checked to parse here; loading it is the precompute's
    pre-flight check (:func:`lfp_core.rewards.check_reward`)."""

    spec: str = field(default="vader", metadata=_flat("reward"))

    def __post_init__(self) -> None:
        from lfp_core.rewards import parse_spec  # here, not at the top: no import cycle

        parse_spec(self.spec)


@dataclass(frozen=True)
class PromptSettings:
    """RL (training) prompts from IMDB *train* reviews and held-out prompts from IMDB *test* reviews;
    prefix lengths inclusive (paper: 2–9). ``source``: the researcher's own prompts instead (a JSONL
    file with a ``text`` field, or ``hf:NAME_OR_PATH[:SPLIT[:COLUMN]]``; see :mod:`lfp_core.texts`):
    each text is one whole prompt, split into RL and held-out prompts by document (an optional
    ``split`` field of "train"/"eval" is honoured); the prefix lengths then do not apply."""

    n_train: int = field(default=256, metadata=_flat("n_prompts"))
    n_eval: int = field(default=256, metadata=_flat("n_eval_prompts"))
    min_tokens: int = field(default=2, metadata=_flat("prompt_min_tokens"))
    max_tokens: int = field(default=9, metadata=_flat("prompt_max_tokens"))
    source: str | None = field(default=None, metadata=_flat("prompts_source"))

    def __post_init__(self) -> None:
        _check_positive(self, "n_train", "n_eval", "min_tokens")
        if self.source is not None and not self.source.strip():
            raise ConfigError("prompts.source (prompts_source) must name a JSONL file or hf:DATASET, got ''")
        if self.min_tokens > self.max_tokens:
            raise ConfigError(
                f"need prompts.min_tokens <= prompts.max_tokens, got {self.min_tokens} > {self.max_tokens}"
            )


@dataclass(frozen=True)
class CompletionSettings:
    """Completion length range, inclusive (paper: 8–19), for RL, evaluation, ablation and the PM."""

    min_new_tokens: int = 8
    max_new_tokens: int = 19

    def __post_init__(self) -> None:
        _check_positive(self, "min_new_tokens")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"need min_new_tokens <= max_new_tokens, got {self.min_new_tokens} > {self.max_new_tokens}"
            )


@dataclass(frozen=True)
class GenerationSettings:
    """Prompts per generation batch. Sampling seeds are drawn per batch, so this changes samples
    (it is in the hash of every stage that samples), and it is the resume granularity."""

    batch_size: int = field(default=64, metadata=_flat("gen_batch_size"))

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size")


@dataclass(frozen=True)
class EvaluationSettings:
    """Completions sampled per held-out prompt for the base and tuned evaluations."""

    samples_per_prompt: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "samples_per_prompt")


@dataclass(frozen=True)
class RLSettings:
    """GRPO hyper-parameters (see :mod:`lfp_core.rlhf` for the measured defaults): optimiser steps,
    learning rate, KL coefficient β, prompts per step, completions per prompt (the group), and the
    checkpoint interval (an interrupted RL stage resumes from the last checkpoint)."""

    steps: int = field(default=150, metadata=_flat("rl_steps"))
    lr: float = field(default=1e-4, metadata=_flat("rl_lr"))
    beta: float = field(default=0.2, metadata=_flat("rl_beta"))
    prompts_per_step: int = field(default=4, metadata=_flat("rl_prompts_per_step"))
    generations: int = field(default=8, metadata=_flat("rl_generations"))
    save_every: int = field(default=25, metadata=_flat("rl_save_every"))

    def __post_init__(self) -> None:
        _check_positive(self, "steps", "lr", "prompts_per_step", "save_every")
        _check_positive(self, "beta", allow_zero=True)
        if self.generations < 2:
            raise ConfigError(
                f"rl.generations (rl_generations) must be >= 2 (GRPO compares a group), got {self.generations}"
            )


@dataclass(frozen=True)
class PairSettings:
    """HH task: DPO training pairs and held-out evaluation pairs."""

    n_train: int = field(default=512, metadata=_flat("n_pairs"))
    n_eval: int = field(default=256, metadata=_flat("n_eval_pairs"))

    def __post_init__(self) -> None:
        _check_positive(self, "n_train", "n_eval")


@dataclass(frozen=True)
class DPOSettings:
    """HH task: DPO β, learning rate, epochs, batch size, max length and max prompt length (paper:
    β 0.1, length 256, prompt 128), checkpoint interval."""

    beta: float = field(default=0.1, metadata=_flat("dpo_beta"))
    lr: float = field(default=5e-5, metadata=_flat("dpo_lr"))
    epochs: int = field(default=1, metadata=_flat("dpo_epochs"))
    batch_size: int = field(default=8, metadata=_flat("dpo_batch_size"))
    max_length: int = field(default=256, metadata=_flat("dpo_max_length"))
    max_prompt_length: int = field(default=128, metadata=_flat("dpo_max_prompt_length"))
    save_every: int = field(default=25, metadata=_flat("dpo_save_every"))

    def __post_init__(self) -> None:
        _check_positive(self, "beta", "lr", "epochs", "batch_size", "max_length", "max_prompt_length", "save_every")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"dpo.max_prompt_length ({self.max_prompt_length}) must be < dpo.max_length "
                f"({self.max_length}): the response needs room"
            )


@dataclass(frozen=True)
class TunedSettings:
    """A tuned model given by the researcher instead of the one the rlhf stage trains: a local HF
    directory or a hub id (None: train it here, by GRPO or DPO). It must share the base model's
    architecture, shape and tokenizer (checked before a run starts, :func:`lfp_core.tuned.check_tuned`)."""

    path: str | None = field(default=None, metadata=_flat("tuned"))

    def __post_init__(self) -> None:
        if self.path is not None and not self.path.strip():
            raise ConfigError("tuned.path (tuned) must name a local model directory or a hub id, got ''")


@dataclass(frozen=True)
class DivergenceSettings:
    """How many of the most divergent layers later stages study; the measure that picks them
    ('activation': MLP-output 1 − cos, default; 'param': the paper's, nearly flat across
    equal-shaped layers under Adam, see lfp_core.divergence); held-out sequences it uses."""

    n_layers: int = field(default=2, metadata=_flat("n_selected_layers"))
    measure: DivergenceMeasure = field(default="activation", metadata=_flat("divergence_measure"))
    sequences: int = field(default=256, metadata=_flat("divergence_sequences"))

    def __post_init__(self) -> None:
        _check_positive(self, "n_layers", "sequences")
        _check_choice(self, "measure")


@dataclass(frozen=True)
class CorpusSettings:
    """The activation corpus: held-out IMDB (test) reviews cut to their first ``doc_tokens``
    tokens (model-sampled documents when IMDB is not reachable), plus every base and tuned
    completion of the held-out prompts; every ``eval_every``-th document is held out from SAE
    training (metrics use it). ``source``: the researcher's own documents instead of the IMDB
    reviews (a JSONL file with a ``text`` field, or ``hf:NAME_OR_PATH[:SPLIT[:COLUMN]]``; see
    :mod:`lfp_core.texts`), also the source of the ablation prefixes."""

    docs: int = field(default=3000, metadata=_flat("sae_corpus_docs"))
    doc_tokens: int = field(default=128, metadata=_flat("sae_doc_tokens"))
    eval_every: int = field(default=10, metadata=_flat("sae_eval_every"))
    source: str | None = field(default=None, metadata=_flat("corpus_source"))

    def __post_init__(self) -> None:
        _check_positive(self, "docs", "doc_tokens", "eval_every")
        if self.source is not None and not self.source.strip():
            raise ConfigError("corpus.source (corpus_source) must name a JSONL file or hf:DATASET, got ''")


@dataclass(frozen=True)
class SAESettings:
    """The main SAE of each (model, selected layer), and the preference model's SAEs: architecture,
    dictionary size as a multiple of d_model, TopK k, L1 coefficient (relu/tied), learning rate,
    batch size, training tokens (one pass). Batches of 1,024 at lr 6e-3 train a demo TopK SAE in
    half the CPU time of 256 at 3e-3, FVU 0.140 vs 0.136 (bench/RESULTS.md)."""

    arch: SAEArch = field(default="topk", metadata=_flat("sae_arch"))
    expansion: int = field(default=2, metadata=_flat("sae_expansion"))
    k: int = field(default=32, metadata=_flat("sae_k"))
    l1: float = field(default=1.0, metadata=_flat("sae_l1"))
    lr: float = field(default=6e-3, metadata=_flat("sae_lr"))
    batch_size: int = field(default=1024, metadata=_flat("sae_batch_size"))
    train_tokens: int = field(default=300_000, metadata=_flat("sae_train_tokens"))

    def __post_init__(self) -> None:
        _check_choice(self, "arch")
        _check_positive(self, "expansion", "k", "l1", "lr", "batch_size", "train_tokens")


@dataclass(frozen=True)
class SAEVariant:
    """An extra SAE of the tuned model per selected layer: architecture and expansion (``relu-2x``)."""

    arch: SAEArch
    expansion: int

    def __post_init__(self) -> None:
        if self.arch not in get_args(SAEArch) or self.expansion < 1:
            raise ConfigError(
                f"SAE variant {self.arch}-{self.expansion}x: expected ARCH-Nx with ARCH topk, relu or "
                "tied and N >= 1, e.g. relu-2x"
            )

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.expansion}x"

    @classmethod
    def parse(cls, text: str) -> SAEVariant:
        arch, _, mult = text.strip().partition("-")
        if not mult.endswith("x") or not mult[:-1].isdigit() or arch not in get_args(SAEArch):
            raise ConfigError(
                f"sae_variants item {text!r}: expected ARCH-Nx with ARCH topk, relu or tied, e.g. relu-2x"
            )
        return cls(arch, int(mult[:-1]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SAESuiteSettings:
    """The SAEs trained beside the main ones, and their evaluation: the paper's variants (L1 ReLU
    at 1x and 2x, its tied-decoder SAE) for the 1x/2x MMCS; the L1 sweep (relu, 1x, tuned model,
    first selected layer); held-out documents for the next-token loss; the Mutual Feature
    Regularization group on the first selected layer (members, 0 = off; penalty; warm-up share)."""

    variants: tuple[SAEVariant, ...] = field(
        default=(SAEVariant("relu", 1), SAEVariant("relu", 2), SAEVariant("tied", 1)), metadata=_flat("sae_variants")
    )
    sweep_l1: tuple[float, ...] = field(default=(0.25, 0.5, 1.0, 2.0, 4.0), metadata=_flat("sae_sweep_l1"))
    ce_docs: int = field(default=128, metadata=_flat("sae_ce_docs"))
    mfr_n: int = 2
    mfr_coefficient: float = 30.0
    mfr_warmup_frac: float = 0.2

    def __post_init__(self) -> None:
        _check_positive(self, "ce_docs")
        if any(v <= 0 for v in self.sweep_l1):
            raise ConfigError(f"sae_suite.sweep_l1 (sae_sweep_l1) coefficients must be > 0, got {list(self.sweep_l1)}")
        if self.mfr_n == 1 or self.mfr_n < 0:
            raise ConfigError("sae_suite.mfr_n must be 0 (off) or >= 2 (MFR regularises SAEs towards each other)")
        _check_positive(self, "mfr_coefficient", "mfr_warmup_frac", allow_zero=True)
        if self.mfr_warmup_frac >= 1:
            raise ConfigError(f"sae_suite.mfr_warmup_frac must be < 1, got {self.mfr_warmup_frac}")


@dataclass(frozen=True)
class SAESourceSettings:
    """The SAEs' inputs: ``base`` / ``tuned`` name SAEs given for that model instead of training them here
    (a directory of sae-lens SAEs, one subdirectory per hook, or ``sae-lens:RELEASE[:SAE_ID,...]`` from
    sae-lens's pretrained registry; see :mod:`lfp_core.sae_sources`); ``hook`` is the transformer-lens hook
    point of every block that is harvested and that the SAEs read (given SAEs must read it too). None and
    ``hook_mlp_out``: SAEs trained here on MLP outputs, as before these settings existed."""

    base: str | None = field(default=None, metadata=_flat("saes_base"))
    tuned: str | None = field(default=None, metadata=_flat("saes_tuned"))
    hook: SAEHook = field(default="hook_mlp_out", metadata=_flat("sae_hook"))

    def __post_init__(self) -> None:
        _check_choice(self, "hook")
        for name in ("base", "tuned"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ConfigError(
                    f"sae_source.{name} ({flat_name(type(self), name)}) is empty: give a directory of sae-lens "
                    "SAEs or sae-lens:RELEASE, or leave it unset to train the SAEs here"
                )

    def given(self) -> dict[str, str]:
        """``{role: source}`` of the roles whose SAEs are given (tuned first)."""
        return {role: src for role, src in (("tuned", self.tuned), ("base", self.base)) if src is not None}


@dataclass(frozen=True)
class FeatureSettings:
    """Top activating contexts per feature and their ±window (tokens)."""

    top_k: int = field(default=20, metadata=_flat("feature_top_k"))
    window: int = field(default=8, metadata=_flat("feature_window"))

    def __post_init__(self) -> None:
        _check_positive(self, "top_k", "window")


@dataclass(frozen=True)
class ProbeSettings:
    """Fewest lexicon-word positions the probe stage accepts; lexicon-word occurrences swapped for
    the contrastive variant; texts per class for the HH and toxicity separation probes."""

    min_points: int = field(default=200, metadata=_flat("probe_min_points"))
    contrast_items: int = field(default=1500, metadata=_flat("probe_contrast_items"))
    texts_per_class: int = field(default=300, metadata=_flat("probe_texts_per_class"))

    def __post_init__(self) -> None:
        _check_positive(self, "min_points", "texts_per_class")
        _check_positive(self, "contrast_items", allow_zero=True)


@dataclass(frozen=True)
class LabelSettings:
    """Feature labelling: ``offline`` (deterministic, no network; named as such everywhere) or
    ``openai`` (any OpenAI-compatible endpoint; the key from $OPENAI_API_KEY); the probe's top
    features labelled plus as many drawn at random (for the overlap test); the token budget of an
    LLM run (estimated before it starts); held-out excerpts per feature for detection scoring."""

    labeller: Labeller = "offline"
    llm_model: str = "gpt-4o"
    llm_base_url: str | None = None
    probe_top: int = field(default=24, metadata=_flat("label_probe_top"))
    random: int = field(default=24, metadata=_flat("label_random"))
    max_tokens: int = field(default=400_000, metadata=_flat("label_max_tokens"))
    detection_n: int = field(default=5, metadata=_flat("label_detection_n"))

    def __post_init__(self) -> None:
        _check_choice(self, "labeller")
        _check_positive(self, "max_tokens", "detection_n")
        _check_positive(self, "probe_top", "random", allow_zero=True)


ABLATION_MIN_RANDOM = 20  # the rank test's smallest p is 1/(N + 1); 1/21 is the first below 0.05


@dataclass(frozen=True)
class AblationSettings:
    """Completions sampled per tested feature set from held-out IMDB prefixes of ``prefix_tokens``
    tokens (paper: 1,000); size of the probe-top set; random control sets per tested set (matched in
    size per layer and in activation mass; >= 20, so the rank test can reach p < 0.05); ``rank_n``: the
    first prefixes on which every set, tested or random, is sampled and compared (the random sets are
    sampled on these only; at most ``n``)."""

    n: int = field(default=1000, metadata=_flat("ablation_n"))
    prefix_tokens: int = field(default=30, metadata=_flat("ablation_prefix_tokens"))
    k: int = field(default=16, metadata=_flat("ablation_k"))
    random: int = field(default=ABLATION_MIN_RANDOM, metadata=_flat("ablation_random"))
    rank_n: int = field(default=256, metadata=_flat("ablation_rank_n"))

    def __post_init__(self) -> None:
        _check_positive(self, "n", "prefix_tokens", "k", "rank_n")
        if self.random < ABLATION_MIN_RANDOM:
            raise ConfigError(
                f"ablation.random (ablation_random) must be >= {ABLATION_MIN_RANDOM}, got {self.random}: the "
                f"ablation test ranks a tested set among its N random control sets, so with N sets the smallest "
                f"attainable p is 1/(N+1) ({1 / (self.random + 1):.3g} for N={self.random}), and N >= "
                f"{ABLATION_MIN_RANDOM} is needed for p < 0.05"
            )


@dataclass(frozen=True)
class RMSettings:
    """The preference model: base completions sampled per RL prompt (pairs of differing reward, the
    run's reward plug-in as the oracle, become training pairs), trl RewardTrainer epochs, learning rate
    and batch size; residual-stream layers that get SAEs ("auto": the middle and the last layer)."""

    samples_per_prompt: int = field(default=4, metadata=_flat("rm_samples_per_prompt"))
    epochs: int = field(default=2, metadata=_flat("rm_epochs"))
    lr: float = field(default=1e-4, metadata=_flat("rm_lr"))
    batch_size: int = field(default=16, metadata=_flat("rm_batch_size"))
    layers: Literal["auto"] | tuple[int, ...] = field(default="auto", metadata=_flat("rm_layers"))

    def __post_init__(self) -> None:
        _check_positive(self, "samples_per_prompt", "epochs", "lr", "batch_size")
        if self.samples_per_prompt < 2:
            raise ConfigError(
                "rm.samples_per_prompt (rm_samples_per_prompt) must be >= 2: pairs are made of "
                "completions of one prompt"
            )
        if self.layers != "auto" and (not isinstance(self.layers, tuple) or any(x < 0 for x in self.layers)):
            raise ConfigError(f"rm.layers (rm_layers) must be 'auto' or layer numbers >= 0, got {self.layers!r}")

    def layer_list(self, n_layers: int) -> list[int]:
        """The layers resolved for a model of ``n_layers`` layers."""
        if self.layers == "auto":
            return sorted({n_layers // 2, n_layers - 1})
        return sorted(set(self.layers))


@dataclass(frozen=True)
class AtPSettings:
    """Single-feature attribution (lfp_core/attribution.py): midpoint steps of the path estimate
    (integrated gradients along one feature's axis), held-out pairs with the largest oracle reward gaps
    to attribute over, the top features by AtP and a uniform sample of ``random_k`` features per layer
    verified by true ablation. Verifying a (text, feature) where the feature fires costs one forward pass
    (the truth) and ``steps`` forward and backward passes (the path estimate). Measured on a demo run with
    these defaults (128 texts, 20 top + 2 × 64 random features, preference model and policy): 2 midpoints had
    a median relative error of 0.01–0.15% against the truth, AtP 4–12%; verifying took 60–75 s per target on
    a CPU."""

    steps: int = field(default=2, metadata=_flat("atp_steps"))
    pairs: int = field(default=64, metadata=_flat("atp_pairs"))
    top_k: int = field(default=20, metadata=_flat("atp_top_k"))
    random_k: int = field(default=64, metadata=_flat("atp_random_k"))

    def __post_init__(self) -> None:
        _check_positive(self, "steps", "pairs", "top_k")
        _check_positive(self, "random_k", allow_zero=True)


NullRecipe = Literal["auto", "shuffled", "constant", "none"]
CrosscoderArch = Literal["batchtopk", "l1"]
DIFF_MIN_RANDOM = 19  # the diffing causal checks' rank p among N matched random sets: 1/(N+1) = 0.05 at 19


@dataclass(frozen=True)
class DiffingSettings:
    """Model diffing (lfp_core/crosscoder.py, latent_scaling.py, localise.py, difflens.py).

    ``null``: the null fine-tune control — the rlhf stage's recipe (same GRPO settings, steps, prompts and
    seed) with the reward replaced by the same rewards shuffled across each step's completions
    ('shuffled', the default under 'auto': the reward's distribution kept, its link to the text broken) or by
    a constant ('constant': every GRPO advantage is 0, so only the KL term moves the policy — which starts at
    zero gradient — and the null is nearly the base model); 'none' skips it. 'auto' is 'shuffled' when this
    run trains the tuned model and 'none' when the tuned model is given (its recipe is unknown: pass
    ``null_path``, a model fine-tuned by the same recipe with an uninformative reward). ``null_path``: such a
    given null model.

    ``layers``: where crosscoders and difference SAEs are trained ('auto': every harvested layer; else a subset
    of them — a layer needs the paired harvest of both models).

    Crosscoder (BatchTopK by default; 'l1' is Lindsey et al.'s ReLU + decoder-norm-weighted L1): dictionary
    ``expansion`` × d_model (2, the run's SAEs' size: a crosscoder reads two models' activations into one
    dictionary of the size each SAE has), ``k`` active latents per token on average, Adam ``lr``, ``batch_size`` tokens a
    step, ``train_tokens`` tokens in all (the same budget trains the difference SAE, a sae-lens TopK SAE on
    tuned − base). Classes: relative decoder norm r = ‖d_tuned‖/(‖d_base‖+‖d_tuned‖) > ``tuned_only`` is
    tuned-only, < 1 − ``tuned_only`` base-only, else shared; a tuned-only latent whose latent-scaling ratios
    ν^ε and ν^r are both below ``nu_max`` is robust tuned-only (the base model's activations explain little of
    it either through its error or its reconstruction; 0.3 is this tool's choice: Minder, Dumas et al. rank
    latents by ν rather than cut at a published value).

    Localisation and lens: ``prefixes`` held-out prompts sampled (coupled, one seed each) by the tuned policy
    with each component's output patched from the base model, and by the base model steered with the mean
    activation difference over the first ``lens_tokens`` tokens of ``lens_docs`` held-out documents (×
    ``steer_alpha``). Causal checks: up to ``causal_top`` latents per tested set, against ``random`` matched
    random sets (>= 19 so the rank p can reach 0.05).
    """

    null: NullRecipe = field(default="auto", metadata=_flat("diff_null"))
    null_path: str | None = field(default=None, metadata=_flat("diff_null_path"))
    layers: Literal["auto"] | tuple[int, ...] = field(default="auto", metadata=_flat("cc_layers"))
    arch: CrosscoderArch = field(default="batchtopk", metadata=_flat("cc_arch"))
    expansion: int = field(default=2, metadata=_flat("cc_expansion"))
    k: int = field(default=32, metadata=_flat("cc_k"))
    l1: float = field(default=1.0, metadata=_flat("cc_l1"))
    lr: float = field(default=1e-3, metadata=_flat("cc_lr"))
    batch_size: int = field(default=1024, metadata=_flat("cc_batch_size"))
    train_tokens: int = field(default=300_000, metadata=_flat("cc_train_tokens"))
    tuned_only: float = field(default=0.9, metadata=_flat("cc_tuned_only"))
    nu_max: float = field(default=0.3, metadata=_flat("cc_nu_max"))
    prefixes: int = field(default=128, metadata=_flat("diff_prefixes"))
    lens_docs: int = field(default=256, metadata=_flat("lens_docs"))
    lens_tokens: int = field(default=5, metadata=_flat("lens_tokens"))
    steer_alpha: float = field(default=1.0, metadata=_flat("steer_alpha"))
    causal_top: int = field(default=8, metadata=_flat("diff_causal_top"))
    random: int = field(default=DIFF_MIN_RANDOM, metadata=_flat("diff_random"))

    def __post_init__(self) -> None:
        _check_choice(self, "null")
        _check_choice(self, "arch")
        _check_positive(self, "expansion", "k", "lr", "batch_size", "train_tokens", "prefixes", "lens_docs")
        _check_positive(self, "lens_tokens", "causal_top", "steer_alpha")
        _check_positive(self, "l1", allow_zero=True)
        if not 0.5 < self.tuned_only < 1.0:
            raise ConfigError(f"diffing.tuned_only (cc_tuned_only) must be in (0.5, 1), got {self.tuned_only}")
        if not 0.0 < self.nu_max < 1.0:
            raise ConfigError(f"diffing.nu_max (cc_nu_max) must be in (0, 1), got {self.nu_max}")
        if self.random < DIFF_MIN_RANDOM:
            raise ConfigError(
                f"diffing.random (diff_random) must be >= {DIFF_MIN_RANDOM}, got {self.random}: a tested set is "
                f"ranked among N matched random sets, whose smallest attainable p is 1/(N+1)"
            )
        if self.layers != "auto" and (
            not isinstance(self.layers, tuple) or not self.layers or any(x < 0 for x in self.layers)
        ):
            raise ConfigError(f"diffing.layers (cc_layers) must be 'auto' or layer numbers >= 0, got {self.layers!r}")
        if self.null_path is not None and not self.null_path.strip():
            raise ConfigError("diffing.null_path (diff_null_path) must name a model directory or hub id, got ''")
        if self.null_path is not None and self.null in ("none", "constant"):
            raise ConfigError(
                f"diffing.null_path is given but diffing.null is {self.null!r}: a given null model is used with "
                "diffing.null 'auto' or 'shuffled'"
            )

    def recipe(self, tuned_given: bool) -> str:
        """What the null stage does: 'shuffled' or 'constant' (train it), 'given' (``null_path``) or 'none'."""
        if self.null_path is not None:
            return "given"
        if self.null == "auto":
            return "none" if tuned_given else "shuffled"
        return self.null


# --- the run config -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on: one settings group per concern, plus the preset's name (which
    no stage reads)."""

    run: RunSettings = field(default_factory=RunSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    completions: CompletionSettings = field(default_factory=CompletionSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    rl: RLSettings = field(default_factory=RLSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    tuned: TunedSettings = field(default_factory=TunedSettings)
    divergence: DivergenceSettings = field(default_factory=DivergenceSettings)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    sae: SAESettings = field(default_factory=SAESettings)
    sae_suite: SAESuiteSettings = field(default_factory=SAESuiteSettings)
    sae_source: SAESourceSettings = field(default_factory=SAESourceSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)
    ablation: AblationSettings = field(default_factory=AblationSettings)
    rm: RMSettings = field(default_factory=RMSettings)
    atp: AtPSettings = field(default_factory=AtPSettings)
    diffing: DiffingSettings = field(default_factory=DiffingSettings)
    preset: str = "custom"

    # -- (de)serialisation
    def to_dict(self) -> dict:
        return {"layout": LAYOUT, **_to_plain(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """A stored config: layout 2 (nested groups) or layout 1 (flat names, read via the aliases;
        unknown flat names of layout 1, e.g. ``extra``, are dropped)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config must be a JSON object, got {type(raw).__name__}")
        if "run" in raw and isinstance(raw["run"], dict):
            body = {k: v for k, v in raw.items() if k != "layout"}
            return _from_plain(cls, body, "config")
        flat = {k: v for k, v in raw.items() if k in FLAT_FIELDS or k == "preset"}
        return cls().with_values(flat, coerce=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    @staticmethod
    def layout_of(raw: dict) -> int:
        """The settings layout of a stored config (1: flat names, before the groups)."""
        return int(raw.get("layout", 1)) if isinstance(raw, dict) else 1

    # -- overrides
    def with_values(self, values: dict[str, Any], coerce: bool = False) -> RunConfig:
        """A copy with ``values`` applied; keys are dotted (``rl.steps``) or flat (``rl_steps``)
        names. With ``coerce`` values are parsed like ``--set`` strings (JSON values are accepted
        as they are when they already have the field's type).

        Raises:
            ConfigError: an unknown name or a value of the wrong type, naming the field.
        """
        groups: dict[str, dict[str, Any]] = {}
        preset = self.preset
        for key, value in values.items():
            if key == "preset":
                preset = str(value)
                continue
            group, name = resolve_name(key)
            hint = _FIELD_HINTS[group][name]
            if coerce or isinstance(value, str):
                value = _coerce(value, hint, f"{group}.{name}")
            groups.setdefault(group, {})[name] = value
        out: dict[str, Any] = {"preset": preset}
        for f in dataclasses.fields(self):
            if f.name == "preset":
                continue
            current = getattr(self, f.name)
            out[f.name] = dataclasses.replace(current, **groups[f.name]) if f.name in groups else current
        return RunConfig(**out)

    def flat(self) -> dict[str, Any]:
        """Every field under its flat alias (for display and for the sweep's overrides)."""
        out: dict[str, Any] = {}
        for group, cls in GROUPS.items():
            obj = getattr(self, group)
            for f in dataclasses.fields(cls):
                out[f.metadata.get("flat", f.name)] = getattr(obj, f.name)
        return out

    def stage_settings(self, cls: type[S]) -> S:
        """The settings object of a stage: exactly the groups its class declares."""
        names = [f.name for f in dataclasses.fields(cast(Any, cls))]
        return cls(**{name: getattr(self, name) for name in names})


_GROUP_HINTS = get_type_hints(RunConfig)
GROUPS: dict[str, type] = {f.name: _GROUP_HINTS[f.name] for f in dataclasses.fields(RunConfig) if f.name != "preset"}
_GROUP_OF_CLASS = {cls.__name__: name for name, cls in GROUPS.items()}
_FIELD_HINTS: dict[str, dict[str, Any]] = {g: get_type_hints(cls) for g, cls in GROUPS.items()}

# flat alias -> (group, field)
FLAT_FIELDS: dict[str, tuple[str, str]] = {}
for _g, _cls in GROUPS.items():
    for _f in dataclasses.fields(_cls):
        _alias = _f.metadata.get("flat", _f.name)
        if _alias in FLAT_FIELDS:
            raise RuntimeError(f"flat alias {_alias!r} is used twice")
        FLAT_FIELDS[_alias] = (_g, _f.name)


def flat_name(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flat", f.name)
    return name


def resolve_name(key: str) -> tuple[str, str]:
    """``rl.steps`` or ``rl_steps`` (or ``rl-steps``) -> ("rl", "steps")."""
    k = key.strip().replace("-", "_")
    if "." in k:
        group, _, name = k.partition(".")
        if group in _FIELD_HINTS and name in _FIELD_HINTS[group]:
            return group, name
    elif k in FLAT_FIELDS:
        return FLAT_FIELDS[k]
    raise ConfigError(
        f"unknown setting {key!r}; settings are GROUP.FIELD or the flat names: {', '.join(sorted(FLAT_FIELDS))}"
    )


def describe_type(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(hint))
    if origin is tuple:
        return f"a comma-separated list of {describe_type(get_args(hint)[0])}"
    if hint is type(None):
        return "none"
    if dataclasses.is_dataclass(hint):
        return "ARCH-Nx (e.g. relu-2x)" if hint is SAEVariant else getattr(hint, "__name__", str(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, label: str) -> Any:
    """``value`` (a ``--set`` string or a JSON value) as type ``hint``; ConfigError otherwise."""
    origin = get_origin(hint)
    try:
        if origin is Literal:
            for choice in get_args(hint):
                if value == choice or (isinstance(value, str) and str(choice) == value.strip()):
                    return choice
            raise ValueError
        if origin in (Union, types.UnionType):
            args = get_args(hint)
            if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
                return None
            errors = []
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return _coerce(value, arg, label)
                except ConfigError as exc:
                    errors.append(exc)
            raise ValueError
        if origin is tuple:
            (item,) = get_args(hint)[:1]
            if isinstance(value, str):
                parts = [p for p in (x.strip() for x in value.split(",")) if p]
            elif isinstance(value, (list, tuple)):
                parts = list(value)
            else:
                raise ValueError
            return tuple(_coerce(p, item, label) for p in parts)
        if hint is SAEVariant:
            if isinstance(value, SAEVariant):
                return value
            if isinstance(value, str):
                return SAEVariant.parse(value)
            if isinstance(value, dict):
                return SAEVariant(**value)
            if isinstance(value, (list, tuple)) and len(value) == 2:
                return SAEVariant(*value)
            raise ValueError
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in ("1", "true", "yes"):
                return True
            if str(value).strip().lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).strip().replace("_", ""))
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value) if isinstance(value, (int, float)) else float(str(value).strip())
        if hint is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except ConfigError as exc:
        raise exc if str(exc).startswith(label) else ConfigError(f"{label}: {exc}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{label} needs {describe_type(hint)}, got {value!r}") from None
    raise ConfigError(f"{label}: unsupported setting type {hint!r}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(x) for x in obj]
    return obj


def _from_plain(cls: type, raw: dict, label: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{label}: unknown setting(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict) and hint is not SAEVariant:
            kwargs[name] = _from_plain(cast(type, hint), value, f"{label}.{name}" if label != "config" else name)
        else:
            kwargs[name] = _coerce(value, hint, f"{label}.{name}" if label != "config" else name)
    return cls(**kwargs)


# --- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # quick: a smoke run of every stage, for tests and first contact (271 s on 2 cores: python -m bench stages --preset quick).
    "quick": {
        "n_prompts": 64,
        "n_eval_prompts": 64,
        "samples_per_prompt": 1,
        "gen_batch_size": 32,
        "rl_steps": 60,
        "n_pairs": 128,
        "n_eval_pairs": 64,
        "dpo_max_length": 128,
        "dpo_max_prompt_length": 64,
        "sae_corpus_docs": 300,
        "sae_train_tokens": 30_000,
        "sae_batch_size": 256,
        "sae_lr": 3e-3,
        "sae_sweep_l1": (0.5, 2.0),
        "sae_ce_docs": 32,
        "label_probe_top": 8,
        "label_random": 8,
        "ablation_n": 64,
        "ablation_k": 8,
        "rm_samples_per_prompt": 4,
        "atp_pairs": 16,
        "atp_top_k": 10,
        "atp_random_k": 16,
        "cc_train_tokens": 30_000,
        "cc_batch_size": 256,
        "diff_prefixes": 16,
        "lens_docs": 32,
        "diff_causal_top": 2,
    },
    # demo: the embedded demo run the quick start serves.
    "demo": {"n_prompts": 512, "n_eval_prompts": 512, "samples_per_prompt": 2, "gen_batch_size": 64, "ablation_n": 512},
    # paper: the paper's scale (1,000 completions per evaluation); meant for a GPU.
    "paper": {"n_prompts": 1000, "n_eval_prompts": 1000, "samples_per_prompt": 1, "gen_batch_size": 128},
}


def preset_config(name: str, **overrides: Any) -> RunConfig:
    """The config of a named preset with explicit overrides (flat or dotted names given as keyword
    names with ``__`` for the dot, e.g. ``rl__steps=300``; None values ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {k.replace("__", "."): v for k, v in {**PRESETS[name], **given}.items()}
    return RunConfig(preset=name).with_values(values, coerce=True)


# --- stage settings -----------------------------------------------------------------------------
S = TypeVar("S")


@dataclass(frozen=True)
class ModelStageSettings:
    run: RunSettings


@dataclass(frozen=True)
class PromptsStageSettings:
    run: RunSettings
    prompts: PromptSettings
    generation: GenerationSettings


@dataclass(frozen=True)
class SamplesStageSettings:
    """Base and tuned evaluations on the held-out prompts."""

    run: RunSettings
    reward: RewardSettings
    completions: CompletionSettings
    evaluation: EvaluationSettings
    generation: GenerationSettings


@dataclass(frozen=True)
class PairsStageSettings:
    run: RunSettings
    pairs: PairSettings


@dataclass(frozen=True)
class RLStageSettings:
    run: RunSettings
    reward: RewardSettings
    rl: RLSettings
    completions: CompletionSettings
    tuned: TunedSettings


@dataclass(frozen=True)
class DPOStageSettings:
    run: RunSettings
    dpo: DPOSettings
    tuned: TunedSettings


@dataclass(frozen=True)
class DivergenceStageSettings:
    run: RunSettings
    divergence: DivergenceSettings


@dataclass(frozen=True)
class ActivationsStageSettings:
    """The harvest: which hook (``sae_source.hook``) and, with given SAEs, which layers (theirs)."""

    run: RunSettings
    corpus: CorpusSettings
    generation: GenerationSettings
    sae_source: SAESourceSettings


@dataclass(frozen=True)
class SAEStageSettings:
    """Training (``sae``, ``sae_suite``) or loading (``sae_source``) the SAEs."""

    run: RunSettings
    sae: SAESettings
    sae_suite: SAESuiteSettings
    sae_source: SAESourceSettings


@dataclass(frozen=True)
class FeaturesStageSettings:
    run: RunSettings
    features: FeatureSettings


@dataclass(frozen=True)
class ProbesStageSettings:
    run: RunSettings
    reward: RewardSettings
    probes: ProbeSettings


@dataclass(frozen=True)
class LabelsStageSettings:
    run: RunSettings
    reward: RewardSettings
    labels: LabelSettings
    features: FeatureSettings


@dataclass(frozen=True)
class AblationStageSettings:
    run: RunSettings
    reward: RewardSettings
    ablation: AblationSettings
    completions: CompletionSettings
    generation: GenerationSettings
    corpus: CorpusSettings  # its ``source``: the ablation prefixes come from the researcher's corpus


@dataclass(frozen=True)
class RewardModelStageSettings:
    run: RunSettings
    reward: RewardSettings
    rm: RMSettings
    sae: SAESettings
    completions: CompletionSettings
    generation: GenerationSettings


@dataclass(frozen=True)
class AttributionStageSettings:
    run: RunSettings
    reward: RewardSettings
    atp: AtPSettings


@dataclass(frozen=True)
class NullStageSettings:
    """The null fine-tune: the rlhf stage's recipe with an uninformative reward (``diffing.null``)."""

    run: RunSettings
    reward: RewardSettings
    rl: RLSettings
    completions: CompletionSettings
    tuned: TunedSettings
    diffing: DiffingSettings


@dataclass(frozen=True)
class DiffingStageSettings:
    """Crosscoders, latent scaling, difference SAEs, localisation by patching, the difference lens and the
    causal checks (each stage reads all of ``diffing``; its sizes are shared)."""

    run: RunSettings
    reward: RewardSettings
    diffing: DiffingSettings
    completions: CompletionSettings
    generation: GenerationSettings
    features: FeatureSettings


def reward_settings_of(raw: dict | None) -> RewardSettings:
    """The reward of a stored config (layout 2 ``reward`` group, or the flat ``reward`` of layout 1); VADER
    for a config that predates the plug-ins. For pages and the report."""
    raw = raw if isinstance(raw, dict) else {}
    part = raw.get("reward")
    spec = part.get("spec") if isinstance(part, dict) else part
    return RewardSettings(spec) if isinstance(spec, str) else RewardSettings()


def run_settings_of(raw: dict | None) -> RunSettings:
    """The run-wide settings (model, task, …) of a stored config of either layout; the defaults for
    what it does not say. For pages and the report, which need only these."""
    raw = raw if isinstance(raw, dict) else {}
    part = raw["run"] if isinstance(raw.get("run"), dict) else raw
    names = {f.name for f in dataclasses.fields(RunSettings)}
    return _from_plain(RunSettings, {k: v for k, v in part.items() if k in names}, "run")


# Groups added to stages after runs were stored: hashed only when set to something other than their
# defaults, so a run stored before a group existed (whose settings are its defaults) keeps its stage hashes
# and is not recomputed for a setting it never had.
HASHED_WHEN_SET: dict[str, type] = {
    "sae_source": SAESourceSettings,
    "reward": RewardSettings,
    "tuned": TunedSettings,
}
# the same for single fields added to an existing group: left out of the hash while at their default
FIELDS_HASHED_WHEN_SET: dict[tuple[str, str], Any] = {("prompts", "source"): None, ("corpus", "source"): None}


def settings_hash(settings: Any, upstream: tuple[str, ...] = ()) -> str:
    """Hash of a stage's settings object plus the hashes of the stages it builds on (a group of
    :data:`HASHED_WHEN_SET` at its defaults is left out)."""
    plain = _to_plain(settings)
    if isinstance(plain, dict):
        for name, cls in HASHED_WHEN_SET.items():
            if getattr(settings, name, None) == cls():
                plain.pop(name, None)
        for (group, fname), default in FIELDS_HASHED_WHEN_SET.items():
            if isinstance(plain.get(group), dict) and plain[group].get(fname, default) == default:
                plain[group].pop(fname, None)
    payload = json.dumps({"settings": plain, "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def groups_of(stage_settings_cls: type) -> tuple[str, ...]:
    """The RunConfig groups a stage settings class holds."""
    return tuple(f.name for f in dataclasses.fields(stage_settings_cls))
