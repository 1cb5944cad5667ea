"""Typed stage summaries: what each precompute stage records about its run, one class per stage.

A stage ends with ``ctx.commit(write, detail)``; ``detail`` is a dict whose keys are the fields of the
stage's summary class below. The store converts it when the stage is marked done (a key that is not a
field, at any level, is an error naming the stage and the key) and stores it as JSON in the ``stages``
table; readers get the typed record back (``StageRecord.summary``, ``RunReader.summary(ProbesSummary)``).

Records are frozen dataclasses (attributes); the small statistic bundles inside them (a Kendall τ with
its p-value, a reward mean with its standard error, ...) are ``TypedDict``s (:mod:`lfp_core.store.stats`),
so they stay plain JSON-ready dicts that the report passes through unchanged. Every field has a default: a stage may
leave a field out (e.g. the fields of the other task), and a run written before a field existed still
reads. A reader drops (and logs) keys it does not know, so an older run with a retired key still opens.

Importable without torch (the dashboard and the report use it).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints, is_typeddict

from lfp_core.store.errors import SummaryError
from lfp_core.store.stats import (  # noqa: F401  (re-exported: the summaries' field types)
    AttributionResult,
    BasisStats,
    Correlation,
    Disagreement,
    DisagreementFeature,
    EstimatorCheck,
    FrequencyRow,
    HarvestInfo,
    IrmDisagreement,
    LogisticResult,
    MfrStats,
    ModelInfo,
    Overlap,
    PairAccuracy,
    PairedDifference,
    ProbeInput,
    RewardInfo,
    RewardStats,
    RMSaeStats,
    RMTrainStep,
    SequenceProbe,
    Spearman,
    Tau,
    TauDifference,
)

log = logging.getLogger(__name__)


# --- stage summaries -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSummary:
    """Base of the stage summaries; ``STAGE`` is the stage's name. ``not_applicable``: what the stage
    skipped for this run and why (``{what: reason}``, e.g. the per-token probe under a reward that is not a
    per-word lexicon), so a page can say why a figure is absent."""

    STAGE: ClassVar[str] = ""
    not_applicable: dict[str, str] = field(default_factory=dict)


SUMMARIES: dict[str, type[StageSummary]] = {}
S = TypeVar("S", bound=StageSummary)


def _stage(name: str):
    def register(cls: type[S]) -> type[S]:
        cls.STAGE = name
        SUMMARIES[name] = cls
        return cls

    return register


@_stage("model")
@dataclass(frozen=True)
class ModelSummary(StageSummary):
    model: ModelInfo | None = None


@_stage("prompts")
@dataclass(frozen=True)
class PromptsSummary(StageSummary):
    n_train: int | None = None
    n_eval: int | None = None
    source: str | None = None  # "imdb" data folder, "model-sampled", or the given prompts' source
    n_trimmed: int | None = None  # given prompts cut to half the model's context


@_stage("pairs")
@dataclass(frozen=True)
class PairsSummary(StageSummary):
    n_train: int | None = None
    n_eval: int | None = None
    source: str | None = None


@_stage("base_samples")
@dataclass(frozen=True)
class BaseSamplesSummary(StageSummary):
    reward: RewardStats | None = None
    reward_info: RewardInfo | None = None  # the reward plug-in that scored the completions


@_stage("rlhf")
@dataclass(frozen=True)
class RLHFSummary(StageSummary):
    policy_dir: str | None = None
    steps: int | None = None
    given: str | None = None  # the given tuned model's path or hub id (None: trained here)
    first_reward: float | None = None  # GRPO (VADER task)
    last10_reward: float | None = None
    reward_info: RewardInfo | None = None  # the reward plug-in GRPO optimised


@_stage("rl_eval")
@dataclass(frozen=True)
class RLEvalSummary(StageSummary):
    """VADER task: the tuned policy against the base model on the held-out prompts. HH task: the DPO
    policy's implicit-reward margin and accuracy on held-out (eval_*) and training (train_*) pairs."""

    reward_base: RewardStats | None = None
    reward_tuned: RewardStats | None = None
    difference: PairedDifference | None = None
    kl_per_token: float | None = None
    distinct2_base: float | None = None
    distinct2_tuned: float | None = None
    eval_margin: RewardStats | None = None
    eval_accuracy: float | None = None
    n_eval: int | None = None
    train_margin: RewardStats | None = None
    train_accuracy: float | None = None
    n_train: int | None = None


@_stage("divergence")
@dataclass(frozen=True)
class DivergenceSummary(StageSummary):
    selected_layers: list[int] | None = None
    measure: str | None = None  # "activation" or "param"


