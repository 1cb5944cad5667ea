"""The RL stages: GRPO raises the reward, evaluation and divergence are stored and reported, the
tuned policy loads back through lfp_core.models, and bad input is refused clearly."""

from __future__ import annotations

import math
import sys

import pytest

from lfp_core import report, rlhf
from lfp_core.config import preset_config
from lfp_core.models import load_model
from lfp_core.rewards import load_reward
from lfp_core.settings import RLStageSettings
from lfp_core.store import RunReader, artifacts_dir
from tests.helpers import clean_and_killed_after_checkpoint


def test_tuned_policy_is_stored_and_loads_back(quick_run):
    base = load_model("demo")
    policy = artifacts_dir(quick_run) / "policy"
    tuned = rlhf.load_policy(policy, base)
    assert tuned.spec.source == "local" and tuned.info()["n_params"] == base.info()["n_params"]
    assert not (artifacts_dir(quick_run) / "policy.tmp").exists()
    assert not (artifacts_dir(quick_run) / "rlhf_checkpoints").exists()
    r = RunReader(quick_run)
    assert r.model_info("tuned")["location"] == str(policy)


def test_rl_logs_steps_and_samples(quick_run):
    r = RunReader(quick_run)
    steps = r.rl_steps()
    assert list(steps.step) == list(range(1, len(steps) + 1)) and len(steps) == 60
    assert steps.reward.notna().all() and (steps.kl.iloc[1:] >= 0).all()
    samples = r.rl_samples()
    assert len(samples) > 0 and samples.completion.str.len().gt(0).all()


def test_rl_eval_is_paired_and_reported(quick_run):
    r = RunReader(quick_run)
    pairs = r.paired_completions()
    assert len(pairs) == 64
    rep = report.build_report(str(quick_run))
    x = rep["rlhf"]
    assert x["reward_base"]["n"] == x["reward_tuned"]["n"] == 64
    assert x["reward_tuned"]["mean"] == pytest.approx(pairs.tuned_reward.mean())
    assert x["difference"]["mean"] == pytest.approx((pairs.tuned_reward - pairs.base_reward).mean())
    assert x["kl_per_token"] > 0 and 0 < x["distinct2_tuned"] <= 1
    d = rep["divergence"]
    assert len(d["param"]) == len(d["activation"]) == 4
    assert len(d["selected_layers"]) == 2 and d["selected_layers"] == sorted(d["selected_layers"])
    assert d["measure"] == "activation"
    top = sorted(range(4), key=lambda i: -d["activation"][i])[:2]
    assert sorted(top) == d["selected_layers"]


def test_quick_preset_raises_the_held_out_reward(quick_run):
    """The quick preset's 60 GRPO steps must raise the reward on held-out prompts, significantly,
    without collapsing into repetition."""
    x = report.build_report(str(quick_run))["rlhf"]
    d = x["difference"]
    assert d["ci_low"] > 0 and d["n_se"] >= 3, d
    assert x["distinct2_tuned"] >= 0.5 * x["distinct2_base"]
    steps = RunReader(quick_run).rl_steps()
    assert steps.reward.iloc[-10:].mean() > steps.reward.iloc[:10].mean()


def test_a_non_finite_reward_names_the_rows(tmp_path):
    (tmp_path / "nan_reward.py").write_text(
        "def score(prompts, completions):\n    return [float('nan') if 'weird' in c else 1.0 for c in completions]\n"
    )
    rw = load_reward(f"python:{tmp_path / 'nan_reward.py'}:score")
    with pytest.raises(rlhf.RewardError, match=r"non-finite values \(nan\) at 1 of 2 rows: 1$"):
        rw.score(["p", "p"], ["fine", "a weird completion"])


def test_empty_prompt_set_is_refused(tmp_path, demo_model_dir):
    with pytest.raises(ValueError, match="prompt set is empty"):
        rlhf.train_policy(
            load_model("demo"), [], preset_config("quick", rl_steps=1).stage_settings(RLStageSettings), tmp_path
        )


def test_missing_or_foreign_policy_is_refused(tmp_path, demo_model_dir):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base = load_model("demo")
    with pytest.raises(FileNotFoundError, match="re-run the rlhf stage"):
        rlhf.load_policy(tmp_path / "policy", base)
    other = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=base.info()["vocab_size"],
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
        )
    )
    other.save_pretrained(tmp_path / "policy")
    base.tokenizer.save_pretrained(tmp_path / "policy")
    with pytest.raises(ValueError, match="not a fine-tune"):
        rlhf.load_policy(tmp_path / "policy", base)


@pytest.mark.slow
def test_a_resumed_rl_stage_reproduces_the_uninterrupted_one(tmp_path):
    """Killed right after a checkpoint and resumed, GRPO ends where the uninterrupted run ends: the same
    per-step rewards and KL, and the same policy weights (RNG states, data order, optimizer state and the
    per-step completion length are all restored or re-derived)."""
    from safetensors.torch import load_file

    def args(run):
        return [
            sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--out", str(run),
            "--n-prompts", "8", "--n-eval-prompts", "8", "--until", "rlhf",
            "--set", "rl_steps=12", "--set", "rl_save_every=4",
        ]  # fmt: skip

    clean, run = clean_and_killed_after_checkpoint(args, tmp_path)
    a, b = RunReader(clean).rl_steps(), RunReader(run).rl_steps()
    assert b.step.max() == 12 and all(math.isfinite(x) for x in b.reward)
    cols = ["step", "reward", "kl", "mean_length"]
    assert a[cols].reset_index(drop=True).equals(b[cols].reset_index(drop=True)), (a[cols], b[cols])
    wa = load_file(str(artifacts_dir(clean) / "policy" / "model.safetensors"))
    wb = load_file(str(artifacts_dir(run) / "policy" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst == 0.0, f"resumed policy differs from the uninterrupted one by up to {worst:.3g}"
