"""The Layers page: divergence bars with the selected layers, and a partial run's message."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from lfp_core.config import REPO_ROOT
from lfp_core.store import RunReader, RunWriter

APP = str(REPO_ROOT / "app.py")


def _layers(monkeypatch, runs, run) -> AppTest:
    monkeypatch.setenv("LFP_RUNS_DIR", str(runs))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = str(run)
    at.run()
    return at.switch_page("views/layers.py").run()


def test_layers_page_shows_both_measures_and_the_choice(monkeypatch, quick_run):
    at = _layers(monkeypatch, quick_run.parent, quick_run)
    assert not at.exception
    selected = list(RunReader(quick_run).layer_divergence().query("selected").layer)
    text = " ".join(m.value for m in at.markdown)
    assert f"Selected layers (★): **{', '.join(map(str, selected))}**" in text
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    assert {"param", "1 − cos", "relative L2", "selected"} <= set(table.columns) and len(table) == 4


def test_layers_page_before_the_divergence_stage(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    RunWriter(run).set_config("quick", '{"model": "demo", "task": "vader"}')
    at = _layers(monkeypatch, tmp_path, run)
    assert not at.exception
    assert "divergence stage has not run" in at.info[0].value