@_stage("activations")
@dataclass(frozen=True)
class ActivationsSummary(StageSummary):
    """The harvest: ``layers`` (what every later stage studies), ``hook`` (the block hook read, e.g.
    ``hook_mlp_out``; None in runs made before it could be chosen: the MLP output), and why these layers
    (``layers_from``: ``divergence``, or the given SAEs' layers, with ``divergence_layers`` the divergence
    stage's own choice)."""

    layers: list[int] | None = None
    hook: str | None = None
    layers_from: str | None = None
    divergence_layers: list[int] | None = None
    source: str | None = None
    n_docs: int | None = None
    n_rows: int | None = None
    n_train_rows: int | None = None
    n_eval_rows: int | None = None
    tuned: HarvestInfo | None = None
    base: HarvestInfo | None = None


@_stage("saes")
@dataclass(frozen=True)
class SAEsSummary(StageSummary):
    n_saes: int | None = None
    layers: list[int] | None = None
    bars: dict[str, dict[str, bool]] = field(default_factory=dict)  # {sae_id: {bar: met}}
    mfr: dict[str, MfrStats] = field(default_factory=dict)  # {"mfr" | "independent": stats}
    basis: list[BasisStats] = field(default_factory=list)  # per layer: base vs tuned beside the reseed references
    given: dict[str, str] = field(default_factory=dict)  # {role: source} of the roles whose SAEs were given
    trained: list[str] = field(default_factory=list)  # the roles whose SAEs were trained here
    not_applicable: dict[str, str] = field(default_factory=dict)  # {what was not computed: why}
    layers_from: str | None = None  # why these layers (the harvest's reason)


@_stage("features")
@dataclass(frozen=True)
class FeaturesSummary(StageSummary):
    saes: list[str] | None = None


@dataclass(frozen=True)
class ProbeRoleSummary:
    """The token probe on one model's SAE features (``probes`` stage, per role)."""

    tau_occurrence: Tau | None = None
    tau_word: Tau | None = None
    sign_acc_pos_occurrence: float | None = None
    sign_acc_neg_occurrence: float | None = None
    sign_acc_pos_word: float | None = None
    sign_acc_neg_word: float | None = None
    alpha_occurrence: float | None = None
    alpha_word: float | None = None
    error_vs_tuned_freq_occurrence: Correlation | None = None
    error_vs_tuned_freq_word: Correlation | None = None
    tau_baseline: Tau | None = None
    tau_shuffled: Tau | None = None
    inputs: dict[str, ProbeInput] | None = None
    sign_acc_pos: float | None = None
    sign_acc_neg: float | None = None
    irm: Correlation | None = None
    irm_all_words: Correlation | None = None
    irm_disagreements: list[IrmDisagreement] | None = None
    logistic: dict[str, LogisticResult] | None = None
    pca_var_ratio: list[float] | None = None
    pca_var_ratio_by_task: dict[str, list[float]] | None = None
    # the contrastive variant as a ridge fitted on training words, τ on held-out words (schema 5; the
    # retired ``tau_contrastive`` signed its score by the true valence, so it is dropped on read)
    contrastive_probe: Tau | None = None

    def tau(self, split: str) -> Tau | None:
        """τ of the ``occurrence`` or ``word`` split."""
        return {"occurrence": self.tau_occurrence, "word": self.tau_word}[split]

    def sign_acc(self, polarity: str, split: str) -> float | None:
        """Sign accuracy on ``pos`` or ``neg`` words of the ``occurrence`` or ``word`` split."""
        return {
            ("pos", "occurrence"): self.sign_acc_pos_occurrence,
            ("neg", "occurrence"): self.sign_acc_neg_occurrence,
            ("pos", "word"): self.sign_acc_pos_word,
            ("neg", "word"): self.sign_acc_neg_word,
        }[(polarity, split)]


@_stage("probes")
@dataclass(frozen=True)
class ProbesSummary(StageSummary):
    layers: list[int] | None = None
    n_points: int | None = None
    n_words: int | None = None
    n_test_occurrence: int | None = None
    n_test_word: int | None = None
    # schema 5: the word split groups words by stem; the penalty search per split; tuned − base τ with a CI
    word_split_by: str | None = None  # "stem": no test word shares a (Snowball) stem with a training word
    n_stems: int | None = None
    n_test_words_word_split: int | None = None
    penalty_cv: dict[str, str] | None = None  # {split: how the ridge penalty was chosen}
    occurrence_test_stem_overlap: float | None = None  # share of occurrence-split test words whose stem is in training
    tau_difference: dict[str, TauDifference] | None = None  # {split: τ tuned − τ base, bootstrap CI over words}
    # schema 6: the sequence-level probe (pooled SAE features → a completion's reward), and which probe's
    # weights rank the features in probe_features ("token": the token probe; "sequence": the sequence probe)
    sequence: SequenceProbe | None = None
    feature_ranking: str | None = None
    tuned: ProbeRoleSummary | None = None
    base: ProbeRoleSummary | None = None

    def role(self, role: str) -> ProbeRoleSummary | None:
        """The probe on the ``tuned`` or ``base`` model."""
        return {"tuned": self.tuned, "base": self.base}.get(role)


