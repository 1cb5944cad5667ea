"""Test setup: offline environment, the shared data folder, and session-wide fixtures.

Tests never touch the network: the variables below are set before anything imports
transformers, datasets or wandb. Tests that need ``../shared/data`` skip with a reason when it
is absent, unless ``LFP_REQUIRE_SHARED=1`` (CI), where a missing folder is a failure.
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ[_k] = _v

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lfp_core.config import DEMO_MODEL_DIR, default_data_dir  # noqa: E402


def _require(flag: str) -> bool:
    return os.environ.get(flag, "0") == "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $LFP_DATA_DIR); skips the test when absent (fails under CI flags)."""
    d = default_data_dir()
    if d is None or not d.is_dir():
        if _require("LFP_REQUIRE_SHARED"):
            pytest.fail("LFP_REQUIRE_SHARED=1 but ../shared/data is missing")
        pytest.skip("needs ../shared/data (public data sets); absent in this clone")
    return d


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    assert (DEMO_MODEL_DIR / "config.json").exists(), "the shipped demo model is missing"
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """The quick preset, as a user runs it (64 RL + 64 held-out prompts, 60 GRPO steps), shared by
    the precompute, RL, report and app tests."""
    from lfp_core.config import preset_config
    from lfp_core.precompute import run_pipeline

    out = tmp_path_factory.mktemp("runs") / "quick"
    data_dir = default_data_dir()
    cfg = preset_config("quick",
                        data_dir=str(data_dir) if data_dir else None)
    run_pipeline(cfg, out)
    return out
