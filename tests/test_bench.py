"""The benchmarks' own builders keep working as the store's schema grows (no timings asserted)."""

from bench.dashboard import build_synthetic_store, query_latency
from lfp_core.store import RunReader


def test_synthetic_store_builds_and_answers_the_feature_page_and_browser_queries(tmp_path):
    run = build_synthetic_store(tmp_path / "synthetic", n_features=200, n_examples=3, n_tokens=8)
    r = RunReader(run)
    assert r.table_size("features") == 200 and r.table_size("feature_examples") == 600
    assert r.table_size("feature_labels") == 200
    q = query_latency(run, repeats=4)
    assert {"feature_page", "browser"} <= set(q) and all(v["n"] == 4 for v in q.values())


def test_stage_bench_reads_the_precompute_log_line():
    """bench stages parses what lfp_core.precompute logs for every finished stage."""
    from bench.__main__ import _STAGE_LINE
    from lfp_core.resources import Meter

    m = Meter(wall=1.0, cpu=12.34, peak_rss=int(2.5 * 2**30), steal=0.07)
    line = "INFO lfp_core.precompute: stage %-14s done in %.1fs (%s)" % ("saes", 169.9, m.describe())  # noqa: UP031 (logging's format)
    assert _STAGE_LINE.search(line).groups() == ("saes", "169.9", "12.3", "2.50", "7")
    m.peak_sampled = True  # where the kernel ignores the high-water-mark reset
    line = "INFO lfp_core.precompute: stage %-14s done in %.1fs (%s)" % ("saes", 169.9, m.describe())  # noqa: UP031 (logging's format)
    assert "(sampled)" in line and _STAGE_LINE.search(line).groups() == ("saes", "169.9", "12.3", "2.50", "7")


def test_contention_bench_children_and_table():
    """bench contention: the child's environment under each policy variant, its RESULT line, and the
    ratios to the idle cells (no timing is measured here)."""
    import pytest

    from bench.contention import child_env, parse_policy, parse_result, summarize, too_loaded
    from lfp_core.runtime import POLICY_ENV, SWITCH

    on, off = child_env("on"), child_env("off")
    assert all(on[k] == v for k, v in POLICY_ENV.items())
    assert not any(k in off for k in POLICY_ENV) and off[SWITCH] == "off"
    spin = child_env("GOMP_SPINCOUNT=10000+OMP_PROC_BIND=false")
    assert spin["GOMP_SPINCOUNT"] == "10000" and spin["OMP_PROC_BIND"] == "false"
    assert not any(k in spin for k in POLICY_ENV)
    with pytest.raises(ValueError, match="expected on, off"):
        parse_policy("passive")
    assert parse_result('noise\nRESULT {"grpo_s": [1.0]}\nRESULT {"grpo_s": [2.0]}\n') == {"grpo_s": [2.0]}
    with pytest.raises(ValueError, match="no RESULT"):
        parse_result("Traceback ...")
    cells = [
        {"policy": p, "busy": b, "threads": 2, "grpo_s": g, "harvest_s": h}
        for p, b, g, h in [
            ("off", 0, [1, 1, 3], [2, 2]),
            ("off", 1, [9, 10, 11], [20, 20]),
            ("on", 0, [1, 2, 2], [2, 2]),
            ("on", 1, [3, 4, 5], [3, 5]),
        ]
    ]
    rows = {(r["policy"], r["busy"]): r for r in summarize(cells)}
    assert rows[("off", 1)]["grpo_s_ratio"] == 10.0 and rows[("off", 1)]["harvest_s_ratio"] == 10.0
    assert rows[("on", 1)]["grpo_s_ratio"] == 2.0 and rows[("on", 1)]["harvest_s"] == 4.0
    assert rows[("on", 0)]["grpo_s_ratio"] == 1.0 and rows[("on", 0)]["grpo_s_vs_off"] == 2.0
    assert too_loaded({"other_cores": 0.5}, 0.2) and not too_loaded({"other_cores": 0.1}, 0.2)
    assert not too_loaded({"other_cores": None}, 0.2)  # no /proc/stat: measured once