@_stage("labels")
@dataclass(frozen=True)
class LabelsSummary(StageSummary):
    labeller: str | None = None
    n_chosen: int | None = None
    n_skipped_no_examples: int | None = None
    llm_requests: int | None = None  # LLM labeller only
    llm_cached: int | None = None
    llm_tokens: int | None = None
    n_labelled: int | None = None
    n_relevant: int | None = None
    n_unparsed: int | None = None
    detection_acc_mean: float | None = None
    # scoring text (schema 5): documents holding none of the probe's points; relevance and detection
    # windows come from them, never from a feature's own top-example (explain-set) documents
    n_score_docs: int | None = None
    n_probe_docs: int | None = None
    n_not_detection_scored: int | None = None  # labelled features with no held-out activating window
    frequency: list[FrequencyRow] = field(default_factory=list)
    overlap: Overlap = field(default_factory=lambda: Overlap())


@dataclass(frozen=True)
class AblationSetSummary:
    """One tested feature set: reward before/after and the paired change (95% CIs, all ``n`` prefixes) and,
    with random controls, the test: ``hypothesis`` ('lower'/'raise'), the set's mean change on the first
    ``rank_n`` prefixes (``rank_diff``, the statistic every set is compared on) against its ``n_random``
    controls' (``random_diffs``, their median/min/max, ``random_se`` their prefix noise, ``random_sd``
    their spread), ``p_rank`` (exact one-sided rank p, at least ``p_min`` = 1/(n_random + 1)) and ``p``
    (normal-theory); ``density``/``mass`` against ``random_density``/``random_mass``: the match of the
    controls (medians)."""

    size: int | None = None
    n: int | None = None
    reward_before: float | None = None
    reward_after: float | None = None
    after_lo: float | None = None
    after_hi: float | None = None
    diff: float | None = None
    diff_lo: float | None = None
    diff_hi: float | None = None
    random_after_mean: float | None = None
    random_diffs: list[float] | None = None
    p: float | None = None
    p_rank: float | None = None
    lower_than_all: bool | None = None
    n_random: int | None = None
    hypothesis: str | None = None
    rank_n: int | None = None
    rank_diff: float | None = None
    random_median: float | None = None
    random_lo: float | None = None
    random_hi: float | None = None
    random_se: float | None = None
    random_sd: float | None = None
    beyond_all: bool | None = None
    p_min: float | None = None
    density: float | None = None
    mass: float | None = None
    random_density: float | None = None
    random_mass: float | None = None


@_stage("ablation")
@dataclass(frozen=True)
class AblationSummary(StageSummary):
    """Per tested set (``sets``), and the probe-top set's figures at the top level; ``n_random`` control sets
    per tested set, compared on the first ``rank_n`` prefixes; ``n_completions`` sampled in all (the cost)."""

    reward_before: float | None = None
    reward_after: float | None = None
    random_after_mean: float | None = None
    p: float | None = None
    p_rank: float | None = None
    lower_than_all: bool | None = None
    n_random: int | None = None
    rank_n: int | None = None
    n_completions: int | None = None
    sets: dict[str, AblationSetSummary] = field(default_factory=dict)


@_stage("reward_model")
@dataclass(frozen=True)
class RewardModelSummary(StageSummary):
    n_train: int | None = None
    n_eval: int | None = None
    train_log: list[RMTrainStep] | None = None
    pair_acc: PairAccuracy | None = None  # held-out pairs
    pair_acc_train: PairAccuracy | None = None
    saes: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"harvest": HarvestInfo, sae_id: RMSaeStats}
    oracle: RewardInfo | None = None  # the reward plug-in whose preferences the pairs are

    @property
    def sae_stats(self) -> dict[str, RMSaeStats]:
        """{sae_id: FVU, L0, dead fraction and pair accuracy with the SAE spliced in}."""
        return {k: typing.cast(RMSaeStats, v) for k, v in self.saes.items() if k != "harvest"}


