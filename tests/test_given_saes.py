"""Given SAEs and hooks other than hook_mlp_out (``--saes [ROLE=]SRC``, ``--hook NAME``).

The bar: a run given SAEs trains none (its log says so) and its feature tables equal those of the run that
trained them. Runs here are tiny (the demo model, 8 prompts, 2 GRPO steps, 40 corpus documents, 3,000 SAE
training tokens) and go through the command line, as a user runs them; the bad-input cases use SAEs built
in the test and stop before any stage runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lfp_core import precompute
from lfp_core.store import RunReader
from lfp_core.store.summaries import ActivationsSummary, SAEsSummary

_SETS = [
    "rl_steps=2",
    "rl_prompts_per_step=2",
    "rl_generations=2",
    "sae_corpus_docs=40",
    "sae_train_tokens=3000",
    "sae_batch_size=256",
    "sae_ce_docs=8",
    "divergence_sequences=8",
    "sae_sweep_l1=1",
    "sae_variants=relu-1x",
    "feature_top_k=5",
]
TINY = ["--preset", "quick", "--n-prompts", "8", "--n-eval-prompts", "8", "--gen-batch-size", "8"]
TINY += [arg for item in _SETS for arg in ("--set", item)]


def _run(out: Path, *extra: str, until: str = "features") -> int:
    return precompute.main([*TINY, "--out", str(out), "--until", until, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run that trains its SAEs (the source of the given SAEs below)."""
    out = tmp_path_factory.mktemp("given") / "trained"
    assert _run(out) == 0
    return out


