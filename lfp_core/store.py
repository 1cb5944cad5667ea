"""The run store: one DuckDB file per run plus a folder for weight files.

This module owns the schema and is the only code that writes SQL. Precompute writes through a
:class:`RunWriter` (every stage's write is one transaction, so a crash leaves no half-written
table); the dashboard and reports read through a :class:`RunReader` opened read-only.

Layout of a run directory::

    RUN_DIR/run.duckdb      the tables below
    RUN_DIR/artifacts/      weight files (tuned policies, SAEs), written via temp file + rename

Writers hold the database only while they write (DuckDB lets one process write *or* many read),
so a dashboard can read a run between the writes of a precompute that is still going.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
# Versions a writer upgrades in place: their tables are a subset of the current schema's, so
# creating the missing tables and adding the columns of _ADDED_COLUMNS is the whole migration
# (computed stages are kept; a stage whose output gained a column is re-run by its version).
_UPGRADABLE = {1, 2, 3}
_ADDED_COLUMNS = [("features", "top_tokens", "VARCHAR[]")]  # (table, column, type) added in version 3
DB_NAME = "run.duckdb"
ARTIFACTS = "artifacts"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS run (
    name VARCHAR NOT NULL, preset VARCHAR, config_json VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS stages (
    name VARCHAR PRIMARY KEY, position INTEGER, config_hash VARCHAR, status VARCHAR NOT NULL,
    started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE, detail_json VARCHAR, error VARCHAR);
CREATE TABLE IF NOT EXISTS stage_chunks (
    stage VARCHAR NOT NULL, config_hash VARCHAR NOT NULL, chunk INTEGER NOT NULL,
    PRIMARY KEY (stage, chunk));
CREATE TABLE IF NOT EXISTS models (
    role VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR, location VARCHAR,
    architecture VARCHAR, n_params BIGINT, n_layers INTEGER, d_model INTEGER, vocab_size INTEGER);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id INTEGER PRIMARY KEY, split VARCHAR NOT NULL, source VARCHAR NOT NULL, doc_id VARCHAR,
    n_tokens INTEGER NOT NULL, token_ids INTEGER[] NOT NULL, text VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS completions (
    role VARCHAR NOT NULL, prompt_id INTEGER NOT NULL, sample_idx INTEGER NOT NULL,
    seed BIGINT NOT NULL, n_new INTEGER NOT NULL, token_ids INTEGER[] NOT NULL,
    text VARCHAR NOT NULL, reward DOUBLE NOT NULL, raw_score DOUBLE NOT NULL,
    lexicon_words VARCHAR[], lexicon_valences DOUBLE[],
    PRIMARY KEY (role, prompt_id, sample_idx));
CREATE TABLE IF NOT EXISTS rl_steps (
    step INTEGER PRIMARY KEY, reward DOUBLE, reward_std DOUBLE, kl DOUBLE, mean_length DOUBLE,
    loss DOUBLE, accuracy DOUBLE);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id INTEGER PRIMARY KEY, split VARCHAR NOT NULL, subset VARCHAR, prompt VARCHAR NOT NULL,
    chosen VARCHAR NOT NULL, rejected VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS rl_samples (
    step INTEGER NOT NULL, idx INTEGER NOT NULL, prompt VARCHAR, completion VARCHAR, reward DOUBLE,
    PRIMARY KEY (step, idx));
CREATE TABLE IF NOT EXISTS word_shifts (
    word VARCHAR PRIMARY KEY, base_count INTEGER, tuned_count INTEGER, delta INTEGER, valence DOUBLE,
    direction VARCHAR);
CREATE TABLE IF NOT EXISTS layer_divergence (
    layer INTEGER PRIMARY KEY, param DOUBLE, act_cos DOUBLE, act_rel_l2 DOUBLE, selected BOOLEAN);
CREATE TABLE IF NOT EXISTS act_docs (
    doc_id INTEGER PRIMARY KEY, source VARCHAR NOT NULL, split VARCHAR NOT NULL, n_tokens INTEGER NOT NULL,
    token_ids INTEGER[] NOT NULL, text VARCHAR NOT NULL, label VARCHAR, prompt_id INTEGER, sample_idx INTEGER,
    n_prefix INTEGER);
CREATE TABLE IF NOT EXISTS saes (
    sae_id VARCHAR PRIMARY KEY, role VARCHAR NOT NULL, layer INTEGER NOT NULL, kind VARCHAR NOT NULL,
    arch VARCHAR NOT NULL, d_sae INTEGER, k INTEGER, l1_coefficient DOUBLE, seed INTEGER, hook_name VARCHAR,
    path VARCHAR, train_tokens BIGINT, seconds DOUBLE, mse DOUBLE, fvu DOUBLE, l0 DOUBLE, dead_frac DOUBLE,
    dead_tokens BIGINT, n_eval_tokens BIGINT, cos_sim DOUBLE, l2_ratio DOUBLE, ce_clean DOUBLE, ce_spliced DOUBLE,
    ce_zero DOUBLE, ce_loss_recovered DOUBLE, ce_tokens BIGINT);
CREATE TABLE IF NOT EXISTS sae_pairs (
    a VARCHAR NOT NULL, b VARCHAR NOT NULL, comparison VARCHAR NOT NULL, layer INTEGER,
    mmcs_hungarian DOUBLE, mmcs_max DOUBLE, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS features (
    role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, density DOUBLE, n_fired BIGINT,
    mean_act DOUBLE, max_act DOUBLE, hist_counts BIGINT[], top_tokens VARCHAR[], freq_base_text DOUBLE,
    freq_tuned_text DOUBLE,
    top_logit_tokens VARCHAR[], top_logit_values DOUBLE[], bottom_logit_tokens VARCHAR[],
    bottom_logit_values DOUBLE[], neighbours INTEGER[], neighbour_cos DOUBLE[],
    PRIMARY KEY (role, layer, feature));
CREATE TABLE IF NOT EXISTS feature_examples (
    role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, kind VARCHAR NOT NULL,
    rank INTEGER NOT NULL, interval INTEGER, doc_id INTEGER, pos INTEGER, act DOUBLE, center INTEGER,
    tokens VARCHAR[], token_ids INTEGER[], acts DOUBLE[]);
CREATE INDEX IF NOT EXISTS feature_examples_by_feature ON feature_examples (role, layer, feature);
CREATE INDEX IF NOT EXISTS features_by_density ON features (role, layer, density);
CREATE TABLE IF NOT EXISTS feature_labels (
    role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, labeller VARCHAR NOT NULL,
    explanation VARCHAR, relevant BOOLEAN, detection_acc DOUBLE, detection_f1 DOUBLE, detection_auc DOUBLE,
    n_unparsed INTEGER, selection VARCHAR, detection_n INTEGER, relevance_rho DOUBLE, model VARCHAR,
    PRIMARY KEY (role, layer, feature));
CREATE TABLE IF NOT EXISTS llm_cache (
    key VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, prompt VARCHAR NOT NULL, response VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS vocab (token_id INTEGER PRIMARY KEY, text VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS probe_words (
    role VARCHAR NOT NULL, split VARCHAR NOT NULL, word VARCHAR NOT NULL, valence DOUBLE, pred DOUBLE,
    pred_rescaled DOUBLE, n_test INTEGER, tuned_count INTEGER, abs_error DOUBLE, PRIMARY KEY (role, split, word));
CREATE TABLE IF NOT EXISTS probe_tokens (
    role VARCHAR NOT NULL, doc_id INTEGER NOT NULL, pos INTEGER NOT NULL, word VARCHAR, valence DOUBLE,
    pred DOUBLE, occurrence_split VARCHAR, word_split VARCHAR, top_layers INTEGER[], top_features INTEGER[],
    top_contributions DOUBLE[], PRIMARY KEY (role, doc_id, pos));
CREATE TABLE IF NOT EXISTS probe_features (
    role VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, weight DOUBLE, mean_act DOUBLE,
    importance DOUBLE, rank INTEGER, PRIMARY KEY (role, layer, feature));
CREATE TABLE IF NOT EXISTS probe_pca (
    role VARCHAR NOT NULL, task VARCHAR NOT NULL, doc_id INTEGER NOT NULL, label VARCHAR, pc1 DOUBLE, pc2 DOUBLE,
    PRIMARY KEY (role, task, doc_id));
CREATE TABLE IF NOT EXISTS ablation_prefixes (
    prefix_id INTEGER PRIMARY KEY, token_ids INTEGER[], text VARCHAR, n_new INTEGER);
CREATE TABLE IF NOT EXISTS ablation_sets (
    set_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, control_of VARCHAR, size INTEGER, layers INTEGER[],
    features INTEGER[], n INTEGER, before DOUBLE, before_lo DOUBLE, before_hi DOUBLE, after DOUBLE, after_lo DOUBLE,
    after_hi DOUBLE, diff DOUBLE, diff_lo DOUBLE, diff_hi DOUBLE, p_rank DOUBLE, p DOUBLE, lower_than_all BOOLEAN);
CREATE TABLE IF NOT EXISTS ablation_completions (
    set_id VARCHAR NOT NULL, prefix_id INTEGER NOT NULL, token_ids INTEGER[], text VARCHAR, reward DOUBLE,
    PRIMARY KEY (set_id, prefix_id));
CREATE TABLE IF NOT EXISTS rm_pairs (
    pair_id INTEGER PRIMARY KEY, split VARCHAR NOT NULL, prompt_id INTEGER, prompt VARCHAR, chosen VARCHAR,
    rejected VARCHAR, chosen_ids INTEGER[], rejected_ids INTEGER[], chosen_oracle DOUBLE, rejected_oracle DOUBLE, chosen_pm DOUBLE, rejected_pm DOUBLE);
CREATE TABLE IF NOT EXISTS attribution (
    target VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, estimate DOUBLE, estimate_abs DOUBLE,
    true_effect DOUBLE, rank INTEGER, n_texts INTEGER, contrast DOUBLE, top_tokens VARCHAR[],
    PRIMARY KEY (target, layer, feature));
CREATE TABLE IF NOT EXISTS attribution_points (
    target VARCHAR NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, text_id INTEGER NOT NULL,
    estimate DOUBLE, true_effect DOUBLE, PRIMARY KEY (target, layer, feature, text_id));
"""
_TABLES = ("meta", "run", "stages", "stage_chunks", "models", "prompts", "completions", "rl_steps",
           "rl_samples", "word_shifts", "layer_divergence", "pairs", "act_docs", "saes", "sae_pairs", "features",
           "feature_examples", "feature_labels", "llm_cache", "vocab", "probe_words", "probe_tokens", "probe_features", "probe_pca",
           "ablation_prefixes", "ablation_sets", "ablation_completions", "rm_pairs", "attribution",
           "attribution_points")


