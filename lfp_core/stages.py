"""The stage registry: every precompute stage, in order, declared once.

Light on purpose: it imports no torch, sae-lens or trl, so the dashboard's Overview and the report
can list stages and describe them. The function that runs a stage is named as
``"module:function"`` and imported only when the precompute runs it (:meth:`StageSpec.load`).

A stage's settings are a frozen dataclass from :mod:`lfp_core.settings` holding exactly the
settings groups it reads; the precompute builds that object from the run config, hands it to the
stage, and hashes it (with the upstream stages' hashes, the stage's version and, for the model
stage, the model files' fingerprint). A stage cannot read a setting outside its hash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lfp_core import settings as st
from lfp_core.store.schema import In, Not, Where


@dataclass(frozen=True)
class StageSpec:
    """A precompute stage.

    Attributes:
        name: stage id (also shown in the dashboard and reports).
        settings: the stage's settings class (:mod:`lfp_core.settings`); the stage receives an
            instance and is hashed on it.
        after: stages whose outputs it reads.
        run: ``"module:function"``; the function is ``run(ctx, settings, config_hash) -> None``
            and must end with ``ctx.commit``.
        clears: rows the stage owns, ``{table: Where(...)}``, deleted before a recompute.
        chunked: whether the stage commits chunk by chunk and resumes from the last chunk.
        fingerprint: optional ``"module:function"`` of the stage's settings giving an extra input
            to the hash (e.g. the model files' identity, the given SAE files'); None adds nothing.
        describe: one line shown for a stage that has not run yet.
        tasks: the tasks the stage belongs to (a stage may exist per task under one name).
        version: bumped when the stage's computation changes, so stored results of an older
            version are recomputed rather than reused.
    """

    name: str
    settings: type
    after: tuple[str, ...]
    run: str
    clears: dict[str, Where] = field(default_factory=dict)
    chunked: bool = False
    fingerprint: str | tuple[str, ...] | None = None
    describe: str = ""
    tasks: tuple[str, ...] = ("vader", "hh")
    version: int = 1

    def load(self) -> Callable[..., None]:
        """The stage's function (imports its module: torch and friends)."""
        return _resolve(self.run)

    def fingerprint_of(self, settings: Any) -> str | None:
        """The extra hash input, or None (no fingerprint function, or none has anything to add: e.g. the
        VADER reward and no given tuned model, so a default run's hash is what it was). Several functions'
        inputs are joined in order."""
        refs = (self.fingerprint,) if isinstance(self.fingerprint, str) else tuple(self.fingerprint or ())
        parts = [fp for fp in (_resolve(r)(settings) for r in refs) if fp is not None]
        if not parts:
            return None
        return str(parts[0]) if len(parts) == 1 else "+".join(map(str, parts))

    @property
    def groups(self) -> tuple[str, ...]:
        """The RunConfig settings groups the stage reads."""
        return st.groups_of(self.settings)


