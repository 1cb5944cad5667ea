"""The statistic bundles inside stage summaries (:mod:`lfp_core.store.summaries`): small ``TypedDict``s,
plain JSON-ready dicts with declared keys (a Kendall τ with its p-value, a reward mean with its
standard error, ...). Imports nothing heavy."""

from __future__ import annotations

from typing import NotRequired, TypedDict


class RewardInfo(TypedDict, total=False):
    """The reward plug-in a stage scored with (:mod:`lfp_core.rewards`): its spec, name and kind
    (``lexicon`` or ``sequence``)."""

    spec: str
    name: str
    kind: str


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
    n_clusters: NotRequired[int]  # prompts (independent units) behind the pairs; runs before schema 5 lack it
    method: NotRequired[str]  # "cluster bootstrap over N prompts (B resamples)" or "paired t-test ..."


class Tau(TypedDict, total=False):
    """Kendall τ between per-word predictions and valences; ``pos``/``neg``: the same on positive or
    negative words only."""

    tau: float
    p: float
    n_words: int
    pos: Tau
    neg: Tau
    n_sentences: int  # the contrastive probe: sentence variants scored
    n_train_words: int  # the contrastive probe: distinct words it was fitted on


class TauDifference(TypedDict, total=False):
    """τ(tuned) − τ(base) of the probe over the same test words, with a percentile bootstrap CI that
    resamples words (``level``, ``n_boot`` resamples)."""

    diff: float
    lo: float
    hi: float
    tau_tuned: float
    tau_base: float
    level: float
    n_words: int
    n_boot: int


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
    """Share of pairs ranked as the oracle ranks them, with a 95% CI: a cluster bootstrap over the pairs'
    prompts when they are known (``method`` says which), else Wilson."""

    acc: float
    lo: float
    hi: float
    n: int
    n_prompts: NotRequired[int]  # prompts the pairs come from (the bootstrap's independent units)
    method: NotRequired[str]


class Spearman(TypedDict):
    rho: float
    p: float
    n: int


class EstimatorCheck(TypedDict, total=False):
    """One estimator of the single-feature effect against true ablation over one verified sample of
    features (means over texts; lfp_core.attribution.agreement)."""

    rho: float  # Spearman of estimate vs true effect, over the n features
    p: float
    n: int
    rel_floor: float  # |true effect| at or above this is non-negligible (a share of the sample's largest)
    n_rel: int  # non-negligible features: the sign agreement and the relative error are over these
    sign_agree: float
    median_rel_err: float  # median |estimate − true| / |true|
    rho_sign_only: float  # Spearman of sign(true) vs true: what knowing only the signs would score
    recall: float  # share of the true top-k (by |true|) among the estimator's top-k (random sample only)
    k: int
    recall_chance: float  # k / n


class AttributionResult(TypedDict, total=False):
    """Single-feature attribution on one target, checked against true ablation of the top features by AtP
    and (schema 5) of a uniform random sample of features per layer."""

    n_texts: int
    steps: int  # midpoints of the path estimate
    top_k: int
    spearman_top: Spearman  # AtP on the top features (before schema 5: layer-wide integrated gradients)
    spearman_points: Spearman  # AtP over (text, feature) points of the verified features (schema 5: where they fire)
    metric: str  # what the attributed metric is
    random_k: int  # features drawn per layer
    n_random: int  # features in the random sample (all layers)
    n_random_active: int  # of them, those that fire on some attributed text (the random checks are over these)
    rel_floor_share: float  # the non-negligible threshold as a share of the sample's largest |true effect|
    checks: dict[str, dict[str, EstimatorCheck]]  # {"top" | "random": {"atp" | "path": EstimatorCheck}}
    seconds: dict[str, float]  # {"atp": ranking every feature, "verify": true ablation + path estimates}


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


class BasisStats(TypedDict):
    """MMCS (Hungarian) at one layer between the base and tuned main SAEs, and the same-model
    different-seed references (each main SAE against its ``reseed``); ``below_reference``: base-vs-tuned
    is below both references, the only case in which it can hint that RL changed the basis (None
    when a reference is missing)."""

    layer: int
    base_vs_tuned: float
    base_vs_base_reseed: float | None
    tuned_vs_tuned_reseed: float | None
    below_reference: bool | None


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


# --- the sequence-level probe (schema 6; lfp_core.seqprobes) ---------------------------------------------
class SeqScore(TypedDict, total=False):
    """A sequence probe's held-out predictions against the completions' rewards: Spearman ρ and Kendall τ
    with scipy's p-values (which treat completions as independent), out-of-sample R² (against the held-out
    mean; None for a map that was not fitted to the reward's scale), and the percentile bootstrap CI of ρ
    that resamples held-out prompts (every completion of a drawn prompt moves together): the figure's
    uncertainty. ``alpha``/``dim``: the ridge penalty chosen on the training split and the input's width."""

    rho: float
    p: float
    tau: float
    p_tau: float
    r2: float | None
    lo: float
    hi: float
    level: float
    n: int  # held-out completions
    n_prompts: int  # held-out prompts (the bootstrap's units)
    n_boot: int
    alpha: float
    dim: int


class RhoDifference(TypedDict, total=False):
    """ρ(a) − ρ(b) of two predictions of the same held-out completions, with a paired percentile bootstrap
    CI over held-out prompts (both predictions of a resampled prompt move together)."""

    diff: float
    lo: float
    hi: float
    rho_a: float
    rho_b: float
    level: float
    n: int
    n_prompts: int
    n_boot: int


class SeqInput(SeqScore, total=False):
    """A baseline through the same ridge, split and penalty search; ``vs_probe``: the SAE probe's ρ minus
    this input's, paired bootstrap CI over prompts."""

    vs_probe: RhoDifference


class SeqLogistic(TypedDict, total=False):
    """The logistic variant: reward above the training split's median (``threshold``) vs not, an L2 logistic
    regression (penalty by CV grouped by prompt); held-out accuracy beside the majority class of the
    training labels, each with a bootstrap CI over held-out prompts, and ``diff`` = accuracy − majority
    with its paired CI (the question asked: better than always guessing the majority?)."""

    acc: float
    lo: float
    hi: float
    majority_acc: float
    majority_lo: float
    majority_hi: float
    diff: float
    diff_lo: float
    diff_hi: float
    threshold: float
    share_above: float  # of the training labels
    n: int
    n_prompts: int
    n_boot: int


class SequenceRole(TypedDict, total=False):
    """The sequence probe on one model's pooled SAE features, its controls and baselines; ``by_policy``: the
    probe's held-out ρ within the completions of each policy (base, tuned) alone."""

    probe: SeqScore
    shuffled: SeqScore
    untrained: SeqScore
    inputs: dict[str, SeqInput]
    logistic: SeqLogistic
    by_policy: dict[str, SeqScore]


class SequenceProbe(TypedDict, total=False):
    """The sequence-level probe (``probes`` stage): data, split and penalty search, per model (``tuned``,
    ``base``: each model's activations over every completion through its own SAEs) and ``difference``:
    ρ(tuned features) − ρ(base features) over the same held-out completions, paired CI over prompts."""

    reward: str  # the reward spec the completions were scored with
    layers: list[int]
    pooling: str
    split: str
    penalty_cv: str
    n_completions: int
    n_prompts: int
    n_test: int
    n_test_prompts: int
    n_dropped: int  # completions with no harvested token (nothing to pool)
    n_by_policy: dict[str, int]
    tuned: SequenceRole
    base: SequenceRole
    difference: RhoDifference
