"""The causal checks' interventions (lfp_core/pipeline/diff_causal.py): what is removed from the fine-tuned model
is exactly the tested latents' contribution to its reconstruction, and the tested set is chosen as it says."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lfp_core.crosscoder import Crosscoder
from lfp_core.pipeline.diff_causal import _ablate_edit, _steer_vector, choose_tested, raw_decoder
from tests.helpers import random_sae


def _crosscoder(d=8, d_sae=16, seed=0) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(d, d_sae, arch="l1")  # l1: the code is the plain ReLU, the same whatever the batch
    with torch.no_grad():
        for p in (cc.W_enc, cc.W_dec, cc.b_dec):
            p.normal_(0, 0.3)
        cc.scale.copy_(torch.tensor([0.5, 2.0]))
    return cc.eval()


def test_ablating_crosscoder_latents_removes_exactly_their_contribution_to_the_other_model():
    cc = _crosscoder()
    base, other = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    ids = [1, 4, 7]
    got = _ablate_edit("crosscoder", cc, ids, "blocks.0.hook_mlp_out")["blocks.0.hook_mlp_out"](base, other)
    f = cc.encode(torch.stack([base, other], dim=-2).reshape(15, 2, 8))
    keep = f.clone()
    keep[:, ids] = 0
    # the reconstruction of the other model (slot 1) loses exactly what zeroing the latents takes out of it
    lost = (cc.decode(f) - cc.decode(keep))[:, 1].reshape(3, 5, 8)
    assert torch.allclose(got, other - lost, atol=1e-5)
    all_ids = list(range(16))
    none_left = _ablate_edit("crosscoder", cc, all_ids, "h")["h"](base, other)
    rec = cc.decode(f)[:, 1].reshape(3, 5, 8) - (cc.b_dec[1] / cc.scale[1])
    assert torch.allclose(none_left, other - rec, atol=1e-5)


def test_ablating_difference_sae_features_removes_their_part_of_the_difference():
    sae = random_sae(8, 12, "blocks.0.hook_mlp_out").eval()
    base, other = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    ids = [0, 5]
    got = _ablate_edit("diff_sae", sae, ids, "h")["h"](base, other)
    f = sae.encode((other - base).reshape(8, 8))
    want = other - (f[:, ids] @ sae.W_dec[ids]).reshape(2, 4, 8)
    assert torch.allclose(got, want, atol=1e-5)


def test_the_steering_vector_is_the_sets_expected_contribution_in_raw_units():
    cc = _crosscoder()
    v = _steer_vector("crosscoder", cc, [2, 3], {2: 0.5, 3: 2.0})
    assert torch.allclose(v, 0.5 * raw_decoder(cc, 1)[2] + 2.0 * raw_decoder(cc, 1)[3])
    assert torch.allclose(raw_decoder(cc, 1), cc.W_dec[:, 1] / 2.0)


def test_the_tested_set_is_robust_first_then_tuned_only_then_the_most_tuned_leaning():
    lat = pd.DataFrame(
        {
            "latent": range(6),
            "class": ["shared", "tuned-only", "robust tuned-only", "tuned-only", "shared", "dead"],
            "density": [0.1, 0.2, 0.01, 0.3, 0.1, 0.0],
            "mean_act": [1.0, 1.0, 1.0, 1.0, 2.0, np.nan],
            "rel_norm": [0.5, 0.95, 0.97, 0.92, 0.6, np.nan],
        }
    )
    assert choose_tested(lat, "crosscoder", 4) == ([2], "robust tuned-only")
    no_robust = lat.assign(**{"class": lat["class"].replace("robust tuned-only", "tuned-only")})
    assert choose_tested(no_robust, "crosscoder", 2) == ([3, 1], "tuned-only (none robust)")  # by mass
    shared = lat.assign(**{"class": "shared"})
    ids, why = choose_tested(shared, "crosscoder", 3)
    assert ids == [2, 1, 3] and "no tuned-only latent" in why  # by relative norm; the dead latent never
    assert choose_tested(lat, "diff_sae", 2) == ([3, 1], "largest activation mass")
