"""The activation-difference lens (lfp_core.difflens) on a planted fine-tune: tuned = base + a constant v on
the last block's MLP output, with v the direction that provably promotes one token most through the lens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfp_core.difflens import lens_logits, lens_tokens, mean_difference, steering_effect
from lfp_core.errors import BadInputError
from lfp_core.models import load_model, to_hooked

LAYER = 3


@pytest.fixture(scope="module")
def planted():
    lm = load_model("demo")
    base, tuned = (to_hooked(lm.hf, lm.tokenizer, lm.spec) for _ in range(2))
    with torch.no_grad():
        # g_s = centred(w_ln ⊙ W_U[:, s]): the lens logit of token s for a centred v is <v, g_s>; for
        # v ∝ g_t, t is the top promoted token when <g_t, g_t> > <g_t, g_s> for every other s (checked)
        wu = base.W_U * base.ln_final.w[:, None]
        g = wu - wu.mean(0, keepdim=True)
        target = int(base.tokenizer(" great")["input_ids"][-1])
        dots = g[:, target] @ g
        assert int(dots.argmax()) == target and (dots.topk(2).values.diff().abs() > 0.1).all()
        v = 20.0 * g[:, target] / g[:, target].norm()
        tuned.blocks[LAYER].mlp.b_out += v
    docs = torch.randint(1, 4000, (10, 12), generator=torch.Generator().manual_seed(5)).tolist()
    docs[3] = docs[3][:2]  # a short document contributes what it has
    return base, tuned, v.numpy().astype(float), target, docs


def test_mean_difference_recovers_the_planted_vector(planted):
    base, tuned, v, _, docs = planted
    md = mean_difference(base, tuned, docs, 0, 5, [1, LAYER])
    assert np.all(md[1] == 0.0)  # the blocks before the change compute the same thing
    cos = md[LAYER] @ v / (np.linalg.norm(md[LAYER]) * np.linalg.norm(v))
    assert cos > 0.99 and np.allclose(md[LAYER], v, atol=1e-4)  # exactly v, up to float rounding


def test_the_lens_reads_the_planted_token(planted):
    base, tuned, v, target, docs = planted
    md = mean_difference(base, tuned, docs, 0, 5, [LAYER])[LAYER]
    promoted, suppressed = lens_tokens(base, md, top=10)
    assert promoted[0][0] == target
    assert [t for t, _ in promoted] == [t for t, _ in lens_tokens(base, v, top=10)[0]]
    logits = lens_logits(base, v)
    assert [t for t, _ in suppressed] == torch.argsort(logits)[:10].tolist()
    assert all(a >= b for (_, a), (_, b) in zip(promoted, promoted[1:]))
    # the LayerNorm's division is a positive scale: a scaled vector has the same ranking
    assert [t for t, _ in lens_tokens(base, 3.0 * v, top=10)[0]] == [t for t, _ in promoted]


def test_steering_with_the_planted_vector_beats_random_directions(planted):
    base, tuned, _, target, docs = planted
    md = mean_difference(base, tuned, docs, 0, 5, [LAYER])[LAYER]
    prompts = [d[:4] for d in docs[:6] if len(d) >= 4]

    def reward(_prompts, completions):
        return np.array([c.count(target) for c in completions], float)

    out = steering_effect(base, md, LAYER, prompts, 0, 8, list(range(len(prompts))), reward, n_random=19, seed=1)
    assert out["change"]["lo"] > 0 and out["steered"] > out["unsteered"]
    assert out["p_rank"] == pytest.approx(1 / 20) and out["beyond_all"]
    assert len(out["random_changes"]) == 19
    with pytest.raises(BadInputError, match="at least 19"):
        steering_effect(base, md, LAYER, prompts, 0, 8, list(range(len(prompts))), reward, n_random=5)
