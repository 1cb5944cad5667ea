"""Prompts and completions: the prompt sets, sampled and scored completions, the RL log, HH preference
pairs, word shifts and per-layer divergence."""

from __future__ import annotations

from typing import Any

import pandas as pd

from lfp_core.store.connection import Queries
from lfp_core.store.schema import table

D = "texts"
PROMPTS = table(
    "prompts",
    D,
    "prompt_id INTEGER, split VARCHAR NOT NULL, source VARCHAR NOT NULL, doc_id VARCHAR, "
    "n_tokens INTEGER NOT NULL, token_ids INTEGER[] NOT NULL, text VARCHAR NOT NULL",
    ("prompt_id",),
)
COMPLETIONS = table(
    "completions",
    D,
    "role VARCHAR NOT NULL, prompt_id INTEGER NOT NULL, sample_idx INTEGER NOT NULL, "
    "seed BIGINT NOT NULL, n_new INTEGER NOT NULL, token_ids INTEGER[] NOT NULL, "
    "text VARCHAR NOT NULL, reward DOUBLE NOT NULL, raw_score DOUBLE NOT NULL, "
    "lexicon_words VARCHAR[], lexicon_valences DOUBLE[]",
    ("role", "prompt_id", "sample_idx"),
)
RL_STEPS = table(
    "rl_steps",
    D,
    "step INTEGER, reward DOUBLE, reward_std DOUBLE, kl DOUBLE, mean_length DOUBLE, loss DOUBLE, accuracy DOUBLE",
    ("step",),
)
PAIRS = table(
    "pairs",
    D,
    "pair_id INTEGER, split VARCHAR NOT NULL, subset VARCHAR, prompt VARCHAR NOT NULL, "
    "chosen VARCHAR NOT NULL, rejected VARCHAR NOT NULL",
    ("pair_id",),
)
RL_SAMPLES = table(
    "rl_samples",
    D,
    "step INTEGER NOT NULL, idx INTEGER NOT NULL, prompt VARCHAR, completion VARCHAR, reward DOUBLE",
    ("step", "idx"),
)
WORD_SHIFTS = table(
    "word_shifts",
    D,
    "word VARCHAR, base_count INTEGER, tuned_count INTEGER, delta INTEGER, valence DOUBLE, direction VARCHAR",
    ("word",),
)
LAYER_DIVERGENCE = table(
    "layer_divergence",
    D,
    "layer INTEGER, param DOUBLE, act_cos DOUBLE, act_rel_l2 DOUBLE, selected BOOLEAN",
    ("layer",),
)


class TextQueries(Queries):
    def prompts(self, split: str | None = None) -> pd.DataFrame:
        """Prompts of one split ('train': RL prompts, 'eval': held-out), or all when None."""
        sql = "SELECT prompt_id, split, source, doc_id, n_tokens, token_ids, text FROM prompts"
        if split is not None:
            return self._query(sql + " WHERE split = ? ORDER BY prompt_id", [split])
        return self._query(sql + " ORDER BY prompt_id")

    def completions(self, role: str = "base", limit: int | None = None, order: str = "id") -> pd.DataFrame:
        """Completions of a policy role with their prompts; ``order`` is 'id', 'reward' or '-reward'."""
        order_sql = {
            "id": "c.prompt_id, c.sample_idx",
            "reward": "c.reward ASC, c.prompt_id",
            "-reward": "c.reward DESC, c.prompt_id",
        }[order]
        sql = (
            "SELECT c.prompt_id, c.sample_idx, p.text AS prompt, c.text AS completion, c.n_new, "
            "c.reward, c.raw_score, c.lexicon_words, c.lexicon_valences, c.token_ids, c.seed "
            f"FROM completions c JOIN prompts p USING (prompt_id) WHERE c.role = ? ORDER BY {order_sql}"
        )
        params: list[Any] = [role]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self._query(sql, params)

    def paired_completions(self, limit: int | None = None) -> pd.DataFrame:
        """Base and tuned completions of the same held-out prompt and seed, side by side."""
        sql = (
            "SELECT b.prompt_id, b.sample_idx, p.text AS prompt, b.text AS base, b.reward AS base_reward, "
            "t.text AS tuned, t.reward AS tuned_reward FROM completions b "
            "JOIN completions t ON t.role = 'tuned' AND t.prompt_id = b.prompt_id AND t.sample_idx = b.sample_idx "
            "JOIN prompts p ON p.prompt_id = b.prompt_id WHERE b.role = 'base' ORDER BY b.prompt_id, b.sample_idx"
        )
        return self._query(sql + (" LIMIT ?" if limit is not None else ""), [int(limit)] if limit is not None else [])

    def reward_summary(self, role: str = "base") -> dict | None:
        """Mean reward of a role's completions with its standard error and count (None when there are none)."""
        df = self._query(
            "SELECT count(*) AS n, avg(reward) AS mean, stddev_samp(reward) AS sd FROM completions WHERE role = ?",
            [role],
        )
        n = int(df.n[0])
        if n == 0:
            return None
        sd = float(df.sd[0]) if n > 1 else 0.0
        return {"mean": float(df["mean"][0]), "se": sd / n**0.5, "n": n}

    def pairs(self, split: str | None = None) -> pd.DataFrame:
        """HH preference pairs of one split ('train' or 'eval'), or all."""
        sql = "SELECT * FROM pairs"
        if split is not None:
            return self._query(sql + " WHERE split = ? ORDER BY pair_id", [split])
        return self._query(sql + " ORDER BY pair_id")

    def rl_steps(self) -> pd.DataFrame:
        return self._query("SELECT * FROM rl_steps ORDER BY step")

    def rl_samples(self) -> pd.DataFrame:
        return self._query("SELECT * FROM rl_samples ORDER BY step, idx")

    def word_shifts(self) -> pd.DataFrame:
        return self._query("SELECT * FROM word_shifts ORDER BY direction DESC, abs(delta) DESC, word")

    def layer_divergence(self) -> pd.DataFrame:
        return self._query("SELECT * FROM layer_divergence ORDER BY layer")
