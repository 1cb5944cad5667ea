"""Where things live on disk, and the inference batch rule.

The run's settings (the typed groups, :class:`RunConfig`, the presets) are in
:mod:`lfp_core.settings`; they are re-exported here for code that imported them from this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from lfp_core.settings import PRESETS, RunConfig, preset_config

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shipped demo base model; LFP_DEMO_MODEL_DIR points elsewhere (e.g. a retrained copy).
DEMO_MODEL_DIR = Path(os.environ.get("LFP_DEMO_MODEL_DIR", REPO_ROOT / "data" / "models" / "imdb-neox-5m"))
RUNS_DIR = REPO_ROOT / "data" / "runs"


def runs_dir() -> Path:
    """Where the dashboard looks for runs: ``$LFP_RUNS_DIR``, else ``data/runs`` in the repo."""
    env = os.environ.get("LFP_RUNS_DIR")
    return Path(env).expanduser() if env else RUNS_DIR


def default_data_dir() -> Path | None:
    """The public data sets folder: ``$LFP_DATA_DIR``, else ``../shared/data`` beside the repo.

    Returns None when neither exists (a researcher's own clone): callers then fall back to the
    hub (when online) or to model-sampled prompts.
    """
    env = os.environ.get("LFP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def inference_batch(device: str, cpu: int = 32) -> int:
    """Sequences per batch of an inference-only pass (harvest, scoring, evaluation, attribution): the
    results do not depend on it, so on a GPU it is 8x the CPU size, which fills the device for the
    models this tool targets. (Sampling chunks, SAE and RL batches are hyperparameters and stay as
    configured: ``--gen-batch-size``, ``--set sae_batch_size=...``.)"""
    return cpu * 8 if str(device).startswith("cuda") else cpu


TASKS = ("vader", "hh")

__all__ = [
    "DEMO_MODEL_DIR",
    "PRESETS",
    "REPO_ROOT",
    "RUNS_DIR",
    "TASKS",
    "RunConfig",
    "default_data_dir",
    "inference_batch",
    "preset_config",
    "runs_dir",
]
