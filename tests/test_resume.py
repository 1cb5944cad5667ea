"""A run SIGKILLed at any point of a stage resumes to the same tables as an uninterrupted run.

The precompute runs in a subprocess on a micro configuration of the demo model. ``$LFP_KILL_AT_COMMIT``
(lfp_core/store/writer.py) makes it SIGKILL itself at a chosen write of a stage — just before its COMMIT
(the write is lost) or just after it — or a number of seconds into the stage. Each stage under test
starts from a copy of the clean run taken just before it, is killed at three or more points in turn
(each kill a fresh process resuming the previous one's leftovers), then finished by the same command;
every table must then equal the clean run's, value for value.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lfp_core.store import schema
from lfp_core.store.testing import table_dump

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]

# every stage, at the smallest settings that still run it for real
MICRO = [
    "--preset", "quick", "--n-prompts", "16", "--set", "n_eval_prompts=16", "--set", "rl_steps=4",
    "--set", "rl_save_every=2", "--set", "sae_corpus_docs=60", "--set", "sae_train_tokens=3000",
    "--set", "sae_sweep_l1=0.5", "--set", "sae_variants=relu-1x", "--set", "sae_suite.mfr_n=0",
    "--set", "label_probe_top=4", "--set", "label_random=4", "--set", "ablation_n=12",
    "--set", "ablation_rank_n=6", "--set", "ablation_k=4", "--set", "atp_pairs=4", "--set", "atp_top_k=4",
    "--set", "atp_random_k=4", "--set", "rm_epochs=1", "--set", "divergence_sequences=16",
    "--set", "sae_ce_docs=8", "--set", "probe_min_points=50", "--set", "probe_contrast_items=100",
    "--set", "probe_texts_per_class=20",
]  # fmt: skip

# the stages killed, each after the stage it starts from
KILLED = {
    "base_samples": "prompts",
    "saes": "activations",
    "features": "saes",
    "ablation": "labels",
    "reward_model": "ablation",
}
ORDER = ["prompts", "base_samples", "activations", "saes", "features", "labels", "ablation", "reward_model"]

# bookkeeping that legitimately differs between two runs: timestamps, durations, the LLM cache
SKIP_TABLES = {"meta", "run", "llm_cache"}
TIMING_COLUMNS = ("seconds", "created_at")  # how long a piece took: the one thing a resume may change


def _precompute(out: Path, until: str, data_dir: Path | None, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    args = [sys.executable, "-m", "lfp_core.precompute", *MICRO, "--out", str(out), "--until", until]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _plain(v):
    """A cell as a comparable, hashable value (DuckDB returns list columns as numpy arrays)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(_plain(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _plain(x)) for k, x in v.items()))
    return v


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name, df in table_dump(run).items():
        if name in SKIP_TABLES:
            continue
        if name == "stages":
            df = df[["name", "status", "config_hash"]]
        df = df.drop(columns=[c for c in TIMING_COLUMNS if c in df.columns])
        df = df.map(_plain) if len(df) else df
        key = list(schema.get(name).key) or list(df.columns)
        out[name] = df.sort_values(key).reset_index(drop=True) if len(df) else df
    return out


def _assert_same(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame], label: str) -> None:
    assert set(got) == set(want)
    for name in want:
        a, b = got[name], want[name]
        assert len(a) == len(b), f"{label}: table {name} has {len(a)} rows, the clean run {len(b)}"
        pd.testing.assert_frame_equal(a, b, check_dtype=False, obj=f"{label}: table {name}")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The clean micro run, copied after each stage in ORDER; the writes and seconds of each killed stage."""
    base = tmp_path_factory.mktemp("resume")
    # model-sampled prompts and documents (an empty data folder): no process re-reads the IMDB archive
    data_dir = base / "no-data"
    data_dir.mkdir()
    run, trace = base / "clean", base / "trace"
    snaps: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for stage in ORDER:
        res = _precompute(run, stage, data_dir, {"LFP_COMMIT_TRACE": str(trace)})
        assert res.returncode == 0, res.stderr[-3000:]
        m = re.search(rf"stage {stage}\s+done in ([0-9.]+)s", res.stderr)
        seconds[stage] = float(m.group(1)) if m else 0.0
        snaps[stage] = base / f"after-{stage}"
        shutil.copytree(run, snaps[stage])
    writes = {s: sum(1 for line in trace.read_text().splitlines() if line.split()[0] == s) for s in KILLED}
    return {"snaps": snaps, "writes": writes, "seconds": seconds, "base": base, "data": data_dir}


def _kill_points(n_writes: int, seconds: float) -> list[str]:
    """Three points, in an order where each lands on a stage not yet done: right after the stage's first
    write (where the ablation stage once stored its prefixes outside any chunk, so every resume died on a
    duplicate key), between chunks half-way, the final commit lost; a stage of few writes is killed by time
    first (mid-computation), then after its first write (or by time again), then before its final commit."""
    if n_writes >= 4:
        return ["1:after", f"{math.ceil(n_writes / 2)}:after", "final:before"]
    second = "1:after" if n_writes >= 2 else f"@{max(1.0, 0.75 * seconds):.2f}"
    return [f"@{max(0.5, 0.4 * seconds):.2f}", second, "final:before"]


@pytest.mark.parametrize("stage", list(KILLED))
def test_a_stage_killed_at_any_point_resumes_to_the_clean_runs_tables(clean, stage):
    snaps = clean["snaps"]
    run = clean["base"] / f"killed-{stage}"
    shutil.copytree(snaps[KILLED[stage]], run)
    kills = 0
    for point in _kill_points(clean["writes"][stage], clean["seconds"][stage]):
        res = _precompute(run, stage, clean["data"], {"LFP_KILL_AT_COMMIT": f"{stage}:{point}"})
        if res.returncode == -signal.SIGKILL:
            kills += 1
        else:  # a timed kill can come after a short stage has finished; then the run must be whole
            assert res.returncode == 0, f"{stage} at {point}: rc {res.returncode}\n{res.stderr[-3000:]}"
    assert kills >= 3, f"{stage}: only {kills} of the kill points landed"
    res = _precompute(run, stage, clean["data"], {})
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same(_tables(run), _tables(snaps[stage]), f"{stage} resumed after {kills} kills")
