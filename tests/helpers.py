"""Small builders shared by tests: runs in states a user can meet."""

from __future__ import annotations

import re
from pathlib import Path

from lfp_core.store import testing


def old_schema_run(run_dir: Path, version: int = 0) -> Path:
    """A run directory whose DuckDB file carries another schema version."""
    return testing.old_schema_run(run_dir, version)


def shown(markdown: str) -> str:
    """A markdown source as its reader sees it: the backslash escapes of ASCII punctuation removed
    (the pages escape the run's text and messages quoting it, lfp_core.safetext.md_text)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)


def open_page(monkeypatch, runs: Path, page: str, **params):
    """The dashboard (app.py, sidebar included) under AppTest with ``runs`` as the runs folder and
    ``params`` as query parameters, switched to ``page`` (e.g. "views/labels.py") and run."""
    from streamlit.testing.v1 import AppTest

    from lfp_core.config import REPO_ROOT

    monkeypatch.setenv("LFP_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    return at.switch_page(page).run()


def random_sae(d_in: int, d_sae: int, hook: str, seed: int = 0):
    """A sae-lens StandardSAE with N(0, 0.1) weights reading ``hook`` (for ablation/attribution tests)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    return sae


def clean_and_killed_after_checkpoint(args, tmp_path: Path) -> tuple[Path, Path]:
    """Run the precompute command ``args(run_dir)`` uninterrupted into ``tmp_path/clean``, and into
    ``tmp_path/killed`` SIGKILLed right after its trainer's first checkpoint is written, then resumed by the
    same command; returns (clean, killed) once both have finished. Asserts each step went as described."""
    import os
    import signal
    import subprocess
    import time

    from lfp_core.config import REPO_ROOT
    from lfp_core.store import artifacts_dir

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    clean, run = tmp_path / "clean", tmp_path / "killed"
    res = subprocess.run(args(clean), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(args(run), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = artifacts_dir(run) / "rlhf_checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((p / "trainer_state.json").exists() for p in ckpt.glob("checkpoint-*")):
            time.sleep(0.5)  # let the checkpoint finish writing
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (artifacts_dir(run) / "policy").exists()  # no half-written model for later stages
    res = subprocess.run(args(run), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr[-3000:]
    return clean, run
