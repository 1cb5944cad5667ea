"""The live engines on the quick run: the Ablation lab's (completions with and without features, same
seeds) and the Reward model page's scorer, with every kind of bad input refused by message."""

from __future__ import annotations

import pytest

from lfp_core.live import MAX_FEATURES, LiveEngine, LiveInputError, PreferenceScorer


@pytest.fixture(scope="module")
def engine(quick_run):
    return LiveEngine(quick_run)


def test_an_empty_feature_set_changes_nothing(engine):
    res = engine.run("The film was", {}, n=4, new_tokens=6, seed=1)
    assert res.clean == res.ablated and res.reward_clean == res.reward_ablated and len(res.clean) == 4
    assert res.truncated == 0 and res.prompt_tokens[1:] == [engine.tokenizer.decode([t]) for t in
                                                            engine.tokenizer("The film was", add_special_tokens=False)["input_ids"]]
    assert all(abs(t["change"]) < 1e-5 for t in res.next_tokens)


def test_zeroing_features_reports_their_activations_and_the_next_token_change(engine):
    layer = engine.layers[0]
    text = "This movie was great, the acting was wonderful and the plot"
    probe = engine.run(text, {}, n=1, new_tokens=1)
    # the features that fire on this text at the first selected layer
    from lfp_core.ablation import run_with_ablation

    ids, _ = engine.encode(text, 1)
    import torch

    name = f"blocks.{layer}.hook_mlp_out.hook_sae_acts_post"
    _, cache = run_with_ablation(engine.model, engine.saes, {}, torch.tensor([ids]), [name])
    firing = torch.nonzero(cache[name][0].sum(0) > 0).flatten().tolist()[:20]
    res = engine.run(text, {layer: firing}, n=4, new_tokens=8, seed=0)
    assert len(res.activations) == len(firing)
    assert all(len(v) == len(res.prompt_tokens) for v in res.activations.values())
    assert max(max(v) for v in res.activations.values()) > 0
    assert max(abs(t["change"]) for t in res.next_tokens) > 1e-4
    assert len(res.reward_ablated) == 4 and probe.prompt_tokens == res.prompt_tokens


def test_bad_requests_are_refused_with_a_message(engine):
    layer = engine.layers[0]
    d = engine.d_sae(layer)
    with pytest.raises(LiveInputError, match="empty"):
        engine.run("   ", {})
    with pytest.raises(LiveInputError, match=f"out of range for layer {layer}"):
        engine.run("Hello", {layer: [d]})
    with pytest.raises(LiveInputError, match="no SAE for layer 99"):
        engine.run("Hello", {99: [0]})
    with pytest.raises(LiveInputError, match=f"at most {MAX_FEATURES}"):
        engine.run("Hello", {layer: list(range(MAX_FEATURES + 1))})
    with pytest.raises(LiveInputError, match="completions must be between"):
        engine.run("Hello", {}, n=0)


def test_an_over_long_text_is_truncated_from_the_start_with_a_count(engine):
    words = " good" * (engine.model.cfg.n_ctx + 50)
    res = engine.run("START" + words, {}, n=1, new_tokens=5)
    n_ids = len(engine.tokenizer("START" + words, add_special_tokens=False)["input_ids"])
    assert res.truncated == n_ids - (engine.model.cfg.n_ctx - 1 - 5)
    assert len(res.prompt_tokens) + 5 == engine.model.cfg.n_ctx


def test_preference_scorer(quick_run):
    s = PreferenceScorer(quick_run)
    layer = sorted(s.saes)[0]
    base = s.score("What a wonderful, lovely film", {})
    assert base["clean"] == pytest.approx(base["ablated"], abs=1e-4) and base["oracle"] > 0
    off = s.score("What a wonderful, lovely film", {layer: list(range(64))})
    assert off["ablated"] != pytest.approx(off["clean"], abs=1e-6) and off["clean"] == pytest.approx(base["clean"])
    seq = s.rm.bos + s.rm.tokenizer("What a wonderful, lovely film", add_special_tokens=False)["input_ids"]
    assert base["clean"] == pytest.approx(float(s.rm.score([seq])[0]), abs=1e-5)
    with pytest.raises(LiveInputError, match="empty"):
        s.score("", {})
    with pytest.raises(LiveInputError, match="out of range"):
        s.score("fine", {layer: [10**6]})
