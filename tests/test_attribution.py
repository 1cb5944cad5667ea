"""Single-feature attribution: AtP and the one-feature-path estimate target the effect of zeroing one
feature (not a share of zeroing the whole layer), gradients pass through other layers' spliced SAEs as the
identity, the check ablates a random sample as well as the top features, the policy's metric is a behaviour
of the policy, and a layer without an SAE is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfp_core import attribution
from lfp_core.ablation import ablated
from lfp_core.errors import BadInputError
from lfp_core.models import load_model

HOOK1 = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    from tests.helpers import random_sae

    model = load_model("demo").hooked()
    for p in model.parameters():
        p.requires_grad_(False)
    saes = {1: random_sae(256, 48, HOOK1), 2: random_sae(256, 64, "blocks.2.hook_resid_post", seed=1)}
    toks = torch.randint(1, 4000, (3, 12), generator=torch.Generator().manual_seed(2))
    last = torch.tensor([11, 9, 7])
    pos = torch.arange(12)[None]
    mask = (pos >= 4) & (pos <= last[:, None])
    return model, saes, toks, last, mask


def _logprob(m, t, la, mk):  # log-probability of token 42 after the last position: non-linear in the features
    return torch.log_softmax(m(t), -1)[torch.arange(len(la)), la, 42]


def _feature_metric(weights: torch.Tensor, power: int):
    """(Σ_pos∈mask Σ_f w_f a_f(pos))^power of layer 1's features: features interact when power > 1."""

    def metric(m, t, la, mk):
        acts = {}
        with m.hooks(fwd_hooks=[(HOOK1 + ".hook_sae_acts_post", lambda a, hook: acts.__setitem__("a", a))]):
            m(t, stop_at_layer=2)
        return (((acts["a"] * weights).sum(-1) * mk).sum(-1)) ** power

    return metric


def _layer_wide_ig(model, sae, toks, last, mask, scorer, steps=4) -> np.ndarray:
    """The estimator used before (integrated gradients scaling every feature of the layer together),
    reimplemented to show what it estimates instead."""
    m = mask.float()[..., None]
    total, held = None, {}
    for k in range(steps):
        alpha = (k + 0.5) / steps

        def scale(acts, hook, alpha=alpha):
            held["a"] = acts.detach()
            held["x"] = (acts.detach() * (1 - (1 - alpha) * m)).requires_grad_(True)
            return held["x"]

        with (
            torch.enable_grad(),
            model.saes(saes=[sae], use_error_term=True),
            model.hooks(fwd_hooks=[(HOOK1 + ".hook_sae_acts_post", scale)]),
        ):
            (g,) = torch.autograd.grad(scorer(model, toks, last, mask).sum(), held["x"])
        total = g if total is None else total + g
    return (-(held["a"] * total / steps * m).sum(1)).numpy()


def _med_rel(est, true) -> float:
    return attribution.agreement(np.ravel(est), np.ravel(true))["median_rel_err"]


def test_atp_and_path_are_exact_for_a_linear_metric(setup):
    model, saes, toks, last, mask = setup
    linear = _feature_metric(torch.randn(48, generator=torch.Generator().manual_seed(3)), 1)
    est, _, active = attribution.atp(model, saes, 1, toks, last, mask, linear)
    true, path = attribution.single_feature(model, saes, 1, range(48), toks, last, mask, linear, steps=1)
    assert (np.abs(true) > 0).any() and np.allclose(est, true, atol=1e-3) and np.allclose(path, true, atol=1e-3)
    assert (true[~active] == 0).all() and (est[~active] == 0).all()  # a feature that does not fire has no effect


