"""Evaluation statistics and layer divergence on hand-made inputs and a perturbed demo model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from lfp_core import divergence, evaluation
from lfp_core.models import load_model


def test_paired_difference_matches_a_t_test():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 200)
    tuned = base + 0.3 + rng.normal(0, 0.5, 200)
    d = evaluation.paired_difference(base, tuned)
    diff = tuned - base
    assert d["mean"] == pytest.approx(diff.mean())
    assert d["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(200))
    lo, hi = stats.t.interval(0.95, 199, loc=diff.mean(), scale=d["se"])
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert d["p_value"] == pytest.approx(stats.ttest_rel(tuned, base).pvalue)
    assert d["n_se"] > 3


def test_distinct2_catches_repetition():
    assert evaluation.distinct_n(["a b c d", "e f g"]) == 1.0
    assert evaluation.distinct_n(["great great great great"]) == pytest.approx(1 / 3)


def test_word_shifts_counts_and_valence():
    shifts = evaluation.word_shifts(["the film was bad", "bad plot"], ["the film was great", "great great plot"])
    raised = shifts[shifts.direction == "raised"].set_index("word")
    lowered = shifts[shifts.direction == "lowered"].set_index("word")
    assert raised.loc["great", "tuned_count"] == 3 and raised.loc["great", "base_count"] == 0
    assert raised.loc["great", "valence"] == pytest.approx(3.1)
    assert lowered.loc["bad", "delta"] == -2
    assert "film" not in shifts.word.values  # unchanged words are not shifts


def test_kl_is_zero_for_the_same_model_and_positive_after_a_change(demo_model_dir):
    m = load_model("demo")
    seqs = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15])]
    bos = [m.tokenizer.bos_token_id]
    assert evaluation.per_token_kl(m.hf, m.hf, seqs, bos) == pytest.approx(0.0, abs=1e-6)
    other = copy.deepcopy(m.hf)
    with torch.no_grad():
        head = other.get_output_embeddings().weight
        head.add_(0.05 * torch.randn_like(head))
    assert evaluation.per_token_kl(other, m.hf, seqs, bos) > 1e-4


def test_divergence_finds_the_changed_layer(demo_model_dir):
    m = load_model("demo")
    tuned = copy.deepcopy(m)
    tuned._hooked = None
    with torch.no_grad():
        for p in tuned.hf.gpt_neox.layers[2].mlp.parameters():
            p.add_(0.01 * torch.randn_like(p))
    param = divergence.parameter_divergence(m.hf, tuned.hf)
    assert len(param) == m.info()["n_layers"]
    assert param[2] > 0 and all(param[i] == 0 for i in (0, 1, 3))
    seqs = [[0, 5, 6, 7, 8, 9], [0, 10, 11, 12, 13, 14], [0, 20, 21]]
    cos, rel = divergence.activation_divergence(m.hooked(), tuned.hooked(), seqs)
    assert cos[2] > 0 and rel[2] > 0
    assert cos[0] == pytest.approx(0, abs=1e-6) and cos[1] == pytest.approx(0, abs=1e-6)
    assert divergence.select_layers(param, 1) == [2]
    assert divergence.select_layers([0.1, 0.5, 0.2, 0.4], 2) == [1, 3]  # numeric order


def test_divergence_refuses_another_base_model(demo_model_dir):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = load_model("demo")
    other = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="not the same base model"):
        divergence.parameter_divergence(m.hf, other)


def test_paired_difference_bootstraps_prompts_when_samples_share_them():
    rng = np.random.default_rng(1)
    prompts = np.repeat(np.arange(50), 8)  # 8 samples of each of 50 prompts
    effect = np.repeat(rng.normal(0.3, 1.0, 50), 8)  # the gain depends on the prompt
    base = rng.normal(0, 0.1, 400)
    tuned = base + effect + rng.normal(0, 0.1, 400)
    naive = evaluation.paired_difference(base, tuned)
    clustered = evaluation.paired_difference(base, tuned, groups=prompts)
    assert clustered["mean"] == pytest.approx(naive["mean"]) and clustered["n_clusters"] == 50
    assert clustered["se"] > 2.4 * naive["se"]  # ≈ sqrt(8): 50 independent prompts, not 400 samples
    assert clustered["ci_high"] - clustered["ci_low"] > 2.4 * (naive["ci_high"] - naive["ci_low"])
    assert clustered["p_value"] > naive["p_value"]
    # one sample per prompt: the bootstrap's standard error is the t-test's
    one = evaluation.paired_difference(base, tuned, groups=np.arange(400))
    assert one["se"] == pytest.approx(naive["se"], rel=0.1)
