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
    assert low["lower_than_all"] and low["beyond_all"] and low["p_rank"] == 1 / 6 and low["p"] < 0.01
    same = compare_with_controls(controls[0], controls[1:])
    assert same["p"] > 0.05
    # the hypothesised direction: a set that raises the reward is extreme for "raise", not for "lower"
    high = rng.normal(1, 0.1, size=200)
    assert compare_with_controls(high, controls, "raise")["p_rank"] == 1 / 6
    assert compare_with_controls(high, controls, "lower")["p_rank"] == 1.0
    with pytest.raises(ValueError, match="not paired"):
        compare_with_controls(high[:10], controls)


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


# --- the significance test (issue 17): enough, matched controls and a p-value with the right null -------------
def test_default_settings_let_the_rank_test_go_below_005():
    """With 5 random sets the rank p could never go below 1/6; the default number reaches p < 0.05 for a set
    more extreme than every control."""
    import numpy as np

    from lfp_core import ablation
    from lfp_core.settings import AblationSettings

    n_random = AblationSettings().random
    rng = np.random.default_rng(3)
    controls = rng.normal(0, 1, size=(n_random, 64))
    got = ablation.compare_with_controls(rng.normal(-3, 1, size=64), controls)
    assert got["p_rank"] == 1 / (n_random + 1) < 0.05
    assert ablation.min_p(n_random) == got["p_rank"]
    assert got["n_random"] == n_random and got["random_lo"] <= got["random_median"] <= got["random_hi"]


def test_p_values_are_uniform_when_the_tested_set_is_one_more_random_set():
    """The null: a random set of the same size. When random sets differ in their true effect (as real feature
    sets do) and the tested set is drawn from the same distribution, neither p-value is systematically small;
    a bootstrap over prefixes with the controls held fixed ignores the spread between sets and is."""
    import numpy as np
    from scipy import stats

    from lfp_core.ablation import compare_with_controls

    rng = np.random.default_rng(11)
    m, n, trials = 20, 64, 300
    p_rank, p = [], []
    for _ in range(trials):
        effects = rng.normal(0, 0.3, size=m + 1)  # each set's true mean change; per-prefix noise SD 1
        sets = effects[:, None] + rng.normal(0, 1, size=(m + 1, n))
        got = compare_with_controls(sets[0], sets[1:])
        p_rank.append(got["p_rank"])
        p.append(got["p"])
    p_rank, p = np.array(p_rank), np.array(p)
    assert 0.01 <= (p_rank <= 0.05).mean() <= 0.1  # exactly 1/21 in expectation
    assert 0.4 < p_rank.mean() < 0.6
    assert 0.01 <= (p <= 0.05).mean() <= 0.1
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_random_sets_are_matched_in_activation_mass():
    """A probe's top features are dense; their controls come from features of about the same activation mass,
    not from the whole layer."""
    import numpy as np

    from lfp_core.ablation import random_sets

    rng = np.random.default_rng(5)
    mass = {layer: {f: float(np.exp(rng.uniform(-8, 0))) for f in range(300)} for layer in (2, 3)}
    order = {layer: sorted(v, key=v.get) for layer, v in mass.items()}
    dense = {2: order[2][-6:], 3: order[3][-2:]}  # the densest features of each layer
    middle = {2: order[2][145:150]}
    for like in (dense, middle):
        draws = random_sets(mass, like, n=20, seed=2, exclude=like)
        for layer, ids in like.items():
            rank = {f: i for i, f in enumerate(order[layer])}
            lo, hi = min(rank[f] for f in ids), max(rank[f] for f in ids)
            got = [rank[f] for d in draws for f in d[layer]]
            assert all(len(d[layer]) == len(ids) and not set(d[layer]) & set(ids) for d in draws)
            reach = 300 * 0.1 + len(ids)  # a decile-wide stratum around each, widened by the set's own picks
            assert all(lo - reach <= r <= hi + reach for r in got)
    uniform = random_sets({a: list(v) for a, v in mass.items()}, dense, n=20, seed=2, exclude=dense)
    rank2 = {f: i for i, f in enumerate(order[2])}
    assert np.median([rank2[f] for d in uniform for f in d[2]]) < 250  # an unmatched draw is not


def test_too_few_random_sets_are_refused_with_the_reason():
    from lfp_core.config import preset_config
    from lfp_core.errors import ConfigError
    from lfp_core.precompute import parse_overrides
    from lfp_core.settings import AblationSettings

    with pytest.raises(ConfigError, match=r"1/\(N\+1\).*p < 0\.05"):
        AblationSettings(random=19)
    with pytest.raises(ConfigError, match=r"ablation_random.*0\.167 for N=5"):
        preset_config("quick", **parse_overrides(["ablation_random=5"]))
    assert AblationSettings(random=20).random == 20


def test_labelled_features_are_tested_by_the_sign_of_their_probe_weight():
    import pandas as pd

    from lfp_core.pipeline.ablation import tested_sets

    probe = pd.DataFrame({"layer": [2, 2, 3, 3, 2], "feature": [1, 2, 3, 4, 5], "weight": [0.9, -0.8, 0.5, 0.4, 0.3]})
    labels = pd.DataFrame(
        {
            "layer": [2, 2, 3, 3, 2],
            "feature": [1, 2, 4, 9, 5],
            "relevant": [True, True, True, True, None],
            "probe_weight": [0.9, -0.8, 0.4, None, 0.3],
        }
    )
    alive = {(2, 1), (2, 2), (3, 3), (3, 4), (2, 5), (3, 9)}
    got = {name: (feats, hyp) for name, feats, hyp in tested_sets(probe, labels, alive, k=2)}
    assert got["probe_top"] == ({2: [1], 3: [3]}, "lower")
    assert got["labelled_pos"] == ({2: [1], 3: [4]}, "lower")  # (2, 5) is not relevant, (3, 9) has no weight
    assert got["labelled_neg"] == ({2: [2]}, "raise")
    only_pos = labels[labels.probe_weight.fillna(0) >= 0]
    assert [n for n, _, _ in tested_sets(probe, only_pos, alive, k=2)] == ["probe_top", "labelled_pos"]


def test_a_prefix_draws_the_same_tokens_in_any_batch(setup):
    """Per-prefix seeds: the random sets, sampled on the first prefixes only, draw what the tested sets draw
    there; the stage's batches split at rank_n so those rows are always sampled in identical batches."""
    from lfp_core.ablation import ablated, sample
    from lfp_core.pipeline.ablation import BATCH, batches

    model, sae, tokens = setup
    prompts = torch.cat([tokens, tokens.flip(0)])  # 4 rows
    with ablated(model, {2: sae}, {2: [0, 1]}):
        all4 = sample(model, prompts, 9, seed=[5, 6, 7, 8])
        first2 = sample(model, prompts[:2], 4, seed=[5, 6])
    assert [a[: len(b)] for a, b in zip(all4, first2)] == first2 and all(len(b) for b in first2)
    assert batches(300, 64) == [(0, 64), (64, 64 + BATCH), (64 + BATCH, 300)]
    assert batches(300, 128) == [(0, 128), (128, 256), (256, 300)] and batches(50, 256) == [(0, 50)]
