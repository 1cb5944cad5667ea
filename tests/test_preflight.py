"""Settings checked against the model before anything runs (issue 20): ``--set sae_k=5000`` (more than
the SAEs' d_sae = expansion × d_model) and ``--set n_selected_layers=100`` (more than the model's
layers) are refused with one line naming both numbers, exit 2, nothing written; the model's shape
comes from its config.json, no weights loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lfp_core.config import DEMO_MODEL_DIR, REPO_ROOT
from lfp_core.errors import ConfigError
from lfp_core.models import model_shape
from lfp_core.preflight import check_against_model
from lfp_core.settings import preset_config

DEMO = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
N_LAYERS, D_MODEL = DEMO["num_hidden_layers"], DEMO["hidden_size"]


def _precompute(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--out", str(out), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return p, out


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("sae_k=5000", ["sae_k", "5000", f"{2 * D_MODEL} features", f"d_model {D_MODEL}"]),
        ("n_selected_layers=100", ["n_selected_layers", "100", f"has {N_LAYERS} layers"]),
        ("rm_layers=1,9", ["rm_layers", "layer 9", f"has {N_LAYERS} layers"]),
    ],
)
def test_settings_beyond_the_model_are_refused_before_anything_is_written(tmp_path, setting, names):
    p, out = _precompute(tmp_path, "--set", setting)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    for n in names:
        assert n in p.stderr, (n, p.stderr)
    assert not out.exists()  # nothing written, not even the run directory


def test_an_existing_run_is_left_as_it_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p, _ = _precompute(tmp_path, "--set", "sae_k=5000", "--rebuild")
    assert p.returncode == 2 and sorted(x.name for x in out.iterdir()) == ["keep.txt"]


def test_the_bounds_themselves_are_accepted():
    cfg = preset_config("quick")
    d_sae = cfg.sae.expansion * D_MODEL
    check_against_model(preset_config("quick", **{"sae_k": str(d_sae), "n_selected_layers": str(N_LAYERS)}))
    with pytest.raises(ConfigError, match=f"sae_k\\) = {d_sae + 1} .* {d_sae} features"):
        check_against_model(preset_config("quick", sae_k=str(d_sae + 1)))
    # relu main SAEs and no MFR: k is read by no SAE, so any k passes; a topk variant brings it back
    relu = {"sae_arch": "relu", "sae_k": "5000", "sae_suite__mfr_n": "0"}
    check_against_model(preset_config("quick", **relu))
    with pytest.raises(ConfigError, match="topk-4x variant"):
        check_against_model(preset_config("quick", **relu, sae_variants="topk-4x"))


def test_model_shape_reads_config_json_only(tmp_path):
    for spec in ("demo", str(DEMO_MODEL_DIR)):
        shape = model_shape(spec)
        assert shape is not None and (shape.n_layers, shape.d_model) == (N_LAYERS, D_MODEL)
    gpt2 = tmp_path / "gpt2-like"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 3, "n_embd": 48}))
    assert (model_shape(str(gpt2)).n_layers, model_shape(str(gpt2)).d_model) == (3, 48)  # no weights there
    assert model_shape(str(tmp_path / "missing")) is None  # the model stage says what is wrong
    assert model_shape("no-such-org/no-such-model") is None  # offline (conftest) and not cached: not checked
