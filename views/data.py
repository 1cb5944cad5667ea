"""Cached, typed, read-only access to one run for the pages: :class:`RunData`.

Each method is one :class:`~lfp_core.store.RunReader` query with its return type, cached per (run
directory, DB modification time), so a page re-renders from memory until precompute writes to the run
again. A store error (a run deleted, damaged, of another schema) stops the page with its message.
Every string a method returns has its bidi and control characters made visible
(:func:`lfp_core.safetext.show_controls`): a U+202E in a review cannot reverse the rest of a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pandas as pd
import streamlit as st

from lfp_core.safetext import md_text, show_controls
from lfp_core.store import RunReader, StageRecord, StoreError, db_path, done_summary
from lfp_core.store.summaries import StageSummary

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound=StageSummary)


def stamp(run_dir: str) -> float:
    """The run's version: the latest modification time of its DB file and write-ahead log."""
    p = db_path(run_dir)
    wal = p.with_name(p.name + ".wal")
    return max(p.stat().st_mtime if p.exists() else 0.0, wal.stat().st_mtime if wal.exists() else 0.0)


@st.cache_resource(show_spinner=False, max_entries=16)
def _reader(run_dir: str, version: float) -> RunReader:
    """One read-only reader per run version, shared by sessions; it keeps its DuckDB connection while
    queries come and lets go of it when idle, so a precompute can still write to the run."""
    return RunReader(run_dir, keep_open=True)


# A RunData is cached on its run and version only (not on how it reports errors).
_HASH: dict[str | type, Callable[[Any], Any]] = {f"{__name__}.RunData": lambda d: (d.run_dir, d.version)}