def test_estimators_target_the_single_feature_effect(setup):
    """Defect 1 (a): with interacting features the old layer-wide IG estimated a share of zeroing the whole
    layer (here half of AtP's first-order term), not the effect of zeroing one feature."""
    model, saes, toks, last, mask = setup
    quad = _feature_metric(torch.rand(48, generator=torch.Generator().manual_seed(4)) + 0.5, 2)
    est, _, _ = attribution.atp(model, saes, 1, toks, last, mask, quad)
    true, path = attribution.single_feature(model, saes, 1, range(48), toks, last, mask, quad, steps=2)
    assert _med_rel(path, true) < 1e-4  # the midpoint rule is exact for a quadratic along the feature's axis
    assert _med_rel(est, true) < 0.1
    assert _med_rel(_layer_wide_ig(model, saes[1], toks, last, mask, quad), true) > 0.4

    # a real model output: the path estimate converges to the truth, AtP is its one-point rule
    est, _, _ = attribution.atp(model, saes, 1, toks, last, mask, _logprob)
    true, path = attribution.single_feature(model, saes, 1, range(48), toks, last, mask, _logprob, steps=4)
    assert _med_rel(path, true) < 0.01 < _med_rel(est, true)
    assert np.allclose(attribution.path_estimates(model, saes, 1, range(48), toks, last, mask, _logprob, 4), path)


def test_gradient_passes_a_downstream_sae_as_the_identity(setup):
    """Defect 1 (b): sae-lens computes a spliced SAE's error term without gradient, so with the layer-2 SAE
    spliced as well, the gradient wrt layer 1's features followed layer 2's reconstruction."""
    model, saes, toks, last, mask = setup
    _, g_both, m_both = attribution.clean_gradients(model, saes, 1, toks, last, mask, _logprob)
    _, g_one, m_one = attribution.clean_gradients(model, {1: saes[1]}, 1, toks, last, mask, _logprob)
    scale = float(g_one.abs().max())
    assert scale > 0 and float((g_both - g_one).abs().max()) <= 1e-5 * scale and torch.allclose(m_both, m_one)

    held = {}  # what splicing every SAE the sae-lens way gives (the old code): not the model's gradient

    def leaf(acts, hook):
        held["x"] = acts.detach().requires_grad_(True)
        return held["x"]

    with (
        torch.enable_grad(),
        model.saes(saes=list(saes.values()), use_error_term=True),
        model.hooks(fwd_hooks=[(HOOK1 + ".hook_sae_acts_post", leaf)]),
    ):
        (g_old,) = torch.autograd.grad(_logprob(model, toks, last, mask).sum(), held["x"])
    assert float(torch.nn.functional.cosine_similarity(g_old.flatten(), g_one.flatten(), 0)) < 0.9

    # the truth with only the attributed layer's SAE spliced is the truth with every SAE spliced
    feats = [0, 5, 17, 40]
    true = attribution.true_effects(model, saes, 1, feats, toks, last, mask, _logprob)
    with torch.no_grad():
        with ablated(model, saes, {}):
            clean = _logprob(model, toks, last, mask)
        ref = []
        for f in feats:
            with ablated(model, saes, {1: [f]}, mask=mask):
                ref.append((_logprob(model, toks, last, mask) - clean).numpy())
    assert np.allclose(true, np.stack(ref, 1), atol=1e-5)


def test_verification_covers_a_random_sample(setup):
    """Defect 1 (c): the top features by estimate and a seeded uniform sample per layer are ablated; the
    random sample's checks carry recall against the true top-k."""
    model, saes, toks, last, mask = setup
    seqs = [list(x) for x in toks.tolist()]
    kw = dict(steps=2, top_k=6, random_k=16, seed=5)
    res = attribution.rank_and_verify(model, saes, seqs, [4, 4, 4], _logprob, lambda s: (torch.tensor(s), last), **kw)
    rows = res["features"]
    assert [r["rank"] for r in rows] == list(range(48 + 64))
    assert (np.diff([r["estimate_abs"] for r in rows]) <= 0).all()
    top = {(r["layer"], r["feature"]) for r in rows[:6]}
    rand = {(la, f) for la in (1, 2) for f in attribution.random_features(saes[la].cfg.d_sae, 16, 5, la)}
    assert len(rand) == 32 and rand - top  # features the top-k alone would never check
    verified = {(r["layer"], r["feature"]): r for r in rows if r["verified"]}
    assert set(verified) == top | rand
    for key, r in verified.items():
        assert r["verified"] == ("both" if key in top and key in rand else "top" if key in top else "random")
        assert r["true_effect"] is not None and r["estimate_path"] is not None
    assert all(r["true_effect"] is None for r in rows if not r["verified"])
    assert res["n_random"] == 32 and res["n_random_active"] == sum(verified[k]["n_active"] > 0 for k in rand)
    for sample in ("top", "random"):
        for est in ("atp", "path"):
            c = res["checks"][sample][est]
            assert {"rho", "p", "sign_agree", "median_rel_err", "rho_sign_only"} <= set(c)
            assert ("recall" in c) == (sample == "random")
    assert res["checks"]["random"]["path"]["median_rel_err"] < 0.05
    for p in res["points"]:  # only where the feature fires
        assert verified[(p["layer"], p["feature"])]["n_active"] > 0
    means = {}
    for p in res["points"]:
        means.setdefault((p["layer"], p["feature"]), []).append(p["true_effect"])
    for key, v in means.items():
        assert np.isclose(sum(v) / 3, verified[key]["true_effect"])
    again = attribution.rank_and_verify(model, saes, seqs, [4, 4, 4], _logprob, lambda s: (torch.tensor(s), last), **kw)
    assert [r["verified"] for r in again["features"]] == [r["verified"] for r in rows]  # seeded


