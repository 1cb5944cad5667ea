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
    "p DOUBLE, lower_than_all BOOLEAN",
    ("set_id",),
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
    "n_texts INTEGER, contrast DOUBLE, top_tokens VARCHAR[]",
    ("target", "layer", "feature"),
    since=4,
)
ATTRIBUTION_POINTS = table(
    "attribution_points",
    D,
    "target VARCHAR NOT NULL, layer INTEGER NOT NULL, "
    "feature INTEGER NOT NULL, text_id INTEGER NOT NULL, estimate DOUBLE, "
    "true_effect DOUBLE",
    ("target", "layer", "feature", "text_id"),
    since=4,
)


class AblationQueries(Queries):
    def ablation_sets(self) -> pd.DataFrame:
        """Every ablated set: tested sets first, then their random controls, each with reward before/after."""
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
        """Ranked features of one target ('pm', 'policy' or 'pm_disagree')."""
        return self._query("SELECT * FROM attribution WHERE target = ? ORDER BY rank, layer, feature", [target])

    def attribution_points(self, target: str) -> pd.DataFrame:
        return self._query(
            "SELECT * FROM attribution_points WHERE target = ? ORDER BY layer, feature, text_id", [target]
        )
