"""Feature ablation keeps the SAE error term: an empty feature set reproduces the clean model, and
zeroing a feature changes the layer's output only where that feature was active."""

from __future__ import annotations

import pytest
import torch

from lfp_core.ablation import run_with_ablation
from lfp_core.models import load_model

ACTS = "blocks.2.hook_mlp_out.hook_sae_acts_post"
OUT = "blocks.2.hook_mlp_out.hook_sae_output"


@pytest.fixture(scope="module")
def setup():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=256, d_sae=64))
    sae.cfg.metadata.hook_name = "blocks.2.hook_mlp_out"
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    model = load_model("demo").hooked()
    tokens = torch.randint(1, 4000, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, sae, tokens


def test_empty_feature_set_gives_the_clean_logits(setup):
    model, sae, tokens = setup
    with torch.no_grad():
        clean = model(tokens)
    logits, _ = run_with_ablation(model, {2: sae}, {2: []}, tokens)
    assert torch.allclose(logits, clean, atol=1e-4)  # only float rounding of x − x̂ + x̂
    assert not model.acts_to_saes  # the SAE is detached again


def test_ablation_changes_only_positions_where_the_feature_fired(setup):
    model, sae, tokens = setup
    _, clean = run_with_ablation(model, {2: sae}, {2: []}, tokens, names=[ACTS, OUT])
    fired = clean[ACTS] > 0  # [batch, pos, d_sae]
    share = fired.float().mean((0, 1))
    f = int(torch.nonzero((share > 0.1) & (share < 0.6))[0])  # a feature active at some positions only
    logits, abl = run_with_ablation(model, {2: sae}, {2: [f]}, tokens, names=[ACTS, OUT])
    changed = (abl[OUT] - clean[OUT]).abs().amax(-1) > 1e-6  # [batch, pos]
    assert torch.equal(changed, fired[..., f]) and changed.any()
    assert (abl[ACTS][..., f] == 0).all()
    with torch.no_grad():
        base = model(tokens)
    for b in range(tokens.shape[0]):  # causal: logits before the first active position are untouched
        first = int(torch.nonzero(fired[b, :, f])[0]) if fired[b, :, f].any() else tokens.shape[1]
        assert torch.allclose(logits[b, :first], base[b, :first], atol=1e-4)


def test_bad_feature_sets_are_refused(setup):
    model, sae, tokens = setup
    with pytest.raises(ValueError, match="out of range for layer 2"):
        run_with_ablation(model, {2: sae}, {2: [64]}, tokens)
    with pytest.raises(ValueError, match="no SAE for layer 3"):
        run_with_ablation(model, {2: sae}, {3: [0]}, tokens)
