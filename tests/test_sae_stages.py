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
    assert set(t.kind) == {"main", "reseed", "variant", "sweep", "mfr", "rm"}  # main + reseed: the MFR baseline
    reseed = t[t.kind == "reseed"]
    assert sorted(zip(reseed.role, reseed.layer)) == sorted(zip(main.role, main.layer))
    assert t[t.kind != "rm"].seed.is_unique  # every SAE from its own seed
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
    assert {
        "base_vs_tuned",
        "base_vs_base_reseed",
        "tuned_vs_tuned_reseed",
        "relu_1x_vs_2x",
        "mfr",
    } <= set(pairs.comparison)
    # the MFR baseline is the tuned main SAE and its reseed (independent TopK SAEs of equal L0): their pair
    # is stored once, under its basis name, and the MFR summary finds it by its SAEs
    assert "independent" not in set(pairs.comparison)
    basis = {s.name: s for s in reader.stages()}["saes"].summary.basis
    layers = sorted(set(pairs.layer))
    assert [b["layer"] for b in basis] == layers and all(b["below_reference"] is not None for b in basis)
    assert ((pairs.mmcs_hungarian > 0) & (pairs.mmcs_hungarian <= pairs.mmcs_max + 1e-9)).all()
    mfr = {s.name: s for s in reader.stages()}["saes"].summary.mfr
    assert mfr["mfr"]["l0"] == mfr["independent"]["l0"]  # compared at equal L0
    assert mfr["mfr"]["mmcs"] > mfr["independent"]["mmcs"]
    ref = pairs[pairs.comparison == "tuned_vs_tuned_reseed"]
    assert mfr["independent"]["mmcs"] == pytest.approx(ref[ref.layer == min(layers)].mmcs_hungarian.iloc[0])
    rep = build_report(str(quick_run))
    keys = {"layer", "role", "arch", "d_sae", "fvu", "l0", "dead_frac", "cos_sim", "l2_ratio", "ce_loss_recovered"}
    assert rep["saes"] and all(keys <= set(x) for x in rep["saes"])
    assert rep["sae_comparisons"]["basis"] == [dict(b) for b in basis]
    json.dumps(rep)  # JSON-ready


def _jobs(preset: str = "demo", **values):
    from lfp_core.config import preset_config
    from lfp_core.pipeline.saes import sae_jobs
    from lfp_core.settings import SAEStageSettings

    s = preset_config(preset, data_dir=None, **values).stage_settings(SAEStageSettings)
    return sae_jobs(s, [2, 3], d_model=8), s


def _init_decoders(monkeypatch, jobs) -> dict:
    """{sae_id: decoder at initialisation} of every SAE of ``jobs``, through ``train_sae``/``train_mfr``
    with sae-lens's trainers replaced by ones that record the SAEs they are given and train nothing."""
    from dataclasses import replace

    from lfp_core import saes
    from lfp_core.pipeline.saes import sae_id

    got: list = []

    class Single:
        def __init__(self, cfg, sae, data):
            self.sae = sae
            got.append(sae.W_dec.detach().clone())

        def fit(self):
            return self.sae

    class Multi:
        def __init__(self, cfg, members, names, data):
            self.members = members
            got.extend(m.W_dec.detach().clone() for m in members.values())

        def fit(self):
            return self.members

    monkeypatch.setattr(saes, "SAETrainer", Single)
    monkeypatch.setattr(saes, "MultiSAETrainer", Multi)
    x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    out = {}
    for job in jobs:
        spec = replace(job["spec"], train_tokens=256, batch_size=256)
        src = saes.ActivationSource(x, np.arange(len(x)), 256, seed=0)
        got.clear()
        if job["kind"] == "mfr":
            saes.train_mfr(spec, src, "h", job["n"])
            out.update({sae_id(job, i): w for i, w in enumerate(got)})
        else:
            saes.train_sae(spec, src, "h")
            out[sae_id(job)] = got[0]
    return out