def _query(method: Callable[Concatenate[RunData, P], T]) -> Callable[Concatenate[RunData, P], T]:
    """Cache a RunData method (keyed on the run, its version and the arguments), its result's strings
    with their controls made visible, and turn a StoreError into a message and a stop (unless the
    RunData was made with ``stop_on_error=False``)."""

    @functools.wraps(method)
    def shown(self: RunData, *args: P.args, **kwargs: P.kwargs) -> T:
        return show_controls(method(self, *args, **kwargs))

    cached = st.cache_data(show_spinner=False, max_entries=256, hash_funcs=_HASH)(shown)

    @functools.wraps(method)
    def read(self: RunData, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return cached(self, *args, **kwargs)
        except StoreError as exc:
            if not self.stop_on_error:
                raise
            st.error(md_text(exc))
            st.stop()
            raise  # (st.stop raises; this line is for type checkers)

    return read


class RunData:
    """The selected run as the pages read it."""

    def __init__(self, run_dir: str, stop_on_error: bool = True):
        self.run_dir = str(run_dir)
        self.version = stamp(self.run_dir)
        self.stop_on_error = stop_on_error

    @property
    def reader(self) -> RunReader:
        return _reader(self.run_dir, self.version)

    # --- run and stages ---------------------------------------------------------------------------
    @_query
    def run_info(self) -> dict:
        return self.reader.run_info()

    @_query
    def model_info(self, role: str = "base") -> dict | None:
        return self.reader.model_info(role)

    @_query
    def stages(self) -> list[StageRecord]:
        return self.reader.stages()

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages() if s.name == name), None)

    def summary(self, kind: type[S]) -> S | None:
        """The summary of ``kind``'s stage (e.g. ``ProbesSummary``), or None unless that stage is done."""
        return done_summary(self.stages(), kind)

    # --- prompts, completions, RL ------------------------------------------------------------------
    @_query
    def reward_summary(self, role: str = "base") -> dict | None:
        return self.reader.reward_summary(role)

    @_query
    def completions(self, role: str = "base", limit: int | None = None) -> pd.DataFrame:
        return self.reader.completions(role, limit=limit)

    @_query
    def paired_completions(self, limit: int | None = None) -> pd.DataFrame:
        return self.reader.paired_completions(limit)

    @_query
    def pairs(self, split: str | None = None) -> pd.DataFrame:
        return self.reader.pairs(split)

    @_query
    def rl_steps(self) -> pd.DataFrame:
        return self.reader.rl_steps()

    @_query
    def word_shifts(self) -> pd.DataFrame:
        return self.reader.word_shifts()

    @_query
    def layer_divergence(self) -> pd.DataFrame:
        return self.reader.layer_divergence()

    # --- SAEs and features -------------------------------------------------------------------------
    @_query
    def saes(self, kind: str | None = None) -> pd.DataFrame:
        return self.reader.saes(kind)

    @_query
    def sae_pairs(self) -> pd.DataFrame:
        return self.reader.sae_pairs()

    @_query
    def feature_layers(self) -> pd.DataFrame:
        return self.reader.feature_layers()

    @_query
    def feature(self, role: str, layer: int, feature: int) -> dict | None:
        return self.reader.feature(role, layer, feature)

    @_query
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
        return self.reader.feature_table(
            role, layer, search, min_density, relevant_only, sort, descending, limit, offset
        )

    @_query
    def feature_examples(self, role: str, layer: int, feature: int, kind: str = "top") -> pd.DataFrame:
        return self.reader.feature_examples(role, layer, feature, kind)

    @_query
    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self.reader.token_strings(token_ids)

    # --- probes and labels -------------------------------------------------------------------------
    @_query
    def probe_words(self, role: str = "tuned") -> pd.DataFrame:
        return self.reader.probe_words(role)

    @_query
    def probe_docs(self, role: str = "tuned") -> pd.DataFrame:
        return self.reader.probe_docs(role)

    @_query
    def probe_doc(self, role: str, doc_id: int) -> tuple[dict | None, pd.DataFrame]:
        return self.reader.probe_doc(role, doc_id)

    @_query
    def probe_features(self, role: str = "tuned", limit: int | None = 50) -> pd.DataFrame:
        return self.reader.probe_features(role, limit)

    @_query
    def probe_sequences(self, role: str = "tuned") -> pd.DataFrame:
        return self.reader.probe_sequences(role)

    @_query
    def probe_pca(self, role: str = "tuned", task: str = "imdb") -> pd.DataFrame:
        return self.reader.probe_pca(role, task)

    @_query
    def labels(self, role: str | None = None) -> pd.DataFrame:
        return self.reader.labels(role)

    # --- ablation, reward model, attribution -------------------------------------------------------
    @_query
    def ablation_sets(self) -> pd.DataFrame:
        return self.reader.ablation_sets()

    @_query
    def ablation_prefixes(self) -> pd.DataFrame:
        return self.reader.ablation_prefixes()

    @_query
    def ablation_completions(self, set_ids: Sequence[str], limit: int = 50) -> pd.DataFrame:
        return self.reader.ablation_completions(set_ids, limit)

    @_query
    def rm_pairs(self, split: str | None = None) -> pd.DataFrame:
        return self.reader.rm_pairs(split)

    @_query
    def attribution(self, target: str) -> pd.DataFrame:
        return self.reader.attribution(target)

    @_query
    def attribution_points(self, target: str) -> pd.DataFrame:
        return self.reader.attribution_points(target)

    # --- model diffing -----------------------------------------------------------------------------
    @_query
    def diff_dictionaries(self) -> pd.DataFrame:
        return self.reader.diff_dictionaries()

    @_query
    def diff_latents(self, dict_id: str | None = None, latent_class: str | None = None) -> pd.DataFrame:
        return self.reader.diff_latents(dict_id, latent_class)

    @_query
    def diff_patching(self) -> pd.DataFrame:
        return self.reader.diff_patching()

    @_query
    def diff_lens(self) -> pd.DataFrame:
        return self.reader.diff_lens()

    @_query
    def diff_causal(self) -> pd.DataFrame:
        return self.reader.diff_causal()