@pytest.mark.slow
def test_a_run_given_saes_trains_none_and_its_features_equal_the_training_runs(trained, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    out = tmp_path / "given"
    assert _run(out, "--saes", f"tuned={trained}", "--saes", f"base={trained / 'artifacts' / 'saes'}") == 0
    assert (
        f"saes: using 4 given SAEs from tuned={trained}, base={trained / 'artifacts' / 'saes'}, training none"
        in caplog.text
    )
    first, second = RunReader(trained), RunReader(out)
    t1, t2 = first.saes(), second.saes()
    assert set(t2.kind) == {"main"} and len(t2) == 4  # no reseed, variant, sweep or MFR SAE was trained
    main1 = t1[t1.kind == "main"].set_index("sae_id").sort_index()
    main2 = t2.set_index("sae_id").sort_index()
    assert list(main2.index) == list(main1.index)
    assert (main2.hook_name == main1.hook_name).all() and main2.seconds.isna().all() and main2.seed.isna().all()
    metrics = ["fvu", "mse", "l0", "dead_frac", "cos_sim", "ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered"]
    pd.testing.assert_frame_equal(main2[metrics], main1[metrics])  # the same SAEs on the same held-out harvest
    layers = sorted(set(t2.layer))
    for role in ("tuned", "base"):
        for layer in layers:
            pd.testing.assert_frame_equal(second.features(role, layer), first.features(role, layer))
            f = first.features(role, layer)
            fid = int(f.feature[f.n_fired > 0].iloc[0])
            for kind in ("top", "interval"):
                pd.testing.assert_frame_equal(
                    second.feature_examples(role, layer, fid, kind), first.feature_examples(role, layer, fid, kind)
                )
    s = second.summary(SAEsSummary)
    assert s.given == {"tuned": str(trained), "base": str(trained / "artifacts" / "saes")} and s.trained == []
    assert {
        "tuned other-seed reference SAEs",
        "base other-seed reference SAEs",
        "paper SAE variants (relu-1x)",
        "L1 sweep",
        "Mutual Feature Regularization",
    } == set(s.not_applicable)
    assert s.mfr == {} and all(b["below_reference"] is None for b in s.basis)
    h = second.summary(ActivationsSummary)
    assert h.layers == layers and h.hook == "hook_mlp_out" and h.layers_from.startswith("the given SAEs' layers")
    # the stored SAE is the given one, marked as the run's
    cfg = json.loads((out / "artifacts" / "saes" / "tuned-L2-main" / "cfg.json").read_text())
    assert cfg["metadata"]["given_from"] == str(trained / "artifacts" / "saes" / "tuned-L2-main")
    assert cfg["metadata"]["model_name"].endswith(":tuned")

    # the Layers & SAEs page says the SAEs were given and why the comparisons are missing
    from tests.helpers import open_page

    at = open_page(monkeypatch, tmp_path, "views/layers.py", run=out)
    assert not at.exception
    text = " ".join(m.value for m in at.markdown) + " ".join(i.value for i in at.info)
    assert "were **given**" in text and "Not computed for this run" in text and "L1 sweep" in text

    # given for the tuned model only: the base model's SAEs are trained as in a run given none
    caplog.clear()
    one = tmp_path / "one"
    shutil.copytree(out, one)  # the upstream stages are reused; activations, saes, features recompute
    assert _run(one, "--saes", f"tuned={trained}") == 0
    assert "saes: using 2 given SAEs from tuned=" in caplog.text and "training the base model's SAEs" in caplog.text
    t3 = RunReader(one).saes().set_index("sae_id").sort_index()
    assert sorted(t3.index) == sorted(
        [f"{r}-L{ly}-main" for r in ("tuned", "base") for ly in layers] + [f"base-L{ly}-reseed" for ly in layers]
    )  # the base model's main SAEs and their references; none of the tuned model's suite
    base1 = t1.set_index("sae_id").loc[[f"base-L{ly}-{k}" for ly in layers for k in ("main", "reseed")]]
    pd.testing.assert_frame_equal(t3.loc[base1.index, metrics + ["seed"]], base1[metrics + ["seed"]], check_dtype=False)
    s3 = RunReader(one).summary(SAEsSummary)
    assert s3.trained == ["base"] and "base vs tuned MMCS" in s3.not_applicable
    assert "base_vs_tuned" not in set(RunReader(one).sae_pairs().comparison)


@pytest.mark.slow
def test_saes_on_the_residual_stream(trained, tmp_path):
    """--hook hook_resid_post: the harvest reads blocks.L.hook_resid_post, the SAEs are trained on it and
    their records, files and loss-recovered baseline name it."""
    import torch

    from lfp_core.activations import Harvest
    from lfp_core.models import load_hooked

    out = tmp_path / "resid"
    shutil.copytree(trained, out)  # same model, policy and divergence; the harvest and SAEs recompute
    assert _run(out, "--hook", "hook_resid_post", until="saes") == 0
    r = RunReader(out)
    h = r.summary(ActivationsSummary)
    assert h.hook == "hook_resid_post" and h.layers_from == "divergence"
    t = r.saes()
    assert t.hook_name.tolist() == [f"blocks.{ly}.hook_resid_post" for ly in t.layer]
    cfg = json.loads((out / t[t.sae_id == "base-L2-main"].path.iloc[0] / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    # the harvested rows are the base model's resid_post (float16), not its MLP output
    harvest = Harvest(out / "artifacts" / "activations")
    idx = harvest.index()
    doc = int(idx["doc_id"][0])
    rows = np.nonzero(idx["doc_id"] == doc)[0]
    ids = r.corpus_docs().set_index("doc_id").token_ids.loc[doc]
    hooked = load_hooked("demo")
    _, cache = hooked.run_with_cache(torch.tensor([[0, *ids]]), names_filter=["blocks.2.hook_resid_post"])
    want = cache["blocks.2.hook_resid_post"][0, 1:][idx["pos"][rows]].numpy()
    np.testing.assert_allclose(np.asarray(harvest.acts("base", 2)[rows], dtype=np.float32), want, atol=2e-2, rtol=2e-3)
    main = t[t.kind == "main"]
    assert (main.ce_zero > main.ce_clean).all() and np.isfinite(main.ce_loss_recovered).all()
    first = RunReader(trained).saes()
    assert not np.allclose(
        main.sort_values("sae_id").ce_zero, first[first.kind == "main"].sort_values("sae_id").ce_zero
    )  # zero-ablating the stream, not the MLP output

    # someone else's SAEs (sae-lens StandardSAEs) of the tuned model's resid_post at layers 1 and 3, which the
    # divergence stage did not choose: the run studies their layers, and trains the base model's SAEs there
    theirs = tmp_path / "theirs"
    for layer in (3, 1):
        _sae_dir(theirs / f"resid-{layer}", hook=f"blocks.{layer}.hook_resid_post")
    assert _run(out, "--hook", "hook_resid_post", "--saes", str(theirs), until="saes") == 0
    r = RunReader(out)
    h = r.summary(ActivationsSummary)
    assert h.layers == [1, 3] and h.divergence_layers == [2, 3] and "the given SAEs' layers" in h.layers_from
    t = r.saes().set_index("sae_id")
    assert sorted(t.index) == ["base-L1-main", "base-L1-reseed", "base-L3-main", "base-L3-reseed"] + [
        "tuned-L1-main",
        "tuned-L3-main",
    ]
    assert t.loc["tuned-L1-main", "arch"] == "relu" and pd.isna(t.loc["tuned-L1-main", "k"])  # sae-lens "standard"
    assert t.loc["base-L1-main", "hook_name"] == "blocks.1.hook_resid_post"
    assert np.isfinite(t[["fvu", "l0", "dead_frac", "ce_loss_recovered"]].to_numpy(dtype=float)).all()
    assert r.summary(SAEsSummary).layers_from == h.layers_from


# --- bad input: refused before anything is written ---------------------------------------------------------
def _sae_dir(path: Path, hook: str = "blocks.2.hook_mlp_out", d_in: int = 256) -> Path:
    from lfp_core import saes
    from tests.helpers import random_sae

    return saes.save_sae(random_sae(d_in, 64, hook), path)


def _refused(capsys, out: Path, *args: str) -> str:
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    stamp = (out / "run.duckdb").stat().st_mtime_ns if (out / "run.duckdb").exists() else None
    assert precompute.main([*TINY, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    if before is None:
        assert not out.exists(), "a refused run must not create its directory"
    else:
        assert sorted(p.name for p in out.iterdir()) == before
        assert ((out / "run.duckdb").stat().st_mtime_ns if stamp is not None else None) == stamp
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_saes_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    wide = _sae_dir(tmp_path / "wide" / "L2", d_in=128)
    err = _refused(capsys, out, "--saes", f"tuned={wide.parent}")
    assert str(wide) in err and "d_in is 128" in err and "d_model 256" in err

    resid = _sae_dir(tmp_path / "resid", hook="blocks.2.hook_resid_post")
    err = _refused(capsys, out, "--saes", str(resid))
    assert str(resid) in err and "hook_name is blocks.2.hook_resid_post" in err and "harvests hook_mlp_out" in err
    assert "--hook hook_resid_post" in err

    deep = _sae_dir(tmp_path / "deep", hook="blocks.7.hook_mlp_out")
    err = _refused(capsys, out, "--saes", f"base={deep}", "--saes", f"tuned={deep}")
    assert str(deep) in err and "layer 7" in err and "n_layers 4" in err

    err = _refused(capsys, out, "--saes", f"tuned={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in err and "no such directory" in err

    broken = _sae_dir(tmp_path / "broken")
    (broken / "cfg.json").write_text('{"d_in": 256, "d_sae": ')
    err = _refused(capsys, out, "--saes", f"tuned={broken}")
    assert str(broken) in err and "cfg.json is not valid JSON" in err

    no_hook = _sae_dir(tmp_path / "nohook")
    cfg = json.loads((no_hook / "cfg.json").read_text())
    del cfg["metadata"]["hook_name"]
    (no_hook / "cfg.json").write_text(json.dumps(cfg))
    err = _refused(capsys, out, "--saes", f"tuned={no_hook}")
    assert str(no_hook) in err and "field hook_name is missing" in err

    attn_z = _sae_dir(tmp_path / "z", hook="blocks.1.attn.hook_z")
    err = _refused(capsys, out, "--saes", f"tuned={attn_z}")
    assert "blocks.1.attn.hook_z" in err and "not a block's d_model-wide stream" in err

    two = tmp_path / "two"
    _sae_dir(two / "a")
    _sae_dir(two / "b")
    err = _refused(capsys, out, "--saes", f"tuned={two}")
    assert "two SAEs read blocks.2.hook_mlp_out" in err and str(two / "a") in err and str(two / "b") in err

    other_layer = _sae_dir(tmp_path / "l3", hook="blocks.3.hook_mlp_out")
    ok = _sae_dir(tmp_path / "l2")
    err = _refused(capsys, out, "--saes", f"tuned={ok}", "--saes", f"base={other_layer}")
    assert "base SAEs read layers [3] but the tuned SAEs read layers [2]" in err

    err = _refused(capsys, out, "--saes", f"policy={ok}")
    assert "ROLE must be base or tuned" in err
    err = _refused(capsys, out, "--saes", f"tuned={ok}", "--saes", str(ok))
    assert "SAEs twice" in err

    # the demo model runs attention and MLP in parallel: it has no hook_resid_mid
    err = _refused(capsys, out, "--hook", "hook_resid_mid")
    assert "no hook_resid_mid" in err and "parallel" in err
    err = _refused(capsys, out, "--task", "hh", "--saes", str(ok))
    assert "the hh task has no SAE stages" in err
    err = _refused(capsys, out, "--hook", "hook_z")
    assert "sae_source.hook" in err and "hook_resid_post" in err


def test_pretrained_releases_are_parsed_and_refused_offline(tmp_path, capsys):
    """sae-lens:RELEASE loads through sae-lens's pretrained registry (SAE.from_pretrained), which needs the
    hub: offline (as here) the release and its ids are still checked against the registry that ships with
    sae-lens, then the source is refused with what to do instead."""
    from lfp_core.sae_sources import parse_release

    assert parse_release("sae-lens:pythia-70m-deduped-mlp-sm") == ("pythia-70m-deduped-mlp-sm", None)
    assert parse_release("sae-lens:gpt2-small-res-jb:blocks.3.hook_resid_pre, blocks.4.hook_resid_pre") == (
        "gpt2-small-res-jb",
        ["blocks.3.hook_resid_pre", "blocks.4.hook_resid_pre"],
    )
    out = tmp_path / "run"
    err = _refused(capsys, out, "--saes", "sae-lens:pythia-70m-deduped-mlp-sm:blocks.2.hook_mlp_out")
    assert "offline" in err and "HF_HUB_OFFLINE=1" in err and "SAE.from_pretrained" in err and "--saes tuned=DIR" in err
    err = _refused(capsys, out, "--saes", "base=sae-lens:pythia-70m-deduped-mlp-smm")
    assert "not a release of sae-lens's pretrained registry" in err and "pythia-70m-deduped-mlp-sm" in err
    err = _refused(capsys, out, "--saes", "sae-lens:pythia-70m-deduped-mlp-sm:blocks.9.hook_mlp_out")
    assert "no SAE id 'blocks.9.hook_mlp_out'" in err
    err = _refused(capsys, out, "--saes", "sae-lens:")
    assert "name a sae-lens release" in err


def test_given_saes_enter_the_hash_and_the_defaults_do_not(tmp_path):
    """A default run keeps the stage hashes it had before SAEs could be given (no recompute of stored runs);
    given SAE files change the hash of the stages that read them when their config or sizes change."""
    from lfp_core.precompute import stage_hashes
    from lfp_core.settings import ActivationsStageSettings, _to_plain, preset_config, settings_hash

    cfg = preset_config("quick", data_dir=None)
    s = cfg.stage_settings(ActivationsStageSettings)
    before = {k: v for k, v in _to_plain(s).items() if k != "sae_source"}  # the payload before the group existed
    before["corpus"].pop("source")  # (and before the corpus could be given)
    payload = json.dumps({"settings": before, "upstream": ["x"]}, sort_keys=True)
    assert settings_hash(s, ("x",)) == hashlib.sha256(payload.encode()).hexdigest()[:16]
    sae = _sae_dir(tmp_path / "saes" / "L2")
    given = cfg.with_values({"saes_tuned": str(tmp_path / "saes")})
    a, b = stage_hashes(cfg), stage_hashes(given)
    assert {k for k in a if a[k] != b[k]} == {
        "activations",
        "saes",
        "features",
        "probes",
        "labels",
        "ablation",
        "reward_model",
        "attribution",
        "crosscoders",  # downstream of features (and localisation, downstream of activations)
        "localisation",
        "diff_causal",
    }
    c = json.loads((sae / "cfg.json").read_text())
    c["metadata"]["model_name"] = "someone else's"
    (sae / "cfg.json").write_text(json.dumps(c))
    assert stage_hashes(given)["saes"] != b["saes"] and stage_hashes(given)["rlhf"] == b["rlhf"]


def test_directory_sources_and_the_preflight_check_accept_fitting_saes(tmp_path):
    """A folder of sae-lens SAEs, one subdirectory per hook (any names), or one SAE's own folder."""
    from lfp_core.sae_sources import check_saes, given_layers, resolve
    from lfp_core.settings import preset_config

    folder = tmp_path / "mine"
    _sae_dir(folder / "second", hook="blocks.3.hook_resid_post")
    _sae_dir(folder / "first", hook="blocks.1.hook_resid_post")
    (folder / "notes").mkdir()  # not an SAE: ignored
    found = resolve("tuned", str(folder))
    assert [(g.layer, g.hook, g.d_in, g.d_sae) for g in found] == [(1, "hook_resid_post", 256, 64)] + [
        (3, "hook_resid_post", 256, 64)
    ]
    assert [g.where for g in found] == [str(folder / "first"), str(folder / "second")]
    one = resolve("base", str(folder / "second"))
    assert [g.hook_name for g in one] == ["blocks.3.hook_resid_post"]
    cfg = preset_config("quick", data_dir=None, saes_tuned=str(folder), sae_hook="hook_resid_post")
    check_saes(cfg)  # fits the demo model: no error
    assert given_layers(cfg.sae_source) == [1, 3]