@_stage("attribution")
@dataclass(frozen=True)
class AttributionSummary(StageSummary):
    pm: AttributionResult | None = None  # the preference model's reward
    # the policy's expected next-token VADER valence over the completion (before schema 5: the probe's
    # predicted reward, a linear read-out of the very features attributed)
    policy: AttributionResult | None = None
    disagreement: Disagreement | None = None

    def target(self, name: str) -> AttributionResult | None:
        """``pm`` or ``policy``."""
        return {"pm": self.pm, "policy": self.policy}.get(name)

    def check_rows(self, name: str) -> list[dict[str, Any]]:
        """The verification of target ``name`` against true ablation, one row per (sample, estimator):
        {"sample", "estimator"} (labels saying exactly what was checked) and the EstimatorCheck's numbers;
        empty for a run before schema 5 (its figures are layer-wide IG on the top features only)."""
        a = self.target(name)
        if a is None or "checks" not in a:
            return []
        samples = {
            "top": f"top {a.get('top_k')} by mean |AtP|",
            "random": f"uniform random {a.get('random_k')} per layer ({a.get('n_random_active')} of "
            f"{a.get('n_random')} fire on the texts)",
        }
        estimators = {
            "atp": "AtP (gradient at the clean point)",
            "path": f"path ({a.get('steps')}-step IG on the feature's axis)",
        }
        return [
            {"sample": samples.get(sample, sample), "estimator": estimators.get(est, est), **c}
            for sample, by in a["checks"].items()
            for est, c in by.items()
        ]


# --- model diffing (issue: crosscoders, difference SAEs, localisation, null control) ---------------
@_stage("null_rlhf")
@dataclass(frozen=True)
class NullSummary(StageSummary):
    """The null fine-tune control: ``recipe`` 'shuffled' / 'constant' (trained here by the rlhf stage's
    recipe with that reward), 'given' (``--null``) or 'none' (no null control, with the reason in
    ``not_applicable``); the steps and GRPO's own first / last-10 mean reward (of what it saw: the shuffled or
    constant reward)."""

    recipe: str | None = None
    policy_dir: str | None = None
    steps: int | None = None
    given: str | None = None
    first_reward: float | None = None
    last10_reward: float | None = None
    reward_info: RewardInfo | None = None


@dataclass(frozen=True)
class ClassCounts:
    """Latents of one crosscoder per class (relative norm and latent-scaling thresholds of the stage)."""

    shared: int | None = None
    base_only: int | None = None
    tuned_only: int | None = None
    robust: int | None = None
    dead: int | None = None
    d_sae: int | None = None