def test_compared_saes_do_not_share_their_initialisation(monkeypatch):
    """With one seed for every SAE, sae-lens drew identical decoders for the base and tuned main SAEs,
    the 1x ReLU dictionary started as the first rows of the 2x, and the first MFR member as the tuned
    main SAE: MMCS between them was biased towards 'the same basis'."""
    import torch

    jobs, s = _jobs()
    assert s.sae.arch == "topk" and s.sae_suite.mfr_n >= 2
    w = _init_decoders(monkeypatch, [j for j in jobs if j["kind"] != "sweep"])

    def differ(a, b):
        return (
            not torch.allclose(a, b) and float(torch.nn.functional.cosine_similarity(a, b, dim=-1).abs().mean()) < 0.9
        )

    for layer in (2, 3):
        assert differ(w[f"base-L{layer}-main"], w[f"tuned-L{layer}-main"])
        one, two = w[f"tuned-L{layer}-variant-relu-1x"], w[f"tuned-L{layer}-variant-relu-2x"]
        assert differ(one, two[: len(one)])  # the 1x dictionary is not a slice of the 2x
    members = sorted(k for k in w if "-mfr-" in k)
    assert len(members) == s.sae_suite.mfr_n
    for i, a in enumerate(members):
        assert differ(w[a], w["tuned-L2-main"])
        for b in members[i + 1 :]:
            assert differ(w[a], w[b])


def test_every_sae_has_its_own_seed_and_each_main_sae_a_reseed():
    from dataclasses import replace

    from lfp_core.pipeline.saes import sae_id

    jobs, s = _jobs()
    seeds = [j["spec"].seed for j in jobs]  # the MFR members' own seeds: test_compared_saes_do_not_share_...
    assert len(seeds) == len(set(seeds))
    assert all(0 <= x < 2**31 for x in seeds)  # the store's seed column is a 32-bit INTEGER
    ids = [sae_id(j) for j in jobs]
    for role in ("base", "tuned"):
        for layer in (2, 3):
            main = jobs[ids.index(f"{role}-L{layer}-main")]["spec"]
            reseed = jobs[ids.index(f"{role}-L{layer}-reseed")]["spec"]
            assert reseed.seed != main.seed and replace(reseed, seed=0) == replace(main, seed=0)  # only the seed
    # TopK main SAEs: the tuned main SAE and its reseed are the MFR baseline's independent SAEs
    assert not any(j["kind"] == "independent" for j in jobs)
    relu_jobs, _ = _jobs(sae_arch="relu")
    assert sum(j["kind"] == "independent" for j in relu_jobs) == s.sae_suite.mfr_n
    # seeds derive from the run seed and the SAE's id alone
    again, other = _jobs()[0], _jobs(seed=1)[0]
    assert [j["spec"].seed for j in again] == [j["spec"].seed for j in jobs]
    assert not {j["spec"].seed for j in other} & set(seeds)


def _saved_sae(path, rng, d=8, d_sae=16, layer=2):
    from lfp_core import saes
    from tests.test_saes import _fixed_sae

    sae = _fixed_sae(
        rng.normal(size=(d, d_sae)),
        np.zeros(d_sae),
        rng.normal(size=(d_sae, d)),
        np.zeros(d),
        f"blocks.{layer}.hook_mlp_out",
    )
    return saes.save_sae(sae, path)


def test_comparison_table_has_the_other_seed_references_beside_base_vs_tuned(tmp_path):
    """Base vs tuned MMCS is only read against base vs base′ and tuned vs tuned′ (same model and
    settings, another seed); the stage's table and summary carry all three per layer."""
    from types import SimpleNamespace

    import pandas as pd

    from lfp_core.pipeline.saes import dictionary_pairs

    rng = np.random.default_rng(0)
    rows = []
    for sid, role, kind, arch in [
        ("base-L2-main", "base", "main", "topk"),
        ("base-L2-reseed", "base", "reseed", "topk"),
        ("tuned-L2-main", "tuned", "main", "topk"),
        ("tuned-L2-reseed", "tuned", "reseed", "topk"),
        ("tuned-L2-mfr-m0", "tuned", "mfr", "topk"),
        ("tuned-L2-mfr-m1", "tuned", "mfr", "topk"),
    ]:
        _saved_sae(tmp_path / sid, rng)
        rows.append(
            {"sae_id": sid, "role": role, "layer": 2, "kind": kind, "arch": arch, "path": sid, "fvu": 0.1, "l0": 4.0}
            | {"ce_loss_recovered": 0.9}
        )
    table = pd.DataFrame(rows)
    ctx = SimpleNamespace(writer=SimpleNamespace(run_dir=tmp_path))
    pairs = dictionary_pairs(ctx, table)
    by = {p["comparison"]: p for p in pairs}
    assert {"base_vs_tuned", "base_vs_base_reseed", "tuned_vs_tuned_reseed", "mfr"} <= set(by)
    assert len({(p["a"], p["b"]) for p in pairs}) == len(pairs)  # one row per pair: the store's key
    assert (by["base_vs_base_reseed"]["a"], by["base_vs_base_reseed"]["b"]) == ("base-L2-main", "base-L2-reseed")
    assert (by["tuned_vs_tuned_reseed"]["a"], by["tuned_vs_tuned_reseed"]["b"]) == ("tuned-L2-main", "tuned-L2-reseed")
    from lfp_core.pipeline.saes import basis_summary, mfr_summary

    (basis,) = basis_summary(pairs)
    assert basis["layer"] == 2
    for k in ("base_vs_tuned", "base_vs_base_reseed", "tuned_vs_tuned_reseed"):
        assert basis[k] == pytest.approx(by[k]["mmcs_hungarian"])
    refs = min(basis["base_vs_base_reseed"], basis["tuned_vs_tuned_reseed"])
    assert basis["below_reference"] == (basis["base_vs_tuned"] < refs)
    assert not [p for p in pairs if p["comparison"] == "independent"]  # its only pair is the tuned reference
    assert mfr_summary(table, pairs)["independent"]["n"] == 2
    # a layer without references is reported as unreadable, not as evidence either way
    no_ref = [p for p in pairs if "reseed" not in p["comparison"]]
    assert basis_summary(no_ref)[0]["below_reference"] is None


