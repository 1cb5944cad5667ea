"""Test setup: offline environment, the shared data folder, and session-wide fixtures.

Tests never touch the network: the variables below are set before anything imports
transformers, datasets or wandb. Tests that need ``../shared/data`` skip with a reason when it
is absent, unless ``LFP_REQUIRE_SHARED=1`` (CI), where a missing folder is a failure.
"""

from __future__ import annotations

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_k] = _v

from lfp_core.runtime import apply_thread_policy  # noqa: E402

apply_thread_policy()  # before anything imports torch (lfp_core/runtime.py: OpenMP threads sleep, not spin)

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
    cfg = preset_config("quick", data_dir=str(data_dir) if data_dir else None)
    run_pipeline(cfg, out)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny finished-up-to-labels run written through RunWriter (tests/tiny_run.py: no model, no
    training, built in about a second), for fast tests of the report, the pages and the readers.
    Read-only: a test that writes builds its own with ``tiny_run(tmp_path / ...)``."""
    from tests.tiny_run import tiny_run

    return tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


# --- test tiers and the pipeline fixtures' own time limit -------------------------------------
# Fixtures that run a whole pipeline. A test requesting one (directly or through another fixture)
# is marked ``pipeline`` and ``slow`` at collection, so ``./lfp test --fast`` (-m "not slow")
# leaves it out without anyone having to remember a marker. Their build does not count against
# the test's --timeout: it runs under its own limit, ``pipeline_timeout`` in pytest.ini, and the
# test's timer restarts once the fixture is built.
PIPELINE_FIXTURES = frozenset({"quick_run", "hh_run"})


def pytest_addoption(parser):
    parser.addini(
        "pipeline_timeout",
        "seconds a pipeline fixture (conftest.PIPELINE_FIXTURES) may take to build, apart from the test's --timeout",
        default="3600",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PIPELINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)
        if item.get_closest_marker("pipeline"):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    # a plugin object, not conftest functions: pytest calls a session-scoped fixture's
    # pytest_fixture_setup only on plugins and conftests at or above the rootdir, not on tests/conftest.py
    config.pluginmanager.register(_PipelineFixtureTimer(), "lfp-pipeline-fixture-timer")


class _PipelineFixtureTimer:
    """Builds a pipeline fixture under ``pipeline_timeout`` instead of the requesting test's timer,
    then gives the test its whole --timeout again (a cached fixture never reaches this hook)."""

    def __init__(self):
        self.armed: dict[str, tuple] = {}  # nodeid -> (item, pytest-timeout Settings) of the running per-test timer

    @pytest.hookimpl(wrapper=True, optionalhook=True)  # pytest-timeout's hook (absent under -p no:timeout)
    def pytest_timeout_set_timer(self, item, settings):
        self.armed[item.nodeid] = (item, settings)
        return (yield)

    @pytest.hookimpl(wrapper=True, optionalhook=True)
    def pytest_timeout_cancel_timer(self, item):
        self.armed.pop(item.nodeid, None)
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if fixturedef.argname not in PIPELINE_FIXTURES or len(self.armed) != 1:
            return (yield)  # not a pipeline fixture, or no per-test timer running (no --timeout, func_only)
        ((item, settings),) = self.armed.values()
        hook = request.config.pluginmanager.hook
        hook.pytest_timeout_cancel_timer(item=item)
        limit = float(request.config.getini("pipeline_timeout"))
        hook.pytest_timeout_set_timer(item=item, settings=settings._replace(timeout=limit))
        try:
            return (yield)
        finally:
            hook.pytest_timeout_cancel_timer(item=item)
            hook.pytest_timeout_set_timer(item=item, settings=settings)
