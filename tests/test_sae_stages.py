"""The activations, saes and features stages of the quick preset: what they store and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfp_core.report import build_report
from lfp_core.store import RunReader, RunWriter, SchemaVersionError
from tests.helpers import old_schema_run


@pytest.fixture(scope="module")
def reader(quick_run) -> RunReader:
    return RunReader(quick_run)


def test_sae_stages_store_every_sae_with_metrics(reader):
    stages = {s.name: s for s in reader.stages()}
    assert all(stages[n].status == "done" for n in ("activations", "saes", "features"))
    harvested = stages["activations"].summary
    layers = harvested.layers
    t = reader.saes()
    main = t[t.kind == "main"]
    assert sorted(zip(main.role, main.layer)) == sorted((r, ly) for r in ("base", "tuned") for ly in layers)
    assert set(t.kind) == {"main", "variant", "sweep", "mfr", "independent", "rm"}
    t = t[
        t.kind != "rm"
    ]  # the preference model's SAEs (residual stream, no next-token loss): tests/test_ablation_stages.py
    assert sorted(t[t.kind == "variant"].arch.unique()) == ["relu", "tied"]
    metrics = [
        "mse",
        "fvu",
        "l0",
        "dead_frac",
        "cos_sim",
        "l2_ratio",
        "ce_clean",
        "ce_spliced",
        "ce_zero",
        "ce_loss_recovered",
    ]
    assert np.isfinite(t[metrics].to_numpy(dtype=float)).all()
    assert (main.l0 == 32).all() and (main.fvu < 0.5).all() and (main.ce_loss_recovered > 0.5).all()
    assert (t.ce_spliced >= t.ce_clean - 1e-3).all() and (t.ce_zero > t.ce_clean).all()
    # dead fraction counts over every harvested row, metrics over the held-out rows only
    assert (t.dead_tokens == harvested.n_rows).all()
    assert (t.n_eval_tokens == harvested.n_eval_rows).all()
    sweep = t[t.kind == "sweep"].sort_values("l1_coefficient")
    assert sweep.l0.is_monotonic_decreasing  # a stronger L1 penalty gives sparser codes


def test_dictionary_comparisons_and_mfr(reader, quick_run):
    pairs = reader.sae_pairs()
    assert {"base_vs_tuned", "relu_1x_vs_2x", "mfr", "independent"} <= set(pairs.comparison)
    assert ((pairs.mmcs_hungarian > 0) & (pairs.mmcs_hungarian <= pairs.mmcs_max + 1e-9)).all()
    mfr = {s.name: s for s in reader.stages()}["saes"].summary.mfr
    assert mfr["mfr"]["l0"] == mfr["independent"]["l0"]  # compared at equal L0
    assert mfr["mfr"]["mmcs"] > mfr["independent"]["mmcs"]
    rep = build_report(str(quick_run))
    keys = {"layer", "role", "arch", "d_sae", "fvu", "l0", "dead_frac", "cos_sim", "l2_ratio", "ce_loss_recovered"}
    assert rep["saes"] and all(keys <= set(x) for x in rep["saes"])
    json.dumps(rep)  # JSON-ready


def test_feature_statistics_are_consistent(reader):
    layers = reader.feature_layers()
    assert len(layers) == 4 and (layers.n_features == 512).all()
    role, layer = "tuned", int(layers.layer.max())
    f = reader.features(role, layer)
    assert ((f.density >= 0) & (f.density <= 1)).all()
    live = f[f.n_fired > 0]
    assert (live.max_act >= live.mean_act).all()
    fid = int(live.sort_values("n_fired").feature.iloc[len(live) // 2])
    one = reader.feature(role, layer, fid)
    assert sum(one["hist_counts"]) == one["n_fired"]
    assert len(one["top_logit_tokens"]) == 10 and list(one["top_logit_values"]) == sorted(
        one["top_logit_values"], reverse=True
    )
    assert fid not in list(one["neighbours"]) and len(one["neighbours"]) == 10
    assert one["freq_base_text"] is not None and one["freq_tuned_text"] is not None
    top = reader.feature_examples(role, layer, fid, "top")
    assert 1 <= len(top) <= 20 and top.doc_id.is_unique  # at most one example per document
    assert top.act.iloc[0] == pytest.approx(one["max_act"], rel=1e-4)
    assert list(top.act) == sorted(top.act, reverse=True)
    for ex in top.itertuples():  # the window's centre token carries the example's activation
        assert ex.acts[ex.center] == pytest.approx(ex.act, rel=1e-3, abs=1e-3)
        assert len(ex.tokens) == len(ex.acts) == len(ex.token_ids) <= 17
    iv = reader.feature_examples(role, layer, fid, "interval")
    assert len(iv) and (iv.act <= one["max_act"] + 1e-6).all()
    bins = (iv.act / one["max_act"] * 10).astype(int).clip(upper=9)
    assert (bins == iv.interval).all()


def test_schema_1_run_is_upgraded_in_place_by_precompute(tmp_path):
    run = old_schema_run(tmp_path / "v1", version=1)
    with pytest.raises(SchemaVersionError, match="Upgrade it in place"):
        RunReader(run)
    RunWriter(run)
    assert RunReader(run).saes().empty


def test_l1_sweep_command_stores_the_curve(tmp_path, quick_run, capsys):
    import shutil

    from lfp_core import sweep

    run = tmp_path / "sweep"
    shutil.copytree(quick_run, run)
    assert (
        sweep.main(["--run", str(run), "--l1", "0.3,3", "--tokens", "10240", "--plot", str(tmp_path / "c.html")]) == 0
    )
    out = capsys.readouterr().out
    assert "L1" in out and "recovered" in out and (tmp_path / "c.html").exists()
    t = RunReader(run).saes("sweep")
    new = t[t.l1_coefficient.isin([0.3, 3.0]) & (t.train_tokens == 10240)].sort_values("l1_coefficient")
    assert len(new) == 2 and new.l0.iloc[0] > new.l0.iloc[1]
    assert sweep.main(["--run", str(run), "--l1", "1", "--layer", "0"]) == 2
    assert "layer 0 has no harvested activations" in capsys.readouterr().err
    assert sweep.main(["--run", str(run), "--l1", "-1"]) == 2
    assert sweep.main(["--run", str(tmp_path / "missing"), "--l1", "1"]) == 2
    assert not (tmp_path / "missing").exists()


def test_without_imdb_the_activation_corpus_is_sampled_from_the_model(quick_run, tmp_path):
    from lfp_core.config import RunConfig
    from lfp_core.pipeline import Context
    from lfp_core.pipeline.saes import build_corpus
    from lfp_core.settings import ActivationsStageSettings

    cfg = RunConfig.from_dict(RunReader(quick_run).run_info()["config"])
    cfg = cfg.with_values({"data_dir": str(tmp_path), "sae_corpus_docs": 6, "sae_doc_tokens": 12, "gen_batch_size": 4})
    docs, where = build_corpus(
        Context(run=cfg.run, writer=RunWriter(quick_run)), cfg.stage_settings(ActivationsStageSettings)
    )
    assert where == "model-sampled"
    sampled = [d for d in docs if d.source == "model_sampled"]
    assert len(sampled) == 6 and all(len(d.token_ids) == 12 for d in sampled)
    n_completions = len(RunReader(quick_run).completions("base")) + len(RunReader(quick_run).completions("tuned"))
    assert len(docs) == 6 + n_completions
    assert {d.split for d in docs} == {"train", "eval"}