def test_report_and_layers_page_show_base_vs_tuned_beside_the_references(monkeypatch, tmp_path):
    from lfp_core.report import build_report, format_report
    from lfp_core.store import put_rows
    from tests.helpers import open_page
    from tests.tiny_run import TinyRun

    tiny = TinyRun(tmp_path / "run")
    tiny.until("divergence")
    pairs = [
        {"a": "base-L1-main", "b": "tuned-L1-main", "comparison": "base_vs_tuned", "layer": 1}
        | {"mmcs_hungarian": 0.41, "mmcs_max": 0.5},
        {"a": "base-L1-main", "b": "base-L1-reseed", "comparison": "base_vs_base_reseed", "layer": 1}
        | {"mmcs_hungarian": 0.62, "mmcs_max": 0.7},
        {"a": "tuned-L1-main", "b": "tuned-L1-reseed", "comparison": "tuned_vs_tuned_reseed", "layer": 1}
        | {"mmcs_hungarian": 0.58, "mmcs_max": 0.66},
    ]
    from lfp_core.pipeline.saes import basis_summary

    with tiny.writer.transaction() as con:
        put_rows(con, "sae_pairs", pairs)
        tiny._done(con, "saes", {"n_saes": 4, "layers": [1], "basis": basis_summary(pairs)})
    rep = build_report(str(tiny.run_dir))
    (b,) = rep["sae_comparisons"]["basis"]
    assert (b["base_vs_tuned"], b["base_vs_base_reseed"], b["tuned_vs_tuned_reseed"]) == (0.41, 0.62, 0.58)
    assert b["below_reference"] is True
    text = format_report(rep)
    assert (
        "layer 1 MMCS (Hungarian): base vs tuned 0.410; same model, another seed: base vs base′ 0.620, "
        "tuned vs tuned′ 0.580 — below both references by 0.170 (the references differ by 0.040); one seed pair "
        "each, so the seed-to-seed spread is not measured: a hint that RL changed the basis, not a finding" in text
    )
    at = open_page(monkeypatch, tmp_path, "views/layers.py", run=tiny.run_dir)
    assert not at.exception
    table = next(d.value for d in at.dataframe if "reading" in d.value.columns)
    assert list(table.columns) == [
        "layer",
        "base vs tuned",
        "base vs base′ (same model, another seed)",
        "tuned vs tuned′ (same model, another seed)",
        "reading",
    ]
    assert table.iloc[0].tolist()[1:4] == [0.41, 0.62, 0.58]
    assert (
        table.reading.iloc[0].startswith("below both references by 0.170") and "not a finding" in table.reading.iloc[0]
    )
    captions = " ".join(c.value for c in at.caption)
    assert (
        "RL changed the basis only if it is below these references" in captions and "a hint, not a finding" in captions
    )


def test_feature_statistics_are_consistent(reader):
    layers = reader.feature_layers()
    layers = layers[layers.role.isin(["base", "tuned"])]  # the SAEs' (the diffing dictionaries' are beside them)
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