def test_policy_metric_is_a_behaviour_of_the_policy(setup):
    """Defect 1 (d): the policy's metric is its expected next-token VADER valence over the completion, not the
    probe's linear read-out of the very features attributed (which made AtP exact by construction)."""
    from lfp_core import reward
    from lfp_core.pipeline.reward_model import policy_scorer
    from lfp_core.stages import STAGES

    model, saes, toks, last, mask = setup
    tok = model.tokenizer
    table = reward.token_valence_table(tok, 4096)
    (good,) = tok.encode(" good", add_special_tokens=False)
    assert (
        table[good] == pytest.approx(reward.lexicon()["good"])
        and table[tok.encode(" film", add_special_tokens=False)[0]] == 0
    )
    assert all(v == 0 for i, v in enumerate(table) if not tok.decode([i])[:1].isspace())  # no word-internal pieces
    scorer = policy_scorer(model)
    with torch.no_grad():
        got = scorer(model, toks, last, mask)
        probs = torch.softmax(model(toks), -1)
    want = ((probs @ torch.tensor(table, dtype=probs.dtype)) * mask).sum(-1)
    assert torch.allclose(got, want, atol=1e-5)
    est, _, _ = attribution.atp(model, saes, 1, toks, last, mask, scorer)
    true = attribution.true_effects(model, saes, 1, range(48), toks, last, mask, scorer)
    assert (np.abs(true) > 0).any() and not np.allclose(est, true, rtol=1e-3)  # not linear in the features
    (spec,) = [s for s in STAGES if s.name == "attribution"]
    assert "probes" not in spec.after  # the stage no longer reads the probe


def test_a_layer_without_an_sae_is_refused_with_the_layers_that_have_one(setup):
    model, saes, toks, last, mask = setup
    with pytest.raises(BadInputError, match=r"no SAE for layer 3.*layers with an SAE: 1, 2"):
        attribution.atp(model, saes, 3, toks, last, mask, _logprob)
    with pytest.raises(BadInputError, match="layers with an SAE: 1"):
        attribution.true_effects(model, {1: saes[1]}, 2, [0], toks, last, mask, _logprob)


def test_agreement_reports_what_a_sign_only_estimator_would_score():
    true = np.array([4.0, -3.0, 2.0, -1.0, 0.01, 0.5])
    a = attribution.agreement(true * 1.5, true, k=2)
    assert a["rho"] == pytest.approx(1.0) and a["sign_agree"] == 1 and a["median_rel_err"] == pytest.approx(0.5)
    assert a["n_rel"] == 5 and a["rel_floor"] == pytest.approx(0.04)  # 0.01 is below 1% of the largest
    assert a["recall"] == 1 and a["k"] == 2 and a["recall_chance"] == pytest.approx(1 / 3)
    assert 0.5 < a["rho_sign_only"] < 1  # knowing the signs alone already ranks mixed-sign effects well
    b = attribution.agreement(-true, true, k=2)
    assert b["sign_agree"] == 0 and b["recall"] == 1  # recall is about |effect|


def test_spearman_is_nan_for_constant_or_tiny_inputs():
    assert np.isnan(attribution.spearman([1, 1, 1], [1, 2, 3])["rho"])
    assert np.isnan(attribution.spearman([1, 2], [1, 2])["rho"])
    assert attribution.spearman([1, 2, 3, 4], [2, 4, 6, 9])["rho"] == pytest.approx(1.0)


