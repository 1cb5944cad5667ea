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
    from tests.helpers import random_sae

    sae = random_sae(256, 64, "blocks.2.hook_mlp_out")
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


# --- sampling under an ablation, and the statistics -------------------------------------------------------
def test_sampling_is_seeded_and_a_row_mask_ablates_only_its_rows(setup):
    from lfp_core.ablation import ablated, coupled_rows, sample

    model, sae, tokens = setup
    prompts = tokens[:1].repeat(4, 1)
    with ablated(model, {2: sae}, {}):
        a = sample(model, prompts, 6, seed=3)
        b = sample(model, prompts, 6, seed=3)
    assert a == b and all(len(x) <= 6 for x in a)
    clean, same = coupled_rows(model, {2: sae}, {}, prompts, 6, seed=3)
    assert clean == same == a  # an empty set: both halves are the clean policy's own draws
    fired = int(torch.nonzero(run_with_ablation(model, {2: sae}, {}, tokens[:1], [ACTS])[1][ACTS][0].sum(0) > 0)[0])
    x = tokens[:1].repeat(2, 1)
    mask = torch.tensor([[0.0], [1.0]])
    with torch.no_grad(), ablated(model, {2: sae}, {2: [fired]}, mask=mask):
        both = model(x)
    abl, _ = run_with_ablation(model, {2: sae}, {2: [fired]}, tokens[:1])
    with torch.no_grad():
        clean_logits = model(tokens[:1])
    assert torch.allclose(both[0], clean_logits[0], atol=1e-4) and torch.allclose(both[1], abl[0], atol=1e-5)


def test_cached_sampler_draws_what_full_forward_passes_draw(setup):
    """The sampler (KV cache; the prompt pass unembeds only its last position) picks the tokens a
    plain full forward pass per step picks from the same uniforms, with an ablation active."""
    from lfp_core.ablation import ablated, sample

    model, sae, tokens = setup
    prompts = tokens.clone()
    steps, seed = 5, 11
    u = torch.rand((prompts.shape[0], steps), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fired = {2: [0, 1, 2, 3]}
    with torch.no_grad(), ablated(model, {2: sae}, fired):
        got = sample(model, prompts, steps, seed)
        seq = prompts
        for step in range(steps):
            cdf = torch.softmax(model(seq)[:, -1], -1).cumsum(-1)
            nxt = torch.searchsorted(cdf, u[:, step : step + 1].to(cdf) * cdf[:, -1:]).clamp_(max=cdf.shape[1] - 1)
            seq = torch.cat([seq, nxt], 1)
    ref = seq[:, prompts.shape[1] :].tolist()
    eos = model.tokenizer.eos_token_id
    assert got == [r[: r.index(eos)] if eos in r else r for r in ref]


def test_paired_effect_and_comparison_with_random_sets():
    import numpy as np

    from lfp_core.ablation import compare_with_controls, paired_effect

    before = np.array([1.0, 2.0, 3.0, 4.0])
    e = paired_effect(before, before - 1.0)
    assert e["diff"] == -1.0 and e["diff_lo"] == e["diff_hi"] == -1.0 and e["before"] == 2.5 and e["after"] == 1.5
    rng = np.random.default_rng(0)
    controls = rng.normal(0, 0.1, size=(5, 200))
    low = compare_with_controls(rng.normal(-1, 0.1, size=200), controls)
    assert low["lower_than_all"] and low["p_rank"] == 1 / 6 and low["p"] < 0.01
    same = compare_with_controls(controls[0], controls[1:])
    assert same["p"] > 0.05


def test_random_sets_match_sizes_per_layer_and_avoid_the_tested_set():
    from lfp_core.ablation import random_sets

    alive = {2: list(range(20)), 3: list(range(10))}
    like = {2: [0, 1, 2], 3: [5]}
    draws = random_sets(alive, like, n=6, seed=1, exclude=like)
    assert len(draws) == 6 and len({tuple(d[2]) for d in draws}) > 1
    for d in draws:
        assert len(d[2]) == 3 and len(d[3]) == 1 and not set(d[2]) & {0, 1, 2} and 5 not in d[3]
    with pytest.raises(ValueError, match="layer 3 has 2 firing features"):
        random_sets({2: alive[2], 3: [5, 6, 7]}, {2: [0], 3: [5, 6, 7]}, n=1, seed=0, exclude={3: [5]})
