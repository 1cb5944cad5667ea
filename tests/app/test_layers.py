"""The Layers page: divergence bars with the selected layers, and a partial run's message."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from lfp_core.config import REPO_ROOT
from lfp_core.store import RunReader, RunWriter
from lfp_core.store.testing import forget_stages
from tests.helpers import open_page

APP = str(REPO_ROOT / "app.py")


def _layers(monkeypatch, runs, run) -> AppTest:
    return open_page(monkeypatch, runs, "views/layers.py", run=run)


def test_layers_page_shows_both_measures_and_the_choice(monkeypatch, quick_run):
    at = _layers(monkeypatch, quick_run.parent, quick_run)
    assert not at.exception
    selected = list(RunReader(quick_run).layer_divergence().query("selected").layer)
    text = " ".join(m.value for m in at.markdown)
    assert f"Selected layers (★): **{', '.join(map(str, selected))}**" in text
    assert len(at.get("plotly_chart")) == 2  # divergence bars and the L1 sweep
    table = at.dataframe[0].value
    assert {"param", "1 − cos", "relative L2", "selected"} <= set(table.columns) and len(table) == 4


def test_layers_page_shows_sae_quality_sweep_mmcs_and_mfr(monkeypatch, quick_run):
    at = _layers(monkeypatch, quick_run.parent, quick_run)
    assert not at.exception
    subheaders = [h.value for h in at.subheader]
    assert "Quality" in subheaders and "Dictionary similarity (MMCS)" in subheaders
    assert any(h.startswith("L1 sweep") for h in subheaders)
    assert "Mutual Feature Regularization vs independent SAEs" in subheaders
    quality = at.dataframe[1].value
    stored = RunReader(quick_run).saes()
    assert len(quality) == int(stored.kind.isin(["main", "reseed", "variant"]).sum())
    assert {"FVU", "L0", "dead", "loss recovered", "cos(x, x̂)", "‖x̂‖/‖x‖"} <= set(quality.columns)
    basis = next(d.value for d in at.dataframe if "reading" in d.value.columns)
    assert len(basis) == len(RunReader(quick_run).layer_divergence().query("selected"))
    mfr = next(d.value for d in at.dataframe if "training" in d.value.columns)
    assert list(mfr.training) == ["mfr", "independent"] and mfr.L0.nunique() == 1


def test_layers_page_before_the_sae_stage(monkeypatch, tmp_path, quick_run):
    import shutil

    run = tmp_path / "no_saes"
    shutil.copytree(quick_run, run, ignore=shutil.ignore_patterns("artifacts"))
    forget_stages(run, ["saes", "features"])
    at = _layers(monkeypatch, tmp_path, run)
    assert not at.exception
    assert "No SAEs yet: the `saes` stage has not finished" in at.info[0].value


def test_layers_page_before_the_divergence_stage(monkeypatch, tmp_path):
    run = tmp_path / "partial"
    RunWriter(run).set_config("quick", '{"model": "demo", "task": "vader"}')
    at = _layers(monkeypatch, tmp_path, run)
    assert not at.exception
    assert "divergence stage has not run" in at.info[0].value
