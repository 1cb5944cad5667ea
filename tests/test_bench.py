"""The benchmarks' own builders keep working as the store's schema grows (no timings asserted)."""

from bench.dashboard import build_synthetic_store, query_latency
from lfp_core.store import RunReader


def test_synthetic_store_builds_and_answers_the_feature_page_and_browser_queries(tmp_path):
    run = build_synthetic_store(tmp_path / "synthetic", n_features=200, n_examples=3, n_tokens=8)
    r = RunReader(run)
    assert r.query("SELECT count(*) AS n FROM features").n[0] == 200
    assert r.query("SELECT count(*) AS n FROM feature_examples").n[0] == 600
    assert r.query("SELECT count(*) AS n FROM feature_labels").n[0] == 200
    q = query_latency(run, repeats=4)
    assert {"feature_page", "browser"} <= set(q) and all(v["n"] == 4 for v in q.values())


def test_stage_bench_reads_the_precompute_log_line():
    """bench stages parses what lfp_core.precompute logs for every finished stage."""
    from bench.__main__ import _STAGE_LINE
    from lfp_core.resources import Meter

    m = Meter(wall=1.0, cpu=12.34, peak_rss=int(2.5 * 2**30), steal=0.07)
    line = "INFO lfp_core.precompute: stage %-14s done in %.1fs (%s)" % ("saes", 169.9, m.describe())
    assert _STAGE_LINE.search(line).groups() == ("saes", "169.9", "12.3", "2.50", "7")
    m.peak_sampled = True  # where the kernel ignores the high-water-mark reset
    line = "INFO lfp_core.precompute: stage %-14s done in %.1fs (%s)" % ("saes", 169.9, m.describe())
    assert "(sampled)" in line and _STAGE_LINE.search(line).groups() == ("saes", "169.9", "12.3", "2.50", "7")
