"""The preference model: oracle pairs from completions, and its transformer-lens view scoring exactly as
the transformers sequence-classification model it was trained as."""

from __future__ import annotations

import numpy as np
import torch

from lfp_core import reward_model
from lfp_core.models import load_model


def test_oracle_pairs_prefer_the_higher_reward_and_drop_ties():
    groups = {7: [([1], 0.5), ([2], 0.0), ([3], 0.5)], 9: [([4], -1.0)]}
    pairs = reward_model.oracle_pairs(groups)
    assert len(pairs) == 2  # (1, 3) is a tie; prompt 9 has a single completion
    for p in pairs:
        assert p["prompt_id"] == 7 and p["chosen_oracle"] > p["rejected_oracle"] and p["rejected_ids"] == [2]


def test_hooked_reward_model_scores_like_the_hf_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = load_model("demo")
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(base.spec.location, num_labels=1, dtype=torch.float32)
    hf.config.pad_token_id = base.tokenizer.pad_token_id
    with torch.no_grad():
        hf.score.weight.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "rm")
    rm = reward_model.RewardModel(tmp_path / "rm", base)
    seqs = [[0, 1000, 2000, 3000], [0, 500, 600, 700, 800, 900, 1000]]
    with torch.no_grad():
        want = [float(hf(torch.tensor([s])).logits[0, 0]) for s in seqs]
    got = rm.score(seqs)  # one right-padded batch
    assert np.allclose(got, want, atol=1e-4)
    assert len({round(x, 3) for x in got}) == 2


def test_pair_accuracy_has_a_wilson_interval():
    acc = reward_model.pair_accuracy(np.array([1.0, 2.0, 3.0, 0.0]), np.array([0.0, 1.0, 2.0, 1.0]))
    assert acc["acc"] == 0.75 and acc["n"] == 4 and 0 < acc["lo"] < 0.75 < acc["hi"] < 1


def test_pair_accuracy_ci_resamples_prompts_not_pairs():
    rng = np.random.default_rng(0)
    # 60 prompts x 10 pairs, every pair of a prompt right or wrong together (strong clustering)
    right = np.repeat(rng.random(60) < 0.7, 10)
    prompts = np.repeat(np.arange(60), 10)
    chosen, rejected = right.astype(float), np.full(len(right), 0.5)
    per_pair = reward_model.pair_accuracy(chosen, rejected)
    clustered = reward_model.pair_accuracy(chosen, rejected, prompts)
    assert clustered["acc"] == per_pair["acc"] and clustered["n"] == 600 and clustered["n_prompts"] == 60
    assert "cluster bootstrap over 60 prompts" in clustered["method"]
    # 60 independent units, not 600: the interval is about sqrt(10) times wider
    assert clustered["hi"] - clustered["lo"] > 2.5 * (per_pair["hi"] - per_pair["lo"])
    assert clustered["lo"] < clustered["acc"] < clustered["hi"]
    # one pair per prompt: the same width as the per-pair (Wilson) interval, within resampling noise
    right = rng.random(600) < 0.7
    one = reward_model.pair_accuracy(right.astype(float), np.full(600, 0.5), np.arange(600))
    wil = reward_model.pair_accuracy(right.astype(float), np.full(600, 0.5))
    assert abs((one["hi"] - one["lo"]) / (wil["hi"] - wil["lo"]) - 1) < 0.12
