"""Precompute: stages in order, skip when unchanged, recompute when the config changes, resume
after SIGKILL without duplicates, the CLI's errors, and the report's keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from lfp_core import precompute, report
from lfp_core.config import REPO_ROOT, RunConfig, preset_config
from lfp_core.stages import stage_names
from lfp_core.store import SCHEMA_VERSION, RunReader, StoreError, db_path
from tests.helpers import old_schema_run


def _finished(run) -> dict:
    r = RunReader(run)
    return {s.name: s.status for s in r.stages()}


def test_quick_run_contents(quick_run):
    r = RunReader(quick_run)
    assert _finished(quick_run) == dict.fromkeys(stage_names(), "done")
    prompts = r.prompts()
    assert len(prompts) == 128 and (prompts.split == "train").sum() == 64
    assert prompts.n_tokens.between(2, 9).all()
    comps = r.completions("base")
    assert len(comps) == 64  # one per held-out prompt
    assert set(comps.prompt_id) == set(r.prompts("eval").prompt_id)
    assert comps.n_new.between(1, 19).all() and (comps.n_new >= 8).mean() > 0.8  # EOS may end one early
    # Stored rewards are the reward of the stored text, and lexicon words carry their valences.
    from lfp_core import reward

    for row in comps.itertuples():
        assert row.reward == pytest.approx(reward.reward(row.completion))
        assert sum(row.lexicon_valences) == pytest.approx(row.raw_score)


def test_prompts_come_from_imdb_train_and_test_reviews(quick_run, shared_data):
    r = RunReader(quick_run)
    assert (r.prompts().source == "imdb").all()
    assert r.prompts("train").doc_id.str.startswith("train/").all()
    assert r.prompts("eval").doc_id.str.startswith("test/").all()


def test_rerun_skips_finished_stages(quick_run):
    before = _finished_at(quick_run)
    cfg = preset_config("quick", **_cfg_of(quick_run))
    outcome = precompute.run_pipeline(cfg, quick_run)
    assert set(outcome.values()) == {"skipped"}
    assert _finished_at(quick_run) == before


def _finished_at(run) -> dict:
    """{stage: when it finished} of the run's stage records."""
    return {s.name: s.finished_at for s in RunReader(run).stages()}


def _cfg_of(run) -> dict:
    """The run's stored settings, as flat overrides of the quick preset."""
    return RunConfig.from_dict(RunReader(run).run_info()["config"]).flat()


def test_config_change_recomputes_only_downstream(tmp_path, quick_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(quick_run, run)
    before = _finished_at(run)
    cfg = preset_config("quick", **{**_cfg_of(run), "max_new_tokens": 12})
    outcome = precompute.run_pipeline(cfg, run, until="base_samples")
    assert outcome == {"model": "skipped", "prompts": "skipped", "base_samples": "done"}
    comps = RunReader(run).completions("base")
    assert len(comps) == 64 and comps.n_new.max() <= 12
    assert _finished_at(run)["prompts"] == before["prompts"]


def test_report_json_has_every_headline_key(quick_run, capsys):
    assert report.main([str(quick_run), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["schema_version"] == SCHEMA_VERSION
    assert set(rep["model"]) == {"name", "n_params", "n_layers", "d_model"}
    assert rep["stages"] == dict.fromkeys(stage_names(), "done")
    b = rep["base_reward"]
    assert b["n"] == 64 and b["se"] > 0
    comps = RunReader(quick_run).completions("base")
    assert b["mean"] == pytest.approx(comps.reward.mean())
    assert report.main([str(quick_run)]) == 0
    assert "base-model reward: mean" in capsys.readouterr().out


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lfp_core.precompute", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        **kw,
    )


def test_cli_bad_model_path(tmp_path, capsys):
    code = precompute.main(["--preset", "quick", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "missing") in err and "Accepted" in err


def test_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert precompute.main(["--preset", "quick", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_cli_old_schema_then_rebuild_keeps_the_old_file(tmp_path, capsys):
    run = old_schema_run(tmp_path / "r")
    assert precompute.main(["--preset", "quick", "--out", str(run), "--until", "model"]) == 2
    assert "--rebuild" in capsys.readouterr().err
    assert precompute.main(["--preset", "quick", "--out", str(run), "--until", "model", "--rebuild"]) == 0
    assert _finished(run) == {"model": "done"}
    assert len(list(run.glob("run.duckdb.old-*"))) == 1


def test_cli_corrupt_db(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    db_path(run).write_bytes(b"garbage" * 1000)
    assert precompute.main(["--preset", "quick", "--out", str(run)]) == 2
    assert "not a readable DuckDB database" in capsys.readouterr().err
    assert db_path(run).read_bytes() == b"garbage" * 1000  # nothing lost


@pytest.mark.slow
def test_sigkill_mid_stage_resumes_without_duplicates(tmp_path):
    run = tmp_path / "killed"
    args = [
        "--preset",
        "quick",
        "--out",
        str(run),
        "--n-prompts",
        "8",
        "--n-eval-prompts",
        "48",
        "--samples-per-prompt",
        "2",
        "--until",
        "base_samples",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lfp_core.precompute", *args, "--gen-batch-size", "4"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    chunks = 0
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            chunks = len(RunReader(run).done_chunks("base_samples"))
        except (StoreError, duckdb.Error):
            continue  # not created yet, or the writer holds the lock right now
        if chunks >= 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"precompute ended before it could be killed: {proc.stderr.read()}"
    r = RunReader(run)
    status = {s.name: s.status for s in r.stages()}
    assert status["model"] == "done" and status["prompts"] == "done" and status["base_samples"] == "running"
    stored_before = r.completions("base")[["prompt_id", "sample_idx", "completion"]]
    assert 0 < len(stored_before) < 96
    finished_before = {s.name: s.finished_at for s in r.stages() if s.status == "done"}

    done = subprocess.run(
        [sys.executable, "-m", "lfp_core.precompute", *args, "--gen-batch-size", "4"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    r = RunReader(run)
    assert {s.name: s.status for s in r.stages()} == {"model": "done", "prompts": "done", "base_samples": "done"}
    keys = r.completions("base").groupby(["prompt_id", "sample_idx"]).size()
    assert r.table_size("completions") == len(keys) == 96 and (keys == 1).all()
    # Rows committed before the kill are untouched; finished stages were not re-run.
    after = r.completions("base")[["prompt_id", "sample_idx", "completion"]].merge(
        stored_before, on=["prompt_id", "sample_idx"], suffixes=("", "_before")
    )
    assert (after.completion == after.completion_before).all() and len(after) == len(stored_before)
    assert {s.name: s.finished_at for s in r.stages() if s.name in ("model", "prompts")} == finished_before


def test_without_data_prompts_are_sampled_from_the_model(tmp_path):
    cfg = preset_config("quick", n_prompts=8, n_eval_prompts=8, gen_batch_size=4, data_dir=None)
    precompute.run_pipeline(cfg, tmp_path / "nodata", until="base_samples")
    prompts = RunReader(tmp_path / "nodata").prompts()
    assert len(prompts) == 16 and (prompts.source == "model").all()
    assert prompts.n_tokens.between(2, 9).all()
    assert len(RunReader(tmp_path / "nodata").completions("base")) == 8
    stage = {s.name: s for s in RunReader(tmp_path / "nodata").stages()}["prompts"]
    assert stage.summary.source == "model-sampled"


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert precompute.main(["--preset", "quick", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