def test_report_and_page_show_both_estimators_on_both_samples(setup, tmp_path, monkeypatch):
    """Both estimators side by side, on the top features and on the random sample, labelled as computed."""
    from lfp_core.pipeline.reward_model import PM_METRIC, POLICY_METRIC, _result, _rows, policy_scorer
    from lfp_core.report import build_report, format_report
    from lfp_core.settings import AtPSettings, AttributionStageSettings, RewardSettings, RunSettings
    from lfp_core.stages import stage_names
    from lfp_core.store import RunWriter, put_rows
    from lfp_core.store.summaries import AttributionSummary
    from tests.helpers import open_page
    from tests.tiny_run import TinyRun

    model, saes, toks, last, mask = setup
    s = AttributionStageSettings(
        run=RunSettings(), reward=RewardSettings(), atp=AtPSettings(steps=2, pairs=2, top_k=6, random_k=8)
    )
    detail, rows, points = {}, [], []
    for name, scorer, metric in (("pm", _logprob, PM_METRIC), ("policy", policy_scorer(model), POLICY_METRIC)):
        res = attribution.rank_and_verify(
            model, saes, [list(x) for x in toks.tolist()], [4, 4, 4], scorer, lambda q: (torch.tensor(q), last), 2, 6, 8
        )
        detail[name] = _result(res, s, 3, metric)
        f, p = _rows(name, res)
        rows, points = rows + f, points + p
    run = TinyRun(tmp_path / "tiny").until("labels")
    w, acc = RunWriter(run), {"acc": 1.0, "lo": 0.2, "hi": 1.0, "n": 1}
    pair = {"pair_id": 0, "split": "eval", "prompt_id": 0, "chosen_oracle": 1.0, "rejected_oracle": 0.0}
    with w.transaction() as con:
        put_rows(con, "rm_pairs", [{**pair, "chosen_pm": 1.0, "rejected_pm": 0.0}])
        rm = {"n_train": 1, "n_eval": 1, "pair_acc": acc, "pair_acc_train": acc}
        w.mark_stage("reward_model", stage_names("vader").index("reward_model"), "t", "done", 1.0, rm, con=con)
    with w.transaction() as con:
        put_rows(con, "attribution", rows)
        put_rows(con, "attribution_points", points)
        detail["disagreement"] = {"n_disagree": 0, "n_eval": 1, "n_attributed": 0}
        w.mark_stage("attribution", stage_names("vader").index("attribution"), "t", "done", 1.0, detail, con=con)
    summary = RunWriter(run).reader().summary(AttributionSummary)
    text = format_report(build_report(str(run)))
    for name in ("pm", "policy"):
        checks = summary.check_rows(name)
        assert [(c["sample"].split()[0], c["estimator"].split()[0]) for c in checks] == [
            ("top", "AtP"),
            ("top", "path"),
            ("uniform", "AtP"),
            ("uniform", "path"),
        ]
        for c in checks:
            assert f"{c['sample']}, {c['estimator']}: Spearman {c['rho']:.3f}" in text
    assert "attribution (policy's expected next-token valence)" in text and "recall of the true top" in text

    at = open_page(monkeypatch, run.parent, "views/reward_model.py", run=run)
    assert not at.exception
    for name in ("pm", "policy"):
        if name == "policy":
            at.radio(key="rm_target").set_value("policy's expected next-token valence").run()
        table = next(d.value for d in at.dataframe if "median relative error" in d.value.columns)
        want = summary.check_rows(name)
        assert list(table["Spearman ρ"]) == [c["rho"] for c in want]
        assert list(table["median relative error"]) == [c["median_rel_err"] for c in want]
        assert table["recall of the true top k"].notna().tolist() == [False, False, True, True]
    at.radio(key="rm_feats").set_value("the random sample").run()
    at.radio(key="rm_est").set_value("path").run()
    assert not at.exception
    shown = next(d.value for d in at.dataframe if "checked as" in d.value.columns)
    assert shown["checked as"].isin(["random", "both"]).all() and shown["mean true change"].notna().all()
