"""The null fine-tune control of the model-diffing stages (issue 19, item 6): the rlhf recipe with an
uninformative reward, and the inputs it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lfp_core import precompute
from lfp_core.errors import ConfigError
from lfp_core.rlhf import null_reward_transform
from lfp_core.settings import DiffingSettings, RunConfig


def test_shuffled_null_reward_is_a_seeded_permutation_of_each_steps_rewards():
    rewards = [float(x) for x in np.linspace(-1, 2, 16)]
    t = null_reward_transform("shuffled", seed=3)
    a, b = t(5, rewards), t(5, rewards)
    assert a == b  # the same step of a resumed run sees the same shuffle
    assert sorted(a) == sorted(rewards) and a != rewards  # the distribution kept, the link to the text broken
    assert t(6, rewards) != a  # another permutation at another step
    assert null_reward_transform("shuffled", seed=4)(5, rewards) != a
    assert null_reward_transform("constant", seed=3)(5, rewards) == [0.0] * 16


def test_an_unknown_null_recipe_is_refused():
    with pytest.raises(ValueError, match="shuffled"):
        null_reward_transform("none", seed=0)
    with pytest.raises(ConfigError, match="diffing.null"):
        RunConfig().with_values({"diffing.null": "random"})


def test_the_null_recipe_follows_whether_the_tuned_model_is_given():
    assert DiffingSettings().recipe(tuned_given=False) == "shuffled"
    assert DiffingSettings().recipe(tuned_given=True) == "none"
    assert DiffingSettings(null="constant").recipe(tuned_given=False) == "constant"
    assert DiffingSettings(null_path="/x").recipe(tuned_given=True) == "given"
    with pytest.raises(ConfigError, match="null_path"):
        DiffingSettings(null="none", null_path="/x")
    with pytest.raises(ConfigError, match="diff_random"):
        DiffingSettings(random=5)


def test_a_null_to_train_for_a_given_tuned_model_is_refused_saying_what_to_pass(demo_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = precompute.main(
        ["--preset", "quick", "--tuned", str(demo_model_dir), "--set", "diffing.null=shuffled", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "recipe is unknown" in err and "--null PATH" in err and "diffing.null=auto" in err
    assert not out.exists()  # refused before anything is written


def test_a_given_null_model_of_another_shape_is_refused_naming_the_field(demo_model_dir, shared_data, tmp_path, capsys):
    stories = shared_data / "models" / "stories260K" / "hf"
    if not (stories / "config.json").exists():
        pytest.skip("needs ../shared/data/models/stories260K/hf")
    out = tmp_path / "run"
    code = precompute.main(["--preset", "quick", "--null", str(stories), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--null" in err and "not a fine-tune of the base model" in err and "the null model's" in err
    assert not out.exists()


def test_a_missing_null_model_is_refused(tmp_path, capsys):
    code = precompute.main(["--preset", "quick", "--null", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
    assert not Path(tmp_path / "r").exists()


def test_the_null_fine_tune_trains_its_own_policy_on_the_transformed_reward(tmp_path, demo_model_dir):
    """Two GRPO steps with the constant null reward: GRPO sees 0 for every completion (so its step log says
    0), the policy lands in artifacts/null_policy and the tuned policy's directory is not touched."""
    from lfp_core import rlhf
    from lfp_core.models import load_model
    from lfp_core.settings import RLStageSettings, preset_config

    base = load_model("demo")
    s = preset_config("quick", rl_steps=2, rl_save_every=1).stage_settings(RLStageSettings)
    texts = ["This movie was", "I thought the plot", "The actors", "In the end it"]  # one step's 4 prompts
    prompts = [base.tokenizer(t)["input_ids"] for t in texts]
    policy_dir, steps, _ = rlhf.train_policy(
        base, prompts, s, tmp_path, "h", name="null_policy", reward_transform=null_reward_transform("constant", 0)
    )
    assert policy_dir == tmp_path / "null_policy" and (policy_dir / "config.json").exists()
    assert not (tmp_path / "policy").exists() and not (tmp_path / "rlhf_checkpoints").exists()
    assert len(steps) == 2 and all(step["reward"] == 0.0 for step in steps)
    assert rlhf.load_policy(policy_dir, base).info()["n_params"] == base.info()["n_params"]


def test_crosscoder_layers_without_a_paired_harvest_are_refused_and_lose_nothing(tmp_path, capsys):
    """``--set cc_layers=…`` naming a layer the run did not harvest for both models: exit 2 before any stage runs,
    the run's stored crosscoders untouched; a layer the model does not have: exit 2 naming its layers."""
    from lfp_core.store import RunReader
    from tests.tiny_diffing import diffing
    from tests.tiny_run import TinyRun

    run = TinyRun(tmp_path / "run")
    run.until("features")
    with run.writer.transaction() as con:
        run._done(con, "activations", {"layers": [2, 3], "hook": "hook_mlp_out"})
    diffing(run)  # the run's stored crosscoders, difference SAEs and their latents
    before = RunReader(run.run_dir).diff_dictionaries()
    assert len(before) > 0
    code = precompute.main(["--preset", "quick", "--set", "cc_layers=1", "--out", str(run.run_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "layer(s) [1]" in err and "only at layers [2, 3]" in err and "nothing was changed" in err
    assert RunReader(run.run_dir).diff_dictionaries().equals(before)
    code = precompute.main(["--preset", "quick", "--set", "cc_layers=9", "--out", str(tmp_path / "fresh")])
    assert code == 2 and "has 4 layers (0–3)" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
