"""Attribution patching with integrated-gradient steps: exact for a metric linear in the features, close
to true ablation for a non-linear one, and the ranking/verification bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfp_core import attribution
from lfp_core.models import load_model


@pytest.fixture(scope="module")
def setup():
    from tests.helpers import random_sae

    sae = random_sae(256, 48, "blocks.1.hook_resid_post")
    model = load_model("demo").hooked()
    for p in model.parameters():
        p.requires_grad_(False)
    toks = torch.randint(1, 4000, (3, 12), generator=torch.Generator().manual_seed(2))
    last = torch.tensor([11, 9, 7])
    pos = torch.arange(12)[None]
    mask = (pos >= 4) & (pos <= last[:, None])
    return model, {1: sae}, toks, last, mask


def test_integrated_gradients_are_exact_for_a_linear_metric(setup):
    model, saes, toks, last, mask = setup
    w = torch.randn(48, generator=torch.Generator().manual_seed(3))
    hook = "blocks.1.hook_resid_post.hook_sae_acts_post"

    def linear(m, t, la, mk):
        acts = {}
        with m.hooks(fwd_hooks=[(hook, lambda a, hook: acts.__setitem__("a", a))]):
            m(t, stop_at_layer=2)
        return ((acts["a"] * w).sum(-1) * mk).sum(-1)

    est, _ = attribution.integrated_gradients(model, saes, 1, toks, last, mask, linear, steps=4)
    true = attribution.true_effects(model, saes, 1, range(48), toks, last, mask, linear)
    assert np.allclose(est, true, atol=1e-3)
    assert (np.abs(true) > 0).any()


def test_estimates_track_true_ablation_for_a_nonlinear_metric(setup):
    model, saes, toks, last, mask = setup

    def logit(m, t, la, mk):  # log-probability of token 42 at the last position
        return torch.log_softmax(m(t), -1)[torch.arange(len(la)), la, 42]

    res = attribution.rank_and_verify(
        model,
        saes,
        [list(x) for x in toks.tolist()],
        [4, 4, 4],
        logit,
        lambda s: (torch.tensor(s), last),
        steps=4,
        top_k=12,
    )
    assert [r["rank"] for r in res["features"]] == list(range(48))
    assert len(res["points"]) == 12 * 3 and sum("true_effect" in r for r in res["features"]) == 12
    assert res["spearman_top"]["rho"] > 0.5 and res["spearman_points"]["rho"] > 0.5


def test_spearman_is_nan_for_constant_or_tiny_inputs():
    assert np.isnan(attribution.spearman([1, 1, 1], [1, 2, 3])["rho"])
    assert np.isnan(attribution.spearman([1, 2], [1, 2])["rho"])
    assert attribution.spearman([1, 2, 3, 4], [2, 4, 6, 9])["rho"] == pytest.approx(1.0)