def _resolve(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_P = "lfp_core.pipeline."
_REWARD_FP = "lfp_core.rewards:reward_fingerprint"  # the reward plug-in's files
_GIVEN_SAES = "lfp_core.sae_sources:fingerprint"  # given SAE files: their configs and sizes
_ALL = Where()
DIFF_ROLES = ("cc_tuned", "cc_null", "dsae_tuned", "dsae_null")  # the features rows of the diffing dictionaries

STAGES: list[StageSpec] = [
    StageSpec(
        "model",
        st.ModelStageSettings,
        (),
        _P + "base:stage_model",
        {"models": Where(role="base")},
        fingerprint=_P + "base:model_fingerprint",
        describe="load the base model (HF + transformer-lens)",
    ),
    StageSpec(
        "prompts",
        st.PromptsStageSettings,
        ("model",),
        _P + "base:stage_prompts",
        {"prompts": _ALL},
        tasks=("vader",),
        fingerprint="lfp_core.texts:prompts_fingerprint",
        describe="build the RL and held-out prompt sets (IMDB train / test prefixes, or the given prompts)",
    ),
    StageSpec(
        "base_samples",
        st.SamplesStageSettings,
        ("prompts",),
        _P + "base:stage_base_samples",
        {"completions": Where(role="base")},
        chunked=True,
        tasks=("vader",),
        describe="sample base-model completions of held-out prompts, score them with the run's reward (VADER by "
        "default)",
        fingerprint=_REWARD_FP,
    ),
    StageSpec(
        "pairs",
        st.PairsStageSettings,
        ("model",),
        _P + "base:stage_pairs",
        {"pairs": _ALL},
        tasks=("hh",),
        describe="load HH-RLHF preference pairs; split into DPO training and held-out pairs",
    ),
    StageSpec(
        "rlhf",
        st.RLStageSettings,
        ("prompts",),
        _P + "rl:stage_rlhf",
        {"rl_steps": _ALL, "rl_samples": _ALL, "models": Where(role="tuned")},
        tasks=("vader",),
        fingerprint=(_REWARD_FP, "lfp_core.tuned:tuned_fingerprint"),
        describe="fine-tune the policy with GRPO against the run's reward (VADER by default; KL to the base model), "
        "or take the given tuned model",
    ),
    StageSpec(
        "rl_eval",
        st.SamplesStageSettings,
        ("rlhf", "base_samples"),
        _P + "rl:stage_rl_eval",
        {"completions": Where(role="tuned"), "word_shifts": _ALL},
        chunked=True,
        tasks=("vader",),
        version=3,  # 2: word shifts also list the top lexicon words; 3: gain CI bootstrapped over prompts
        describe="sample the tuned policy on the held-out prompts; reward gain, KL, distinct-2, word shifts",
        fingerprint=_REWARD_FP,
    ),
    StageSpec(
        "rlhf",
        st.DPOStageSettings,
        ("pairs",),
        _P + "rl:stage_dpo",
        {"rl_steps": _ALL, "rl_samples": _ALL, "models": Where(role="tuned")},
        tasks=("hh",),
        fingerprint="lfp_core.tuned:tuned_fingerprint",
        describe="fine-tune the policy with DPO on HH-RLHF chosen/rejected pairs, or take the given tuned model",
    ),
    StageSpec(
        "rl_eval",
        st.DPOStageSettings,
        ("rlhf",),
        _P + "rl:stage_dpo_eval",
        {},
        tasks=("hh",),
        describe="DPO implicit-reward margin and accuracy on held-out and training pairs",
    ),
    StageSpec(
        "divergence",
        st.DivergenceStageSettings,
        ("rlhf", "base_samples"),
        _P + "rl:stage_divergence",
        {"layer_divergence": _ALL},
        tasks=("vader",),
        describe="per-layer parameter and activation divergence; choose the layers to study",
    ),
    StageSpec(
        "divergence",
        st.DivergenceStageSettings,
        ("rlhf", "pairs"),
        _P + "rl:stage_divergence",
        {"layer_divergence": _ALL},
        tasks=("hh",),
        describe="per-layer parameter and activation divergence; choose the layers to study",
    ),
    StageSpec(
        "activations",
        st.ActivationsStageSettings,
        ("divergence", "rl_eval"),
        _P + "harvest:stage_activations",
        {"act_docs": _ALL, "vocab": _ALL},
        fingerprint=(_GIVEN_SAES, "lfp_core.texts:corpus_fingerprint"),
        tasks=("vader",),
        version=2,
        describe="harvest MLP outputs (or the hook --hook names) of the tuned and base models at the selected "
        "layers, or at the given SAEs' layers (held-out IMDB text or the given corpus, and completions)",
    ),
    StageSpec(
        "saes",
        st.SAEStageSettings,
        ("activations",),
        _P + "saes:stage_saes",
        {"saes": Where(kind=Not("rm")), "sae_pairs": _ALL},
        chunked=True,
        fingerprint=_GIVEN_SAES,
        tasks=("vader",),
        version=2,
        describe="train SAEs with sae-lens (main and an other-seed reference, paper variants, L1 sweep, MFR), each "
        "from its own seed, or load the given ones; FVU, L0, dead, loss recovered, MMCS",
    ),
    StageSpec(
        "features",
        st.FeaturesStageSettings,
        ("saes",),
        _P + "saes:stage_features",
        {"features": _ALL, "feature_examples": _ALL},
        chunked=True,
        tasks=("vader",),
        version=2,
        describe="per-feature density, histograms, top and interval examples, logit effects, neighbours",
    ),
    StageSpec(
        "probes",
        st.ProbesStageSettings,
        ("saes",),
        _P + "probes:stage_probes",
        {t: _ALL for t in ("probe_words", "probe_tokens", "probe_features", "probe_pca", "probe_sequences")},
        tasks=("vader",),
        version=4,  # 4: word split by stem, penalty by CV grouped by stem, baselines, tuned − base τ CI,
        # the contrastive variant as a fitted probe
        describe="ridge probes from SAE features to VADER valence (two splits, controls, baselines), IRM, "
        "attributions; a sequence probe from pooled SAE features to each completion's reward (any reward; held "
        "out by prompt); IMDB logistic probe and PCA",
        fingerprint=_REWARD_FP,
    ),
    StageSpec(
        "labels",
        st.LabelsStageSettings,
        ("probes", "features"),
        _P + "labels:stage_labels",
        {"feature_labels": _ALL},
        chunked=True,
        tasks=("vader",),
        version=2,  # 2: relevance and detection scored on held-out documents (not the explain set's, not the probe's)
        describe="feature explanations, reward relevance and detection scores (LLM or the offline "
        "labeller); agreement with the probe",
        fingerprint=_REWARD_FP,
    ),
    StageSpec(
        "ablation",
        st.AblationStageSettings,
        ("labels",),
        _P + "ablation:stage_ablation",
        {t: _ALL for t in ("ablation_prefixes", "ablation_sets", "ablation_completions")},
        chunked=True,
        tasks=("vader",),
        fingerprint=("lfp_core.texts:corpus_fingerprint", _REWARD_FP),
        describe="zero probe-top, labelled (positive and negative valence) and matched random feature sets of "
        "the tuned policy (error term kept); reward of sampled completions before/after, rank test",
        version=2,  # 2: >= 20 mass-matched random sets on rank_n prefixes, labelled split by sign, rank p
    ),
    StageSpec(
        "reward_model",
        st.RewardModelStageSettings,
        ("activations",),
        _P + "reward_model:stage_reward_model",
        {"rm_pairs": _ALL, "saes": Where(role="rm")},
        tasks=("vader",),
        version=2,  # 2: pair-accuracy CI bootstrapped over prompts
        describe="train a preference model (trl RewardTrainer) on the oracle preferences of the run's reward "
        "(VADER by default) between base completions; SAEs on its residual stream",
        fingerprint=_REWARD_FP,
    ),
    StageSpec(
        "attribution",
        st.AttributionStageSettings,
        ("reward_model", "saes"),  # the policy's SAEs (no longer the probe: schema 5)
        _P + "reward_model:stage_attribution",
        {"attribution": _ALL, "attribution_points": _ALL},
        tasks=("vader",),
        version=3,  # 2: top tokens of the ranked features; 3: single-feature estimators (AtP, one-feature path),
        # verified on a random sample too; policy metric = expected next-token valence
        describe="single-feature attribution (AtP; integrated gradients along one feature's axis) over the "
        "preference model's and the policy's SAE features, checked by true ablation of the top features and "
        "of a random sample; features behind the preference model's disagreements with the oracle",
        fingerprint=_REWARD_FP,
    ),
    # --- model diffing: what fine-tuning changed, where, and whether a null fine-tune changes as much ------
    StageSpec(
        "null_rlhf",
        st.NullStageSettings,
        ("prompts",),
        _P + "null:stage_null",
        {},
        tasks=("vader",),
        fingerprint=(_REWARD_FP, "lfp_core.tuned:null_fingerprint"),
        describe="the null fine-tune control: the rlhf stage's GRPO recipe (same steps, prompts, seed) with each "
        "step's rewards shuffled across its completions (or a constant), or the given --null model",
    ),
    StageSpec(
        "crosscoders",
        st.DiffingStageSettings,
        ("features", "null_rlhf"),
        _P + "diffing:stage_crosscoders",
        {
            "diff_dictionaries": _ALL,
            "diff_latents": _ALL,
            "features": Where(role=In(*DIFF_ROLES)),
            "feature_examples": Where(role=In(*DIFF_ROLES)),
        },
        chunked=True,
        tasks=("vader",),
        describe="BatchTopK crosscoders over base and tuned (and base and null) activations at the studied layers: "
        "relative decoder norms, latent scaling (ν^ε, ν^r), classes; difference SAEs (sae-lens) on tuned − base",
        fingerprint=_REWARD_FP,
    ),
    StageSpec(
        "localisation",
        st.DiffingStageSettings,
        ("activations", "null_rlhf"),
        _P + "localisation:stage_localisation",
        {"diff_patching": _ALL, "diff_lens": _ALL},
        tasks=("vader",),
        describe="component patching (each attention and MLP output of the tuned policy taken from the base model "
        "while sampling: the fraction of the reward gain it carries) and the activation-difference lens with "
        "its steering check",
        fingerprint=_REWARD_FP,
        version=2,  # 2: the prefixes are the held-out prompts of the most common lengths (few sampling batches)
    ),
    StageSpec(
        "diff_causal",
        st.DiffingStageSettings,
        ("crosscoders",),
        _P + "diff_causal:stage_diff_causal",
        {"diff_causal": _ALL},
        tasks=("vader",),
        describe="causal checks: robust tuned-only crosscoder latents and top difference-SAE features ablated in "
        "the tuned model and added to the base model, against matched random latents",
        fingerprint=_REWARD_FP,
        version=2,  # 2: the localisation stage's prefixes (the most common lengths)
    ),
]


def stages_for(task: str = "vader") -> list[StageSpec]:
    """The stages of a task, in order."""
    return [s for s in STAGES if task in s.tasks]


def stage_names(task: str = "vader") -> list[str]:
    return [s.name for s in stages_for(task)]


def describe_stages(task: str = "vader") -> dict[str, str]:
    return {s.name: s.describe for s in stages_for(task)}
