"""Dashboard benchmarks: server-side render time of every page (AppTest) on a run, and the feature
page's and feature browser's query latency on a synthetic store of many features.

Figures are medians / percentiles of repeats; nothing here is a timed assertion.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from lfp_core.config import REPO_ROOT
from lfp_core.store import RunReader, RunWriter
from lfp_core.store.testing import fill_synthetic_features

PAGES = [
    "views/overview.py",
    "views/layers.py",
    "views/browser.py",
    "views/feature.py",
    "views/token_scores.py",
    "views/separation.py",
    "views/labels.py",
    "views/ablation_lab.py",
    "views/reward_model.py",
]


def page_render_times(run_dir: Path, repeats: int = 5) -> list[dict]:
    """Per page: the first render (cold caches) and the median of ``repeats`` re-renders, in ms."""
    from streamlit.testing.v1 import AppTest

    os.environ["LFP_RUNS_DIR"] = str(Path(run_dir).parent)
    out = []
    for page in PAGES:
        at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=120)
        at.query_params["run"] = str(run_dir)
        at.run()
        t = time.perf_counter()
        at.switch_page(page).run()
        cold = time.perf_counter() - t
        if at.exception:
            raise RuntimeError(f"{page} raised: {at.exception[0].value}")
        warm = []
        for _ in range(repeats):
            t = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t)
        out.append(
            {
                "page": page,
                "first_ms": cold * 1e3,
                "median_ms": statistics.median(warm) * 1e3,
                "max_ms": max(warm) * 1e3,
            }
        )
    return out


def build_synthetic_store(
    run_dir: Path, n_features: int = 50_000, n_examples: int = 20, n_tokens: int = 64, n_layers: int = 2, seed: int = 0
) -> Path:
    """A run store with ``n_features`` features (split over ``n_layers`` layers of the tuned model),
    each with ``n_examples`` top examples of ``n_tokens`` tokens, probe weights and labels.

    Generated inside DuckDB (:func:`lfp_core.store.testing.fill_synthetic_features`) so building 1M
    examples takes seconds.
    """
    w = RunWriter(run_dir)
    w.set_config("synthetic", '{"model": "synthetic", "task": "vader"}')
    fill_synthetic_features(w, n_features, n_examples, n_tokens, n_layers, seed)
    return run_dir


def _pcts(xs: list[float]) -> dict:
    a = np.array(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(a)}


def query_latency(run_dir: Path, repeats: int = 50, seed: int = 0) -> dict:
    """p50/p95 of the feature page's queries (one feature with probe and label, its top and interval
    examples) and of browser searches/sorts (a page of 100 rows and the match count): through the
    dashboard's kept read-only connection, and through a fresh connection (the first query after
    the reader let go of it when idle)."""
    layers = RunReader(run_dir).feature_layers()
    searches = ["tok12", "praise", "", "zzz-no-match", "down"]
    sorts = ["probe_rank", "density", "freq_shift", "max_act"]
    out: dict[str, list[float]] = {}
    # the kept connection first, then fresh ones (separately: DuckDB reuses a file already open in-process)
    for suffix, keep in (("", True), ("_cold", False)):
        rng = np.random.default_rng(seed)
        kept = RunReader(run_dir, keep_open=True, idle_s=600) if keep else None
        page, browse = out.setdefault("feature_page" + suffix, []), out.setdefault("browser" + suffix, [])
        for i in range(repeats):
            row = layers.iloc[int(rng.integers(len(layers)))]
            fid = int(rng.integers(int(row.n_features)))
            t = time.perf_counter()
            r = kept or RunReader(run_dir)
            r.feature(row.role, int(row.layer), fid)
            r.feature_examples(row.role, int(row.layer), fid, "top")
            r.feature_examples(row.role, int(row.layer), fid, "interval")
            page.append(time.perf_counter() - t)
            t = time.perf_counter()
            (kept or RunReader(run_dir)).feature_table(
                search=searches[i % len(searches)],
                sort=sorts[i % len(sorts)],
                descending=bool(i % 2),
                limit=100,
                offset=100 * (i % 3),
            )
            browse.append(time.perf_counter() - t)
        if kept is not None:
            kept.close()
    return {k: _pcts(v) for k, v in out.items()}
