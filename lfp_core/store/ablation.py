"""Ablation and attribution: the feature-set ablation experiment, the preference model's pairs, and the
attribution-patching rankings with their verification points."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from lfp_core.store.connection import Queries
from lfp_core.store.schema import table

D = "ablation"
ABLATION_PREFIXES = table(
    "ablation_prefixes",
    D,
    "prefix_id INTEGER, token_ids INTEGER[], text VARCHAR, n_new INTEGER",
    ("prefix_id",),
    since=4,
)
ABLATION_SETS = table(
    "ablation_sets",
    D,
    "set_id VARCHAR, kind VARCHAR NOT NULL, control_of VARCHAR, size INTEGER, "
    "layers INTEGER[], features INTEGER[], n INTEGER, before DOUBLE, "
    "before_lo DOUBLE, before_hi DOUBLE, after DOUBLE, after_lo DOUBLE, "
    "after_hi DOUBLE, diff DOUBLE, diff_lo DOUBLE, diff_hi DOUBLE, p_rank DOUBLE, "
    "p DOUBLE, lower_than_all BOOLEAN, hypothesis VARCHAR, rank_n INTEGER, rank_diff DOUBLE, "
    "n_random INTEGER, random_median DOUBLE, random_lo DOUBLE, random_hi DOUBLE, density DOUBLE, mass DOUBLE",
    ("set_id",),
    added={
        c: 5
        for c in (
            "hypothesis",
            "rank_n",
            "rank_diff",
            "n_random",
            "random_median",
            "random_lo",
            "random_hi",
            "density",
            "mass",
        )
    },
    since=4,
)
ABLATION_COMPLETIONS = table(
    "ablation_completions",
    D,
    "set_id VARCHAR NOT NULL, prefix_id INTEGER NOT NULL, token_ids INTEGER[], text VARCHAR, reward DOUBLE",
    ("set_id", "prefix_id"),
    since=4,
)
RM_PAIRS = table(
    "rm_pairs",
    D,
    "pair_id INTEGER, split VARCHAR NOT NULL, prompt_id INTEGER, prompt VARCHAR, "
    "chosen VARCHAR, rejected VARCHAR, chosen_ids INTEGER[], rejected_ids INTEGER[], "
    "chosen_oracle DOUBLE, rejected_oracle DOUBLE, chosen_pm DOUBLE, rejected_pm DOUBLE",
    ("pair_id",),
    since=4,
)
ATTRIBUTION = table(
    "attribution",
    D,
    "target VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, "
    "estimate DOUBLE, estimate_abs DOUBLE, true_effect DOUBLE, rank INTEGER, "
    "n_texts INTEGER, contrast DOUBLE, top_tokens VARCHAR[], estimate_atp DOUBLE, "
    "estimate_path DOUBLE, verified VARCHAR, n_active INTEGER",
    ("target", "layer", "feature"),
    added={c: 5 for c in ("estimate_atp", "estimate_path", "verified", "n_active")},
    since=4,
)
ATTRIBUTION_POINTS = table(
    "attribution_points",
    D,
    "target VARCHAR NOT NULL, layer INTEGER NOT NULL, "
    "feature INTEGER NOT NULL, text_id INTEGER NOT NULL, estimate DOUBLE, "
    "true_effect DOUBLE, estimate_path DOUBLE",
    ("target", "layer", "feature", "text_id"),
    added={"estimate_path": 5},
    since=4,
)


class AblationQueries(Queries):
    def ablation_sets(self) -> pd.DataFrame:
        """Every ablated set: tested sets first, then their random controls, each with reward before/after.

        Per tested set also its test against its random controls (schema 5): ``hypothesis`` ('lower' or
        'raise': the direction zeroing it should move the reward), ``rank_diff`` (its mean change on the
        first ``rank_n`` prefixes, the ones every set is compared on), the controls' ``random_median``/
        ``random_lo``/``random_hi`` of theirs, ``n_random``, ``p_rank`` (exact one-sided rank p) and ``p``
        (its normal-theory version); ``density``/``mass``: median firing density and activation mass
        (density × mean activation when firing) of the set's features."""
        return self._query("SELECT * FROM ablation_sets ORDER BY kind = 'random', control_of NULLS FIRST, set_id")

    def ablation_prefixes(self) -> pd.DataFrame:
        return self._query("SELECT * FROM ablation_prefixes ORDER BY prefix_id")

    def ablation_completions(self, set_ids: Sequence[str], limit: int = 50) -> pd.DataFrame:
        """Completions of the first ``limit`` prefixes under each of ``set_ids`` (one row per prefix and set)."""
        return self._query(
            "SELECT c.*, p.text AS prefix FROM ablation_completions c JOIN ablation_prefixes p USING "
            "(prefix_id) WHERE c.set_id IN (SELECT unnest(?)) AND c.prefix_id < ? ORDER BY c.prefix_id, "
            "c.set_id",
            [list(set_ids), int(limit)],
        )

    def ablation_rewards(self) -> pd.DataFrame:
        """(set_id, prefix_id, reward) of every stored ablation completion."""
        return self._query("SELECT set_id, prefix_id, reward FROM ablation_completions ORDER BY set_id, prefix_id")

    def rm_pairs(self, split: str | None = None) -> pd.DataFrame:
        """The preference model's oracle pairs ('train' or 'eval', or all) with its scores of held-out ones."""
        return self._query(
            "SELECT * FROM rm_pairs WHERE (CAST(? AS VARCHAR) IS NULL OR split = ?) ORDER BY pair_id", [split, split]
        )

    def attribution(self, target: str) -> pd.DataFrame:
        """Ranked features of one target ('pm', 'policy' or 'pm_disagree').

        ``estimate`` is the ranking estimate, AtP (also ``estimate_atp``, schema 5); for the features
        verified by true ablation (``verified``: 'top' — the top by mean |AtP| —, 'random' — the seeded
        uniform sample — or 'both') also ``true_effect`` and ``estimate_path`` (means over texts);
        ``n_active``: texts the feature fires on. Runs before schema 5 hold integrated gradients over the
        whole layer in ``estimate`` and nothing in the new columns."""
        return self._query("SELECT * FROM attribution WHERE target = ? ORDER BY rank, layer, feature", [target])

    def attribution_points(self, target: str) -> pd.DataFrame:
        """(text, feature) points of the verified features: AtP ``estimate``, ``estimate_path``,
        ``true_effect`` (schema 5: only texts the feature fires on; elsewhere all three are exactly 0)."""
        return self._query(
            "SELECT * FROM attribution_points WHERE target = ? ORDER BY layer, feature, text_id", [target]
        )
