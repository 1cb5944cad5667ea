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
    assert res.truncated == 0 and res.prompt_tokens[1:] == [
        engine.tokenizer.decode([t]) for t in engine.tokenizer("The film was", add_special_tokens=False)["input_ids"]
    ]
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


# --- one engine, shared by every browser session (st.cache_resource) -------------------------------------
# A request splices SAEs and zeroing hooks into the engine's one model; without the engine's lock, a
# request running beside another sees the other's ablation (or loses its own SAEs half-way).
CONCURRENT = [
    ("The film was", {1: list(range(0, 24))}, 1),
    ("I hated this movie because the", {2: list(range(40, 80))}, 2),
    ("An ordinary evening at the", {}, 3),
]  # no features: the clean policy, SAEs spliced in


@pytest.fixture(scope="module")
def shared_engine():
    """A live engine on the demo model with random SAEs at layers 1 and 2 (no pipeline run needed)."""
    from lfp_core.models import load_model
    from tests.helpers import random_sae

    m = load_model("demo")
    model = m.hooked()
    d = model.cfg.d_model
    return LiveEngine.from_parts(
        model,
        m.tokenizer,
        {
            1: random_sae(d, 128, "blocks.1.hook_mlp_out", seed=1),
            2: random_sae(d, 128, "blocks.2.hook_mlp_out", seed=2),
        },
    )


def _ask(engine, request):
    text, features, seed = request
    return engine.run(text, features, n=3, new_tokens=6, seed=seed)


def _agree(a, b) -> bool:
    """Texts and rewards equal; next-token probabilities and activations equal up to float rounding."""
    if (a.prompt_tokens, a.clean, a.ablated, a.reward_clean, a.reward_ablated) != (
        b.prompt_tokens,
        b.clean,
        b.ablated,
        b.reward_clean,
        b.reward_ablated,
    ):
        return False
    if [t["token"] for t in a.next_tokens] != [
        t["token"] for t in b.next_tokens
    ] or a.activations.keys() != b.activations.keys():
        return False
    close = [
        x["p_ablated"] == pytest.approx(y["p_ablated"], abs=1e-6)
        and x["p_clean"] == pytest.approx(y["p_clean"], abs=1e-6)
        for x, y in zip(a.next_tokens, b.next_tokens)
    ]
    return all(close) and all(a.activations[k] == pytest.approx(b.activations[k], abs=1e-5) for k in a.activations)


def test_concurrent_requests_on_one_engine_get_what_they_get_alone(shared_engine):
    import threading

    alone = [_ask(shared_engine, r) for r in CONCURRENT]
    for res in alone[:2]:  # each ablation moves the next-token distribution, so a leak would show
        assert max(abs(t["change"]) for t in res.next_tokens) > 1e-3
    assert all(_agree(_ask(shared_engine, r), a) for r, a in zip(CONCURRENT, alone))  # repeatable alone
    rounds, start = 5, threading.Barrier(len(CONCURRENT))
    wrong: list[str] = []

    def session(i: int) -> None:
        start.wait()
        for k in range(rounds):
            try:
                if not _agree(_ask(shared_engine, CONCURRENT[i]), alone[i]):
                    wrong.append(f"request {i}, round {k}: differs from the request alone")
            except Exception as exc:  # noqa: BLE001 - a crash is a failure of this test too
                wrong.append(f"request {i}, round {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(CONCURRENT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [], f"{len(wrong)} of {rounds * len(CONCURRENT)} concurrent requests went wrong: {wrong[:5]}"
    assert not shared_engine.model.acts_to_saes  # every SAE detached again


def test_concurrent_scores_on_one_scorer_get_what_they_get_alone(quick_run):
    import threading

    s = PreferenceScorer(quick_run)
    first, last = sorted(s.saes)[0], sorted(s.saes)[-1]
    requests = [
        ("What a wonderful, lovely film", {first: list(range(64))}),
        ("A dull and boring movie, I hated it", {last: list(range(32, 96))}),
        ("The plot follows a family", {}),
    ]
    alone = [s.score(t, f) for t, f in requests]
    assert alone[0]["ablated"] != pytest.approx(alone[0]["clean"], abs=1e-4)
    rounds, start = 5, threading.Barrier(len(requests))
    wrong: list[str] = []

    def session(i: int) -> None:
        start.wait()
        for k in range(rounds):
            try:
                got = s.score(*requests[i])
                if got != pytest.approx(alone[i], abs=1e-5):
                    wrong.append(f"request {i}, round {k}: {got} alone {alone[i]}")
            except Exception as exc:  # noqa: BLE001 - a crash is a failure of this test too
                wrong.append(f"request {i}, round {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_the_live_lab_scores_with_the_run_s_reward_plugin(shared_engine, tmp_path):
    """The live engine scores its completions with the reward it is given (the run's plug-in), on the
    typed text as the prompt; VADER when none is given."""
    from lfp_core import reward
    from lfp_core.rewards import load_reward

    (tmp_path / "plug.py").write_text(
        "def score(prompts, completions):\n    return [len(p) + c.count(' ') for p, c in zip(prompts, completions)]\n"
    )
    res = shared_engine.run("The movie was", {1: [3]}, n=3, new_tokens=6, seed=0)
    assert res.reward_clean == [reward.reward(c) for c in res.clean]
    plugged = LiveEngine.from_parts(
        shared_engine.model,
        shared_engine.tokenizer,
        shared_engine.saes,
        reward=load_reward(f"python:{tmp_path / 'plug.py'}:score"),
    )
    got = plugged.run("The movie was", {1: [3]}, n=3, new_tokens=6, seed=0)
    assert got.clean == res.clean and got.ablated == res.ablated  # same samples, another score
    assert got.reward_clean == [len("The movie was") + c.count(" ") for c in got.clean]
    assert got.reward_ablated == [len("The movie was") + c.count(" ") for c in got.ablated]
