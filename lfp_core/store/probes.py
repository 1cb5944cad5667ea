"""Probes and labels: the token probe's per-word and per-token results, the sequence probe's held-out
predictions, feature weights, the separation PCA, feature labels and the LLM answer cache."""

from __future__ import annotations

import pandas as pd

from lfp_core.store.connection import Queries
from lfp_core.store.schema import table

D = "probes"
PROBE_WORDS = table(
    "probe_words",
    D,
    "role VARCHAR NOT NULL, split VARCHAR NOT NULL, word VARCHAR NOT NULL, "
    "valence DOUBLE, pred DOUBLE, pred_rescaled DOUBLE, n_test INTEGER, "
    "tuned_count INTEGER, abs_error DOUBLE",
    ("role", "split", "word"),
    since=3,
)
PROBE_TOKENS = table(
    "probe_tokens",
    D,
    "role VARCHAR NOT NULL, doc_id INTEGER NOT NULL, pos INTEGER NOT NULL, "
    "word VARCHAR, valence DOUBLE, pred DOUBLE, occurrence_split VARCHAR, "
    "word_split VARCHAR, top_layers INTEGER[], top_features INTEGER[], "
    "top_contributions DOUBLE[]",
    ("role", "doc_id", "pos"),
    since=3,
)
PROBE_FEATURES = table(
    "probe_features",
    D,
    "role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, "
    "weight DOUBLE, mean_act DOUBLE, importance DOUBLE, rank INTEGER",
    ("role", "layer", "feature"),
    since=3,
)
PROBE_PCA = table(
    "probe_pca",
    D,
    "role VARCHAR NOT NULL, task VARCHAR NOT NULL, doc_id INTEGER NOT NULL, label VARCHAR, pc1 DOUBLE, pc2 DOUBLE",
    ("role", "task", "doc_id"),
    since=3,
)
PROBE_SEQUENCES = table(
    "probe_sequences",
    D,
    "role VARCHAR NOT NULL, policy VARCHAR NOT NULL, prompt_id INTEGER NOT NULL, sample_idx INTEGER NOT NULL, "
    "reward DOUBLE, pred DOUBLE, n_tokens INTEGER",
    ("role", "policy", "prompt_id", "sample_idx"),
    since=6,
)
FEATURE_LABELS = table(
    "feature_labels",
    D,
    "role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, "
    "labeller VARCHAR NOT NULL, explanation VARCHAR, relevant BOOLEAN, "
    "detection_acc DOUBLE, detection_f1 DOUBLE, detection_auc DOUBLE, "
    "n_unparsed INTEGER, selection VARCHAR, detection_n INTEGER, "
    "relevance_rho DOUBLE, model VARCHAR",
    ("role", "layer", "feature"),
    since=3,
)
LLM_CACHE = table(
    "llm_cache",
    D,
    "key VARCHAR, model VARCHAR NOT NULL, prompt VARCHAR NOT NULL, "
    "response VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL",
    ("key",),
    since=4,
)


class ProbeQueries(Queries):
    def probe_words(self, role: str = "tuned") -> pd.DataFrame:
        """Per test word and split: valence, mean prediction (raw and rescaled), error, counts."""
        return self._query("SELECT * FROM probe_words WHERE role = ? ORDER BY split, word", [role])

    def probe_tokens(self, role: str = "tuned") -> pd.DataFrame:
        """Every scored position: word, valence, out-of-fold prediction, its splits and top contributions."""
        return self._query("SELECT * FROM probe_tokens WHERE role = ? ORDER BY doc_id, pos", [role])

    def probe_point_docs(self, role: str = "tuned") -> list[int]:
        """Ids of the documents holding at least one of the probe's points (the text the probe was fitted
        and ranked on), ascending."""
        df = self._query("SELECT DISTINCT doc_id FROM probe_tokens WHERE role = ? ORDER BY doc_id", [role])
        return [int(d) for d in df.doc_id]

    def probe_docs(self, role: str = "tuned", limit: int = 200) -> pd.DataFrame:
        """Documents with the most scored words, for the token-score viewer."""
        return self._query(
            "SELECT t.doc_id, d.source, count(*) AS n_words, any_value(d.text) AS text "
            "FROM probe_tokens t JOIN act_docs d USING (doc_id) WHERE t.role = ? "
            "GROUP BY t.doc_id, d.source ORDER BY n_words DESC, t.doc_id LIMIT ?",
            [role, int(limit)],
        )

    def probe_doc(self, role: str, doc_id: int) -> tuple[dict | None, pd.DataFrame]:
        """One document (token ids) and its scored positions with their top contributing features."""
        doc = self._query("SELECT * FROM act_docs WHERE doc_id = ?", [int(doc_id)])
        toks = self._query("SELECT * FROM probe_tokens WHERE role = ? AND doc_id = ? ORDER BY pos", [role, int(doc_id)])
        return (None if doc.empty else doc.iloc[0].to_dict()), toks

    def probe_features(self, role: str = "tuned", limit: int | None = 50) -> pd.DataFrame:
        """Probe weights per (layer, feature), by attribution rank (the first ``limit``; all when None)."""
        if limit is None:
            return self._query("SELECT * FROM probe_features WHERE role = ? ORDER BY rank", [role])
        return self._query("SELECT * FROM probe_features WHERE role = ? ORDER BY rank LIMIT ?", [role, int(limit)])

    def firing_probe_features(self, role: str = "tuned") -> pd.DataFrame:
        """(layer, feature) of the probe's features that fired at least once, by probe rank."""
        return self._query(
            "SELECT p.layer, p.feature FROM probe_features p JOIN features f USING (role, layer, feature) "
            "WHERE p.role = ? AND f.n_fired > 0 ORDER BY p.rank",
            [role],
        )

    def probe_pca(self, role: str = "tuned", task: str = "imdb") -> pd.DataFrame:
        return self._query("SELECT * FROM probe_pca WHERE role = ? AND task = ? ORDER BY doc_id", [role, task])

    def probe_sequences(self, role: str = "tuned") -> pd.DataFrame:
        """The sequence probe's held-out completions: which ``policy`` wrote each, its reward, the prediction of
        the probe on ``role``'s features (fitted on the training prompts only) and its token count; empty
        for a run without the sequence probe."""
        return self._query(
            "SELECT * FROM probe_sequences WHERE role = ? ORDER BY prompt_id, policy, sample_idx", [role]
        )

    def labels(self, role: str | None = None) -> pd.DataFrame:
        """Every feature label with the feature's probe rank and density."""
        return self._query(
            "SELECT l.*, p.rank AS probe_rank, p.weight AS probe_weight, f.density, f.top_tokens "
            "FROM feature_labels l LEFT JOIN probe_features p USING (role, layer, feature) "
            "LEFT JOIN features f USING (role, layer, feature) "
            "WHERE (CAST(? AS VARCHAR) IS NULL OR l.role = ?) ORDER BY l.role DESC, p.rank NULLS LAST, "
            "l.layer, l.feature",
            [role, role],
        )

    def llm_cached(self, key: str) -> str | None:
        df = self._query("SELECT response FROM llm_cache WHERE key = ?", [key])
        return None if df.empty else str(df.response.iloc[0])
