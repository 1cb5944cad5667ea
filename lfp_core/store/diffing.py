"""Model diffing: crosscoders and difference SAEs (one row per dictionary, one per latent), localisation
by component patching, the activation-difference lens with its steering check, and the causal checks of
the tuned-only latents (schema 7).

``pair`` names what is compared with the base model: ``tuned`` (the fine-tune) or ``null`` (the null
fine-tune control: the same recipe with an uninformative reward). Every figure of the ``tuned`` pair has
its ``null`` row beside it where the run has a null control.
"""

from __future__ import annotations

import pandas as pd

from lfp_core.store.connection import Queries
from lfp_core.store.schema import table

D = "diffing"
DIFF_DICTIONARIES = table(
    "diff_dictionaries",
    D,
    "dict_id VARCHAR, kind VARCHAR NOT NULL, pair VARCHAR NOT NULL, layer INTEGER NOT NULL, role VARCHAR, "
    "hook_name VARCHAR, arch VARCHAR, d_sae INTEGER, k INTEGER, seed INTEGER, path VARCHAR, "
    "train_tokens BIGINT, seconds DOUBLE, tokens_per_s DOUBLE, n_eval_tokens BIGINT, l0 DOUBLE, "
    "dead_frac DOUBLE, fvu_base DOUBLE, fvu_other DOUBLE, ce_clean_base DOUBLE, ce_spliced_base DOUBLE, "
    "ce_zero_base DOUBLE, recovered_base DOUBLE, ce_clean_other DOUBLE, ce_spliced_other DOUBLE, "
    "ce_zero_other DOUBLE, recovered_other DOUBLE, n_shared INTEGER, n_base_only INTEGER, "
    "n_tuned_only INTEGER, n_robust INTEGER, n_dead INTEGER",
    ("dict_id",),
    since=7,
)
DIFF_LATENTS = table(
    "diff_latents",
    D,
    "dict_id VARCHAR NOT NULL, latent INTEGER NOT NULL, kind VARCHAR NOT NULL, pair VARCHAR NOT NULL, "
    "layer INTEGER NOT NULL, role VARCHAR, rel_norm DOUBLE, dec_cos DOUBLE, norm_base DOUBLE, "
    "norm_other DOUBLE, density DOUBLE, density_base_text DOUBLE, density_other_text DOUBLE, mean_act DOUBLE, "
    "beta_eps_base DOUBLE, beta_eps_other DOUBLE, beta_r_base DOUBLE, beta_r_other DOUBLE, nu_eps DOUBLE, "
    "nu_r DOUBLE, class VARCHAR, reward_corr DOUBLE, top_tokens VARCHAR[]",
    ("dict_id", "latent"),
    indexes={"diff_latents_class": ("pair", "class")},
    since=7,
)
DIFF_PATCHING = table(
    "diff_patching",
    D,
    "pair VARCHAR NOT NULL, component VARCHAR NOT NULL, layer INTEGER, kind VARCHAR NOT NULL, n INTEGER, "
    "reward DOUBLE, reward_lo DOUBLE, reward_hi DOUBLE, frac DOUBLE, frac_lo DOUBLE, frac_hi DOUBLE",
    ("pair", "component"),
    since=7,
)
DIFF_LENS = table(
    "diff_lens",
    D,
    "pair VARCHAR NOT NULL, layer INTEGER NOT NULL, hook_name VARCHAR, n_tokens BIGINT, norm DOUBLE, "
    "promoted VARCHAR[], promoted_logits DOUBLE[], suppressed VARCHAR[], suppressed_logits DOUBLE[], "
    "steer_n INTEGER, steer_diff DOUBLE, steer_lo DOUBLE, steer_hi DOUBLE, steer_p_rank DOUBLE, "
    "n_random INTEGER, random_median DOUBLE, random_lo DOUBLE, random_hi DOUBLE, frac_of_gain DOUBLE",
    ("pair", "layer"),
    since=7,
)
DIFF_CAUSAL = table(
    "diff_causal",
    D,
    "set_id VARCHAR, dict_id VARCHAR NOT NULL, pair VARCHAR NOT NULL, layer INTEGER, kind VARCHAR NOT NULL, "
    "control_of VARCHAR, intervention VARCHAR NOT NULL, selection VARCHAR, latents INTEGER[], size INTEGER, "
    "n INTEGER, diff DOUBLE, diff_lo DOUBLE, diff_hi DOUBLE, hypothesis VARCHAR, p_rank DOUBLE, "
    "n_random INTEGER, random_median DOUBLE, random_lo DOUBLE, random_hi DOUBLE",
    ("set_id",),
    since=7,
)


class DiffingQueries(Queries):
    def diff_dictionaries(self) -> pd.DataFrame:
        """Every crosscoder (``kind`` 'crosscoder') and difference SAE ('diff_sae') of the run, by pair and layer:
        its training, held-out FVU per model (``fvu_other``: the tuned or null model), loss recovered when
        spliced into each model (no error term) and, for crosscoders, the latent counts per class."""
        return self._query("SELECT * FROM diff_dictionaries ORDER BY kind, pair DESC, layer")

    def diff_latents(self, dict_id: str | None = None, latent_class: str | None = None) -> pd.DataFrame:
        """Per-latent statistics of one dictionary (or all): relative decoder norm (1 = only the tuned/null
        model's decoder), decoder cosine, densities, latent-scaling fits and ratios (ν^ε, ν^r), class,
        correlation with the reward signal and top tokens."""
        return self._query(
            "SELECT * FROM diff_latents WHERE (CAST(? AS VARCHAR) IS NULL OR dict_id = ?) AND "
            "(CAST(? AS VARCHAR) IS NULL OR class = ?) ORDER BY dict_id, latent",
            [dict_id, dict_id, latent_class, latent_class],
        )

    def diff_patching(self) -> pd.DataFrame:
        """Component patching: per pair and component ('L{l}.attn', 'L{l}.mlp', 'all', 'clean', 'base') the mean
        reward of the tuned policy sampled with that component's output taken from the base model, and the
        fraction of the reward gain it carries with its CI."""
        return self._query("SELECT * FROM diff_patching ORDER BY pair DESC, layer NULLS LAST, kind")

    def diff_lens(self) -> pd.DataFrame:
        """The activation-difference lens per pair and layer: the mean difference's norm, its promoted and
        suppressed tokens, and the steering check (base model + the difference: reward change, CI, rank p among
        random directions of the same norm)."""
        return self._query("SELECT * FROM diff_lens ORDER BY pair DESC, layer")

    def diff_causal(self) -> pd.DataFrame:
        """Causal checks: tested latent sets (and single latents) ablated in the tuned model or added to the
        base model, with their matched random controls."""
        return self._query(
            "SELECT * FROM diff_causal ORDER BY kind = 'random', pair DESC, dict_id, control_of NULLS FIRST, set_id"
        )