# Feature-browser sort keys -> SQL expressions (the only values ever placed in ORDER BY).
FEATURE_SORTS = {"probe_rank": "p.rank", "probe_weight": "abs(p.weight)", "density": "f.density",
                 "max_act": "f.max_act", "freq_shift": "abs(f.freq_tuned_text - f.freq_base_text)",
                 "feature": "f.feature", "layer": "f.layer"}


class StoreError(RuntimeError):
    """Base class of run-store errors; messages say what is wrong and what to do."""


class RunNotFoundError(StoreError):
    pass


class SchemaVersionError(StoreError):
    pass


class CorruptStoreError(StoreError):
    pass


class StoreBusyError(StoreError):
    pass


def db_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / DB_NAME


def artifacts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ARTIFACTS


def _now() -> dt.datetime:
    return dt.datetime.now().replace(microsecond=0)


def _connect(path: Path, read_only: bool, retries: int = 20) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, turning DuckDB's errors into specific StoreErrors.

    A lock held by another process (a precompute writing) is retried for a few seconds.
    """
    for attempt in range(retries):
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "lock" in msg.lower() and attempt < retries - 1:
                time.sleep(0.25)
                continue
            if "lock" in msg.lower():
                raise StoreBusyError(
                    f"{path} is locked by another process (a precompute writing to it?); try again shortly"
                ) from exc
            raise CorruptStoreError(
                f"{path} is not a readable DuckDB database ({msg.splitlines()[0]}). "
                f"Move it aside and rebuild the run with python -m lfp_core.precompute --out {path.parent}"
            ) from exc
        except duckdb.Error as exc:
            raise CorruptStoreError(
                f"{path} could not be opened as a DuckDB database ({str(exc).splitlines()[0]}). "
                f"Move it aside and rebuild the run with python -m lfp_core.precompute --out {path.parent}"
            ) from exc
    raise AssertionError("unreachable")


def _check_schema(con: duckdb.DuckDBPyConnection, path: Path, upgrade: bool = False) -> None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException as exc:
        raise SchemaVersionError(
            f"{path} is a DuckDB file but not an LFP Explorer run (no meta table). "
            f"Point at a run directory made by python -m lfp_core.precompute"
        ) from exc
    version = int(row[0]) if row else None
    if version == SCHEMA_VERSION:
        return
    if version in _UPGRADABLE:
        if upgrade:
            for table, column, kind in _ADDED_COLUMNS:  # before _SCHEMA, whose indexes may name new columns
                if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                               [table]).fetchone()[0]:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
            con.execute(_SCHEMA)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            log.info("upgraded %s from schema version %s to %s", path, version, SCHEMA_VERSION)
            return
        raise SchemaVersionError(
            f"{path} has run-store schema version {version}; this LFP Explorer reads version {SCHEMA_VERSION}. "
            f"Upgrade it in place (computed stages are kept): python -m lfp_core.precompute --out {path.parent}"
        )
    raise SchemaVersionError(
        f"{path} has run-store schema version {version}; this LFP Explorer reads version "
        f"{SCHEMA_VERSION}. Rebuild it: python -m lfp_core.precompute --out {path.parent} --rebuild"
    )


@dataclass
class StageRecord:
    name: str
    position: int | None
    config_hash: str | None
    status: str
    seconds: float | None
    detail: dict
    error: str | None


class RunReader:
    """Read-only access to a run.

    By default each query opens and closes its own connection. With ``keep_open`` (the dashboard)
    one read-only connection is reused while queries keep coming and released after ``idle_s``
    seconds without one, because DuckDB lets a file be open by one writing process *or* by
    readers: a precompute can write to the run between a user's clicks (its writer retries for a
    few seconds).
    """

    def __init__(self, run_dir: str | Path, keep_open: bool = False, idle_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.path = db_path(self.run_dir)
        self.keep_open, self.idle_s = keep_open, idle_s
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if not self.run_dir.exists():
            raise RunNotFoundError(f"run directory {self.run_dir} does not exist")
        if not self.run_dir.is_dir():
            raise RunNotFoundError(f"{self.run_dir} is a file, not a run directory")
        if not self.path.exists():
            raise RunNotFoundError(
                f"{self.run_dir} holds no {DB_NAME}; compute it with python -m lfp_core.precompute --out {self.run_dir}"
            )
        with self.connect() as con:
            _check_schema(con, self.path)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.keep_open:
            con = _connect(self.path, read_only=True)
            try:
                yield con
            finally:
                con.close()
            return
        with self._lock:  # one query at a time on the shared connection; the idle timer waits for it
            if self._timer is not None:
                self._timer.cancel()
            if self._con is None:
                if not self.path.exists():
                    raise RunNotFoundError(f"run directory {self.run_dir} (or its {DB_NAME}) no longer exists")
                self._con = _connect(self.path, read_only=True)
            try:
                yield self._con
            finally:
                self._timer = threading.Timer(self.idle_s, self.close)
                self._timer.daemon = True
                self._timer.start()

    def close(self) -> None:
        """Release the kept connection (reopened by the next query)."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run a parameterised read query (internal: pages call the typed functions below)."""
        with self.connect() as con:
            return con.execute(sql, list(params)).df()

    def run_info(self) -> dict:
        df = self.query("SELECT name, preset, config_json, created_at, updated_at FROM run")
        if df.empty:
            return {}
        row = df.iloc[0]
        return {
            "name": row["name"], "preset": row["preset"], "config": json.loads(row["config_json"]),
            "created_at": str(row["created_at"]), "updated_at": str(row["updated_at"]),
        }

    def stages(self) -> list[StageRecord]:
        df = self.query(
            "SELECT name, position, config_hash, status, seconds, detail_json, error FROM stages ORDER BY position, name"
        )
        return [
            StageRecord(r.name, None if pd.isna(r.position) else int(r.position), r.config_hash, r.status,
                        None if pd.isna(r.seconds) else float(r.seconds),
                        json.loads(r.detail_json) if r.detail_json else {}, r.error)
            for r in df.itertuples()
        ]

    def model_info(self, role: str = "base") -> dict | None:
        df = self.query("SELECT * FROM models WHERE role = ?", [role])
        return None if df.empty else {k: (v.item() if hasattr(v, "item") else v) for k, v in df.iloc[0].items()}

    def prompts(self, split: str | None = None) -> pd.DataFrame:
        """Prompts of one split ('train': RL prompts, 'eval': held-out), or all when None."""
        sql = "SELECT prompt_id, split, source, doc_id, n_tokens, token_ids, text FROM prompts"
        if split is not None:
            return self.query(sql + " WHERE split = ? ORDER BY prompt_id", [split])
        return self.query(sql + " ORDER BY prompt_id")

    def completions(self, role: str = "base", limit: int | None = None, order: str = "id") -> pd.DataFrame:
        """Completions of a policy role with their prompts; ``order`` is 'id', 'reward' or '-reward'."""
        order_sql = {"id": "c.prompt_id, c.sample_idx", "reward": "c.reward ASC, c.prompt_id",
                     "-reward": "c.reward DESC, c.prompt_id"}[order]
        sql = (
            "SELECT c.prompt_id, c.sample_idx, p.text AS prompt, c.text AS completion, c.n_new, "
            "c.reward, c.raw_score, c.lexicon_words, c.lexicon_valences, c.token_ids, c.seed "
            f"FROM completions c JOIN prompts p USING (prompt_id) WHERE c.role = ? ORDER BY {order_sql}"
        )
        params: list[Any] = [role]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self.query(sql, params)

    def paired_completions(self, limit: int | None = None) -> pd.DataFrame:
        """Base and tuned completions of the same held-out prompt and seed, side by side."""
        sql = ("SELECT b.prompt_id, b.sample_idx, p.text AS prompt, b.text AS base, b.reward AS base_reward, "
               "t.text AS tuned, t.reward AS tuned_reward FROM completions b "
               "JOIN completions t ON t.role = 'tuned' AND t.prompt_id = b.prompt_id AND t.sample_idx = b.sample_idx "
               "JOIN prompts p ON p.prompt_id = b.prompt_id WHERE b.role = 'base' ORDER BY b.prompt_id, b.sample_idx")
        return self.query(sql + (" LIMIT ?" if limit is not None else ""), [int(limit)] if limit is not None else [])

    def pairs(self, split: str | None = None) -> pd.DataFrame:
        """HH preference pairs of one split ('train' or 'eval'), or all."""
        sql = "SELECT * FROM pairs"
        if split is not None:
            return self.query(sql + " WHERE split = ? ORDER BY pair_id", [split])
        return self.query(sql + " ORDER BY pair_id")

    def rl_steps(self) -> pd.DataFrame:
        return self.query("SELECT * FROM rl_steps ORDER BY step")

    def rl_samples(self) -> pd.DataFrame:
        return self.query("SELECT * FROM rl_samples ORDER BY step, idx")

    def word_shifts(self) -> pd.DataFrame:
        return self.query("SELECT * FROM word_shifts ORDER BY direction DESC, abs(delta) DESC, word")

    def layer_divergence(self) -> pd.DataFrame:
        return self.query("SELECT * FROM layer_divergence ORDER BY layer")

    # --- SAEs and features -----------------------------------------------------------------
    def act_docs_summary(self) -> pd.DataFrame:
        """The activation corpus: documents and tokens per text source and split."""
        return self.query("SELECT source, split, count(*) AS docs, sum(n_tokens) AS tokens FROM act_docs "
                          "GROUP BY source, split ORDER BY source, split")

    def act_docs(self, doc_ids: Sequence[int]) -> pd.DataFrame:
        return self.query("SELECT * FROM act_docs WHERE doc_id IN (SELECT unnest(?)) ORDER BY doc_id",
                          [list(map(int, doc_ids))])

    def saes(self, kind: str | None = None) -> pd.DataFrame:
        """Trained SAEs with their metrics; ``kind`` is main, variant, sweep, mfr or independent."""
        sql = "SELECT * FROM saes"
        if kind is not None:
            return self.query(sql + " WHERE kind = ? ORDER BY role DESC, layer, sae_id", [kind])
        return self.query(sql + " ORDER BY kind, role DESC, layer, sae_id")

    def sae_pairs(self) -> pd.DataFrame:
        return self.query("SELECT * FROM sae_pairs ORDER BY comparison, layer, a, b")

    def feature_layers(self) -> pd.DataFrame:
        """(role, layer, n_features) of the SAEs whose features were analysed."""
        return self.query("SELECT role, layer, count(*) AS n_features FROM features GROUP BY role, layer "
                          "ORDER BY role DESC, layer")

    def features(self, role: str, layer: int) -> pd.DataFrame:
        """Summary statistics of every feature of one (role, layer) SAE."""
        return self.query("SELECT feature, density, n_fired, mean_act, max_act, freq_base_text, freq_tuned_text "
                          "FROM features WHERE role = ? AND layer = ? ORDER BY feature", [role, int(layer)])

    def feature(self, role: str, layer: int, feature: int) -> dict | None:
        """One feature's statistics with its probe weight/rank and label (None where absent)."""
        df = self.query("SELECT f.*, p.weight AS probe_weight, p.importance AS probe_importance, p.rank AS probe_rank, "
                        "p.mean_act AS probe_mean_act, l.labeller, l.explanation, l.relevant, l.detection_acc, "
                        "l.detection_f1 FROM features f LEFT JOIN probe_features p USING (role, layer, feature) "
                        "LEFT JOIN feature_labels l USING (role, layer, feature) "
                        "WHERE f.role = ? AND f.layer = ? AND f.feature = ?", [role, int(layer), int(feature)])
        return None if df.empty else df.iloc[0].to_dict()

    def feature_table(self, role: str | None = None, layer: int | None = None, search: str = "",
                      min_density: float = 0.0, relevant_only: bool = False, sort: str = "probe_rank",
                      descending: bool = False, limit: int = 100, offset: int = 0) -> tuple[pd.DataFrame, int]:
        """A page of the feature browser and the number of features matching the filters.

        ``search`` is matched (case-insensitive substring) against the label and the top tokens;
        ``sort`` is one of :data:`FEATURE_SORTS`. Every user value is a bound parameter.
        """
        if sort not in FEATURE_SORTS:
            raise ValueError(f"cannot sort by {sort!r}; choose one of {', '.join(FEATURE_SORTS)}")
        needle = search.strip().lower()
        df = self.query(
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
            [role, role, layer, layer, float(min_density), bool(relevant_only), needle, needle, needle,
             int(limit), int(offset)])
        n = int(df.n_match.iloc[0]) if len(df) else 0
        return df.drop(columns="n_match"), n

    def feature_examples(self, role: str, layer: int, feature: int, kind: str = "top") -> pd.DataFrame:
        return self.query("SELECT * FROM feature_examples WHERE role = ? AND layer = ? AND feature = ? AND kind = ? "
                          "ORDER BY interval DESC, rank", [role, int(layer), int(feature), kind])

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Display strings of token ids (the model's vocabulary, stored by the activations stage)."""
        df = self.query("SELECT token_id, text FROM vocab WHERE token_id IN (SELECT unnest(?))",
                        [sorted({int(t) for t in token_ids})])
        text = dict(zip(df.token_id.astype(int), df.text))
        return [text.get(int(t), f"<{int(t)}>") for t in token_ids]

    def labels(self, role: str | None = None) -> pd.DataFrame:
        """Every feature label with the feature's probe rank and density."""
        return self.query("SELECT l.*, p.rank AS probe_rank, p.weight AS probe_weight, f.density, f.top_tokens "
                          "FROM feature_labels l LEFT JOIN probe_features p USING (role, layer, feature) "
                          "LEFT JOIN features f USING (role, layer, feature) "
                          "WHERE (CAST(? AS VARCHAR) IS NULL OR l.role = ?) ORDER BY l.role DESC, p.rank NULLS LAST, "
                          "l.layer, l.feature", [role, role])

    def llm_cached(self, key: str) -> str | None:
        df = self.query("SELECT response FROM llm_cache WHERE key = ?", [key])
        return None if df.empty else str(df.response.iloc[0])

    # --- probes ----------------------------------------------------------------------------
    def probe_words(self, role: str = "tuned") -> pd.DataFrame:
        return self.query("SELECT * FROM probe_words WHERE role = ? ORDER BY split, word", [role])

    def probe_docs(self, role: str = "tuned", limit: int = 200) -> pd.DataFrame:
        """Documents with the most scored words, for the token-score viewer."""
        return self.query("SELECT t.doc_id, d.source, count(*) AS n_words, any_value(d.text) AS text "
                          "FROM probe_tokens t JOIN act_docs d USING (doc_id) WHERE t.role = ? "
                          "GROUP BY t.doc_id, d.source ORDER BY n_words DESC, t.doc_id LIMIT ?", [role, int(limit)])

    def probe_doc(self, role: str, doc_id: int) -> tuple[dict | None, pd.DataFrame]:
        """One document (token ids) and its scored positions with their top contributing features."""
        doc = self.query("SELECT * FROM act_docs WHERE doc_id = ?", [int(doc_id)])
        toks = self.query("SELECT * FROM probe_tokens WHERE role = ? AND doc_id = ? ORDER BY pos", [role, int(doc_id)])
        return (None if doc.empty else doc.iloc[0].to_dict()), toks

    def probe_features(self, role: str = "tuned", limit: int = 50) -> pd.DataFrame:
        return self.query("SELECT * FROM probe_features WHERE role = ? ORDER BY rank LIMIT ?", [role, int(limit)])

    def probe_pca(self, role: str = "tuned", task: str = "imdb") -> pd.DataFrame:
        return self.query("SELECT * FROM probe_pca WHERE role = ? AND task = ? ORDER BY doc_id", [role, task])

    def firing_features(self, role: str) -> dict[int, list[int]]:
        """{layer: feature ids that fired at least once} of ``role``'s analysed SAEs."""
        df = self.query("SELECT layer, list(feature ORDER BY feature) AS ids FROM features WHERE role = ? AND n_fired > 0 "
                        "GROUP BY layer ORDER BY layer", [role])
        return {int(a): [int(x) for x in b] for a, b in zip(df.layer, df.ids)}

    # --- ablation, reward model, attribution ------------------------------------------------
    def ablation_sets(self) -> pd.DataFrame:
        return self.query("SELECT * FROM ablation_sets ORDER BY kind = 'random', control_of NULLS FIRST, set_id")

    def ablation_prefixes(self) -> pd.DataFrame:
        return self.query("SELECT * FROM ablation_prefixes ORDER BY prefix_id")

    def ablation_completions(self, set_ids: Sequence[str], limit: int = 50) -> pd.DataFrame:
        """Completions of the first ``limit`` prefixes under each of ``set_ids`` (one row per prefix and set)."""
        return self.query("SELECT c.*, p.text AS prefix FROM ablation_completions c JOIN ablation_prefixes p USING "
                          "(prefix_id) WHERE c.set_id IN (SELECT unnest(?)) AND c.prefix_id < ? ORDER BY c.prefix_id, "
                          "c.set_id", [list(set_ids), int(limit)])

    def rm_pairs(self, split: str | None = None) -> pd.DataFrame:
        return self.query("SELECT * FROM rm_pairs WHERE (CAST(? AS VARCHAR) IS NULL OR split = ?) ORDER BY pair_id",
                          [split, split])

    def attribution(self, target: str) -> pd.DataFrame:
        return self.query("SELECT * FROM attribution WHERE target = ? ORDER BY rank, layer, feature", [target])

    def attribution_points(self, target: str) -> pd.DataFrame:
        return self.query("SELECT * FROM attribution_points WHERE target = ? ORDER BY layer, feature, text_id", [target])

    def reward_summary(self, role: str = "base") -> dict | None:
        df = self.query(
            "SELECT count(*) AS n, avg(reward) AS mean, stddev_samp(reward) AS sd FROM completions WHERE role = ?",
            [role],
        )
        n = int(df.n[0])
        if n == 0:
            return None
        sd = float(df.sd[0]) if n > 1 else 0.0
        return {"mean": float(df["mean"][0]), "se": sd / n**0.5, "n": n}


class RunWriter:
    """Write access for precompute. Creates the run on first use; one transaction per write."""

    def __init__(self, run_dir: str | Path, name: str | None = None):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise StoreError(f"--out {self.run_dir} is a file; give a directory for the run")
        self.path = db_path(self.run_dir)
        self.name = name or self.run_dir.name
        existed = self.path.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        artifacts_dir(self.run_dir).mkdir(exist_ok=True)
        with self.transaction() as con:
            if existed:
                _check_schema(con, self.path, upgrade=True)
                con.execute(_SCHEMA)  # tables are created if missing (idempotent)
            else:
                con.execute(_SCHEMA)
                con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created_by', 'lfp_core')",
                            [str(SCHEMA_VERSION)])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN/COMMIT; any exception rolls the whole write back."""
        con = _connect(self.path, read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def reader(self) -> RunReader:
        return RunReader(self.run_dir)

    # --- run and stage bookkeeping -------------------------------------------------------
    def set_config(self, preset: str, config_json: str) -> None:
        with self.transaction() as con:
            con.execute("DELETE FROM run")
            created = con.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()
            if not created:
                con.execute("INSERT INTO meta VALUES ('created_at', ?)", [str(_now())])
                created = (str(_now()),)
            con.execute("INSERT INTO run VALUES (?, ?, ?, ?, ?)",
                        [self.name, preset, config_json, created[0], _now()])

    def stage_record(self, name: str) -> tuple[str | None, str | None]:
        """(status, config_hash) of a stage, or (None, None) when it never ran."""
        with self.transaction() as con:
            row = con.execute("SELECT status, config_hash FROM stages WHERE name = ?", [name]).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def mark_stage(self, name: str, position: int, config_hash: str, status: str,
                   seconds: float | None = None, detail: dict | None = None, error: str | None = None,
                   con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Upsert a stage's status; pass ``con`` to make it part of a larger transaction."""
        sql = (
            "INSERT OR REPLACE INTO stages (name, position, config_hash, status, started_at, finished_at, "
            "seconds, detail_json, error) VALUES (?, ?, ?, ?, "
            "COALESCE((SELECT started_at FROM stages WHERE name = ?), ?), ?, ?, ?, ?)"
        )
        finished = _now() if status in ("done", "failed") else None
        started = _now()
        args = [name, position, config_hash, status, name, started, finished, seconds,
                json.dumps(detail or {}), error]
        if con is not None:
            con.execute(sql, args)
        else:
            with self.transaction() as c:
                if status == "running":
                    c.execute("DELETE FROM stages WHERE name = ?", [name])
                c.execute(sql, args)

    def done_chunks(self, stage: str, config_hash: str) -> set[int]:
        with self.transaction() as con:
            rows = con.execute("SELECT chunk FROM stage_chunks WHERE stage = ? AND config_hash = ?",
                               [stage, config_hash]).fetchall()
        return {r[0] for r in rows}

    def clear_stage(self, stage: str, tables: dict[str, tuple[str, list[Any]]]) -> None:
        """Delete a stage's rows (``{table: (where_sql, params)}``) and its chunk markers, atomically."""
        with self.transaction() as con:
            for table, (where, params) in tables.items():
                if table not in _TABLES:
                    raise ValueError(f"unknown table {table}")
                con.execute(f"DELETE FROM {table} WHERE {where}", params)
            con.execute("DELETE FROM stage_chunks WHERE stage = ?", [stage])

    # --- typed row writers (call inside a transaction) --------------------------------------
    @staticmethod
    def add_chunk_marker(con: duckdb.DuckDBPyConnection, stage: str, config_hash: str, chunk: int) -> None:
        con.execute("INSERT INTO stage_chunks VALUES (?, ?, ?)", [stage, config_hash, chunk])

    def put_llm_cache(self, key: str, model: str, prompt: str, response: str) -> None:
        """Commit one LLM answer at once (an interrupted labelling run loses none of them)."""
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO llm_cache VALUES (?, ?, ?, ?, ?)", [key, model, prompt, response, _now()])

    @staticmethod
    def put_model(con: duckdb.DuckDBPyConnection, role: str, info: dict) -> None:
        con.execute("DELETE FROM models WHERE role = ?", [role])
        con.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [role, info["name"], info["source"], info["location"], info["architecture"],
             info["n_params"], info["n_layers"], info["d_model"], info["vocab_size"]],
        )

    @staticmethod
    def put_prompts(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
        put_rows(con, "prompts", rows)

    @staticmethod
    def put_completions(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
        put_rows(con, "completions", rows)


def _insert_frame(con: duckdb.DuckDBPyConnection, table: str, df: pd.DataFrame) -> None:
    """Insert a DataFrame's columns (by name) into a schema table."""
    if table not in _TABLES:
        raise ValueError(f"unknown table {table}")
    if df.empty:
        return
    con.register("_frame_in", df)
    con.execute(f"INSERT INTO {table} ({', '.join(df.columns)}) SELECT {', '.join(df.columns)} FROM _frame_in")
    con.unregister("_frame_in")


def put_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict] | pd.DataFrame) -> None:
    """Insert rows (dicts with the table's column names, or a DataFrame) inside a transaction."""
    _insert_frame(con, table, rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows))


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories (those holding a run.duckdb) under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and db_path(p).exists()]
    return sorted(runs, key=lambda p: db_path(p).stat().st_mtime, reverse=True)
