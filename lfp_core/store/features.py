"""SAEs and features: the activation corpus and vocabulary, trained SAEs and their comparisons, and the
per-feature statistics and examples the feature pages show."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from lfp_core.store.connection import Queries
from lfp_core.store.schema import table

D = "features"
ACT_DOCS = table(
    "act_docs",
    D,
    "doc_id INTEGER, source VARCHAR NOT NULL, split VARCHAR NOT NULL, "
    "n_tokens INTEGER NOT NULL, token_ids INTEGER[] NOT NULL, text VARCHAR NOT NULL, "
    "label VARCHAR, prompt_id INTEGER, sample_idx INTEGER, n_prefix INTEGER",
    ("doc_id",),
    since=2,
)
VOCAB = table("vocab", D, "token_id INTEGER, text VARCHAR NOT NULL", ("token_id",), since=3)
SAES = table(
    "saes",
    D,
    "sae_id VARCHAR, role VARCHAR NOT NULL, layer INTEGER NOT NULL, kind VARCHAR NOT NULL, "
    "arch VARCHAR NOT NULL, d_sae INTEGER, k INTEGER, l1_coefficient DOUBLE, seed INTEGER, "
    "hook_name VARCHAR, path VARCHAR, train_tokens BIGINT, seconds DOUBLE, mse DOUBLE, fvu DOUBLE, "
    "l0 DOUBLE, dead_frac DOUBLE, dead_tokens BIGINT, n_eval_tokens BIGINT, cos_sim DOUBLE, "
    "l2_ratio DOUBLE, ce_clean DOUBLE, ce_spliced DOUBLE, ce_zero DOUBLE, ce_loss_recovered DOUBLE, "
    "ce_tokens BIGINT",
    ("sae_id",),
    since=2,
)
SAE_PAIRS = table(
    "sae_pairs",
    D,
    "a VARCHAR NOT NULL, b VARCHAR NOT NULL, comparison VARCHAR NOT NULL, layer INTEGER, "
    "mmcs_hungarian DOUBLE, mmcs_max DOUBLE",
    ("a", "b"),
    since=2,
)
FEATURES = table(
    "features",
    D,
    "role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, density DOUBLE, "
    "n_fired BIGINT, mean_act DOUBLE, max_act DOUBLE, hist_counts BIGINT[], "
    "top_tokens VARCHAR[], freq_base_text DOUBLE, freq_tuned_text DOUBLE, "
    "top_logit_tokens VARCHAR[], top_logit_values DOUBLE[], bottom_logit_tokens VARCHAR[], "
    "bottom_logit_values DOUBLE[], neighbours INTEGER[], neighbour_cos DOUBLE[]",
    ("role", "layer", "feature"),
    added={"top_tokens": 3},
    indexes={"features_by_density": ("role", "layer", "density")},
    since=2,
)
FEATURE_EXAMPLES = table(
    "feature_examples",
    D,
    "role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, "
    "kind VARCHAR NOT NULL, rank INTEGER NOT NULL, interval INTEGER, "
    "doc_id INTEGER, pos INTEGER, act DOUBLE, center INTEGER, tokens VARCHAR[], "
    "token_ids INTEGER[], acts DOUBLE[]",
    indexes={"feature_examples_by_feature": ("role", "layer", "feature")},
    since=2,
)

# Feature-browser sort keys -> SQL expressions (the only values ever placed in ORDER BY).
FEATURE_SORTS = {
    "probe_rank": "p.rank",
    "probe_weight": "abs(p.weight)",
    "density": "f.density",
    "max_act": "f.max_act",
    "freq_shift": "abs(f.freq_tuned_text - f.freq_base_text)",
    "feature": "f.feature",
    "layer": "f.layer",
}
COMPLETION_SOURCES = ("base_completion", "tuned_completion")


class FeatureQueries(Queries):
    # --- the activation corpus -------------------------------------------------------------------
    def act_docs_summary(self) -> pd.DataFrame:
        """The activation corpus: documents and tokens per text source and split."""
        return self._query(
            "SELECT source, split, count(*) AS docs, sum(n_tokens) AS tokens FROM act_docs "
            "GROUP BY source, split ORDER BY source, split"
        )

    def act_docs(self, doc_ids: Sequence[int]) -> pd.DataFrame:
        """Every column of the given documents, by id."""
        return self._query(
            "SELECT * FROM act_docs WHERE doc_id IN (SELECT unnest(?)) ORDER BY doc_id", [list(map(int, doc_ids))]
        )

    def corpus_docs(
        self,
        sources: Sequence[str] | None = None,
        split: str | None = None,
        completions: bool | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Documents of the activation corpus in id order, without their text: doc_id, source, split,
        n_tokens, token_ids, label, prompt_id, sample_idx, n_prefix.

        Args:
            sources: only these sources (e.g. ``["imdb", "tuned_completion"]``); all when None.
            split: only 'train' or 'eval' documents.
            completions: True: only model completions; False: none of them (the text corpus); None: both.
            limit: at most this many (the first by id).
        """
        where: list[str] = []
        params: list[Any] = []
        if sources is not None:
            where.append("list_contains(?::VARCHAR[], source)")
            params.append(list(sources))
        if split is not None:
            where.append("split = ?")
            params.append(split)
        if completions is not None:
            where.append(("" if completions else "NOT ") + "list_contains(?::VARCHAR[], source)")
            params.append(list(COMPLETION_SOURCES))
        sql = (
            "SELECT doc_id, source, split, n_tokens, token_ids, label, prompt_id, sample_idx, n_prefix FROM act_docs "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "ORDER BY doc_id"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self._query(sql, params)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Display strings of token ids (the model's vocabulary, stored by the activations stage)."""
        df = self._query(
            "SELECT token_id, text FROM vocab WHERE token_id IN (SELECT unnest(?))",
            [sorted({int(t) for t in token_ids})],
        )
        text = dict(zip(df.token_id.astype(int), df.text))
        return [text.get(int(t), f"<{int(t)}>") for t in token_ids]

    # --- SAEs --------------------------------------------------------------------------------------
    def saes(self, kind: str | None = None) -> pd.DataFrame:
        """Trained SAEs with their metrics; ``kind`` is main, variant, sweep, mfr, independent or rm."""
        sql = "SELECT * FROM saes"
        if kind is not None:
            return self._query(sql + " WHERE kind = ? ORDER BY role DESC, layer, sae_id", [kind])
        return self._query(sql + " ORDER BY kind, role DESC, layer, sae_id")

    def sae_pairs(self) -> pd.DataFrame:
        return self._query("SELECT * FROM sae_pairs ORDER BY comparison, layer, a, b")

    # --- features ----------------------------------------------------------------------------------
    def feature_layers(self) -> pd.DataFrame:
        """(role, layer, n_features) of the SAEs whose features were analysed."""
        return self._query(
            "SELECT role, layer, count(*) AS n_features FROM features GROUP BY role, layer ORDER BY role DESC, layer"
        )

    def features(self, role: str, layer: int) -> pd.DataFrame:
        """Summary statistics of every feature of one (role, layer) SAE."""
        return self._query(
            "SELECT feature, density, n_fired, mean_act, max_act, freq_base_text, freq_tuned_text "
            "FROM features WHERE role = ? AND layer = ? ORDER BY feature",
            [role, int(layer)],
        )

    def feature(self, role: str, layer: int, feature: int) -> dict | None:
        """One feature's statistics with its probe weight/rank and label (None where absent)."""
        df = self._query(
            "SELECT f.*, p.weight AS probe_weight, p.importance AS probe_importance, p.rank AS probe_rank, "
            "p.mean_act AS probe_mean_act, l.labeller, l.explanation, l.relevant, l.detection_acc, "
            "l.detection_f1 FROM features f LEFT JOIN probe_features p USING (role, layer, feature) "
            "LEFT JOIN feature_labels l USING (role, layer, feature) "
            "WHERE f.role = ? AND f.layer = ? AND f.feature = ?",
            [role, int(layer), int(feature)],
        )
        return None if df.empty else df.iloc[0].to_dict()

    def feature_table(
        self,
        role: str | None = None,
        layer: int | None = None,
        search: str = "",
        min_density: float = 0.0,
        relevant_only: bool = False,
        sort: str = "probe_rank",
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[pd.DataFrame, int]:
        """A page of the feature browser and the number of features matching the filters.

        ``search`` is matched (case-insensitive substring) against the label and the top tokens;
        ``sort`` is one of :data:`FEATURE_SORTS`. Every user value is a bound parameter.
        """
        if sort not in FEATURE_SORTS:
            raise ValueError(f"cannot sort by {sort!r}; choose one of {', '.join(FEATURE_SORTS)}")
        needle = search.strip().lower()
        df = self._query(
            "SELECT f.role, f.layer, f.feature, f.density, f.max_act, f.freq_tuned_text - f.freq_base_text AS freq_shift, "
            "p.weight AS probe_weight, p.rank AS probe_rank, l.explanation AS label, l.relevant, l.labeller, "
            "f.top_tokens, count(*) OVER () AS n_match "
            "FROM features f LEFT JOIN probe_features p USING (role, layer, feature) "
            "LEFT JOIN feature_labels l USING (role, layer, feature) "
            "WHERE (CAST(? AS VARCHAR) IS NULL OR f.role = ?) AND (CAST(? AS INTEGER) IS NULL OR f.layer = ?) "
            "AND f.density >= ? AND (NOT ? OR l.relevant) "
            "AND (? = '' OR contains(lower(coalesce(l.explanation, '')), ?) "
            "     OR contains(lower(array_to_string(f.top_tokens, chr(31))), ?)) "
            f"ORDER BY {FEATURE_SORTS[sort]} {'DESC' if descending else 'ASC'} NULLS LAST, f.role DESC, f.layer, f.feature "
            "LIMIT ? OFFSET ?",
            [
                role,
                role,
                layer,
                layer,
                float(min_density),
                bool(relevant_only),
                needle,
                needle,
                needle,
                int(limit),
                int(offset),
            ],
        )
        n = int(df.n_match.iloc[0]) if len(df) else 0
        return df.drop(columns="n_match"), n

    def feature_examples(self, role: str, layer: int, feature: int, kind: str = "top") -> pd.DataFrame:
        """A feature's stored contexts: ``top`` (by activation) or ``interval`` (samples per activation interval)."""
        return self._query(
            "SELECT * FROM feature_examples WHERE role = ? AND layer = ? AND feature = ? AND kind = ? "
            "ORDER BY interval DESC, rank",
            [role, int(layer), int(feature), kind],
        )

    def firing_features(self, role: str) -> dict[int, list[int]]:
        """{layer: feature ids that fired at least once} of ``role``'s analysed SAEs."""
        df = self._query(
            "SELECT layer, list(feature ORDER BY feature) AS ids FROM features WHERE role = ? AND n_fired > 0 "
            "GROUP BY layer ORDER BY layer",
            [role],
        )
        return {int(a): [int(x) for x in b] for a, b in zip(df.layer, df.ids)}
