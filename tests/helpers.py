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