@_stage("crosscoders")
@dataclass(frozen=True)
class CrosscodersSummary(StageSummary):
    """Crosscoders and difference SAEs per pair ('tuned', and 'null' with a null control) and layer:
    ``counts[pair][layer]`` the latents per class, ``thresholds`` the class boundaries used."""

    layers: list[int] | None = None
    hook: str | None = None
    pairs: list[str] | None = None
    dictionaries: list[str] | None = None
    counts: dict[str, dict[str, ClassCounts]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    null_recipe: str | None = None


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% CI (bootstrap over prefixes unless ``method`` says otherwise)."""

    mean: float | None = None
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    method: str | None = None


@_stage("localisation")
@dataclass(frozen=True)
class LocalisationSummary(StageSummary):
    """Component patching of the tuned policy (``gain``: tuned − base reward; ``sum_fraction``: the single
    components' fractions added up; ``all_fraction``: every component patched at once; ``top_component``) and
    the activation-difference lens (``lens_layers``, ``lens_hook``, the steering figures per pair in
    ``diff_lens``)."""

    n_prefixes: int | None = None
    components: list[str] | None = None
    gain: Interval | None = None
    gain_defined: bool | None = None
    sum_fraction: Interval | None = None
    all_fraction: Interval | None = None
    top_component: str | None = None
    null_gain: Interval | None = None
    lens_layers: list[int] | None = None
    lens_hook: str | None = None
    lens_tokens: int | None = None
    reward_info: RewardInfo | None = None


@dataclass(frozen=True)
class CausalSetSummary:
    """One tested latent set: its mean reward change under the intervention with a CI, against ``n_random``
    matched random sets (``p_rank``: exact one-sided rank p in ``hypothesis``'s direction)."""

    dict_id: str | None = None
    pair: str | None = None
    layer: int | None = None
    intervention: str | None = None
    selection: str | None = None
    size: int | None = None
    n: int | None = None
    diff: float | None = None
    diff_lo: float | None = None
    diff_hi: float | None = None
    hypothesis: str | None = None
    p_rank: float | None = None
    n_random: int | None = None
    random_median: float | None = None
    random_lo: float | None = None
    random_hi: float | None = None


@_stage("diff_causal")
@dataclass(frozen=True)
class DiffCausalSummary(StageSummary):
    """The causal checks of the robust tuned-only crosscoder latents and the top difference-SAE features
    (``sets``, by set id), each against matched random latents."""

    n_prefixes: int | None = None
    n_random: int | None = None
    sets: dict[str, CausalSetSummary] = field(default_factory=dict)
    reward_info: RewardInfo | None = None


# --- conversion ------------------------------------------------------------------------------------
class _Mode:
    def __init__(self, stage: str, strict: bool):
        self.stage, self.strict = stage, strict

    def unknown(self, path: str, key: str, owner: str) -> None:
        where = f"{path}.{key}" if path else key
        if self.strict:
            raise SummaryError(
                f"stage {self.stage!r}: summary key {where!r} is not a field of {owner} "
                f"(declare it in lfp_core/store/summaries.py)"
            )
        log.warning("stage %s: ignoring the stored summary key %r (not a field of %s)", self.stage, where, owner)

    def bad(self, path: str, expected: str, value: Any) -> Any:
        if self.strict:
            raise SummaryError(
                f"stage {self.stage!r}: summary value {path or '(top)'} should be {expected}, "
                f"got {type(value).__name__}"
            )
        return value

    def text_for_number(self, path: str, expected: str, value: Any) -> Any:
        """A stored number field holding text: kept when writing (as before), dropped (None, logged) when
        reading, so the pages and the report never put a run's text where they show a number."""
        if self.strict:
            return value
        log.warning(
            "stage %s: ignoring the stored summary value %s (%s expected, text found)", self.stage, path, expected
        )
        return None


def _convert(tp: Any, value: Any, path: str, mode: _Mode) -> Any:
    if value is None or tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _convert(options[0], value, path, mode) if len(options) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _record(tp, value, path, mode)
    if is_typeddict(tp):
        if not isinstance(value, Mapping):
            return mode.bad(path, tp.__name__, value)
        hints = get_type_hints(tp)
        out = {}
        for k, v in value.items():
            if k not in hints:
                mode.unknown(path, k, tp.__name__)
                continue
            out[k] = _convert(hints[k], v, f"{path}.{k}" if path else k, mode)
        return out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return mode.bad(path, "a mapping", value)
        _, vt = get_args(tp)
        return {k: _convert(vt, v, f"{path}[{k!r}]", mode) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            return mode.bad(path, "a list", value)
        (it,) = get_args(tp)
        return [_convert(it, v, f"{path}[{i}]", mode) for i, v in enumerate(value)]
    if tp in (int, float) and isinstance(value, str | bytes):
        return mode.text_for_number(path, tp.__name__, value)
    return value


def _record(cls: type, value: Any, path: str, mode: _Mode) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        return mode.bad(path, cls.__name__, value)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in value.items():
        if k not in names:
            mode.unknown(path, k, cls.__name__)
            continue
        kwargs[k] = _convert(hints[k], v, f"{path}.{k}" if path else k, mode)
    return cls(**kwargs)


def parse_summary(
    stage: str, detail: Mapping[str, Any] | StageSummary | None, strict: bool = True
) -> StageSummary | None:
    """The typed summary of ``stage`` from its detail dict.

    Args:
        stage: the stage's name.
        detail: what the stage recorded (a dict, or already a summary).
        strict: raise :class:`SummaryError` for a key that is not a field (the write path); otherwise
            drop it with a warning (the read path: runs written by other versions).

    Returns:
        The summary, or None for a stage no summary class is declared for (an empty detail of an
        unknown stage also gives None; a non-empty one is an error when ``strict``).
    """
    cls = SUMMARIES.get(stage)
    if cls is None:
        if detail and strict:
            raise SummaryError(f"stage {stage!r} has no summary class; declare one in lfp_core/store/summaries.py")
        return None
    if isinstance(detail, StageSummary) and not isinstance(detail, cls):
        raise SummaryError(f"stage {stage!r} takes a {cls.__name__}, not a {type(detail).__name__}")
    return _record(cls, detail or {}, "", _Mode(stage, strict))


def summary_dict(summary: StageSummary | Any) -> Any:
    """A summary as a JSON-ready dict (fields left at None are omitted)."""
    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        return {
            f.name: summary_dict(getattr(summary, f.name))
            for f in dataclasses.fields(summary)
            if getattr(summary, f.name) is not None
        }
    if isinstance(summary, Mapping):
        return {k: summary_dict(v) for k, v in summary.items()}
    if isinstance(summary, list | tuple):
        return [summary_dict(v) for v in summary]
    return summary
