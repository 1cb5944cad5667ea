"""The statistic bundles inside stage summaries (:mod:`lfp_core.store.summaries`): small ``TypedDict``s,
plain JSON-ready dicts with declared keys (a Kendall τ with its p-value, a reward mean with its
standard error, ...). Imports nothing heavy."""

from __future__ import annotations

from typing import TypedDict


class RewardStats(TypedDict, total=False):
    """Mean, standard error and count of a reward sample (``evaluation.reward_stats``)."""

    mean: float
    se: float
    n: int


class PairedDifference(TypedDict):
    """Tuned − base over paired completions (``evaluation.paired_difference``)."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    level: float
    n_se: float
    p_value: float


class Tau(TypedDict, total=False):
    """Kendall τ between per-word predictions and valences; ``pos``/``neg``: the same on positive or
    negative words only."""

    tau: float
    p: float
    n_words: int
    pos: Tau
    neg: Tau
    n_sentences: int  # the contrastive variant: sentence variants scored


class Correlation(TypedDict):
    pearson: float
    spearman: float
    n: int


class ProbeInput(TypedDict, total=False):
    """The probe on another input (raw MLP outputs, every layer): its width and τ per split."""

    dim: int
    occurrence: Tau
    word: Tau


class LogisticResult(TypedDict, total=False):
    """A logistic separation probe: held-out accuracy with its Wilson CI, the raw-activation probe and
    the majority class."""

    acc: float
    ci_low: float
    ci_high: float
    n_test: int
    majority_acc: float
    raw_acc: float


class IrmDisagreement(TypedDict):
    prompt: str
    completion: str
    reward_raw: float
    irm: float


class PairAccuracy(TypedDict):
    """Share of pairs ranked as the oracle ranks them, with a Wilson 95% CI."""

    acc: float
    lo: float
    hi: float
    n: int


class Spearman(TypedDict):
    rho: float
    p: float
    n: int


class AttributionResult(TypedDict, total=False):
    """Attribution patching on one target, checked against true ablation of its top features."""

    n_texts: int
    steps: int
    top_k: int
    spearman_top: Spearman
    spearman_points: Spearman


class DisagreementFeature(TypedDict):
    layer: int
    feature: int
    estimate: float
    contrast: float


class Disagreement(TypedDict, total=False):
    n_disagree: int
    n_eval: int
    n_attributed: int
    top: list[DisagreementFeature]


class Overlap(TypedDict, total=False):
    """Overlap of the labeller's reward-related features with the probe's top ones (hypergeometric p)."""

    n: int
    n_labelled: int
    n_flagged: int
    n_probe_top: int
    p: float | None
    expected: float | None


class FrequencyRow(TypedDict):
    """How often one feature set fires on the top- vs bottom-quartile completions by reward (Wilcoxon p)."""

    set: str
    n_features: int
    freq_high: float | None
    freq_low: float | None
    p: float | None
    n_high: int
    n_low: int


class MfrStats(TypedDict):
    n: int
    fvu: float
    l0: float
    ce_loss_recovered: float
    mmcs: float


class HarvestInfo(TypedDict):
    rows: int
    seconds: float
    tokens_per_s: float


class ModelInfo(TypedDict, total=False):
    name: str
    source: str
    location: str
    architecture: str
    n_params: int
    n_layers: int
    d_model: int
    vocab_size: int


class RMTrainStep(TypedDict, total=False):
    step: int
    loss: float
    accuracy: float


class RMSaeStats(TypedDict, total=False):
    fvu: float
    l0: float
    dead_frac: float
    pair_acc_spliced: float
