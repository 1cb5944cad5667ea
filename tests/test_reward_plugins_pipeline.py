"""Reward plug-ins in the pipeline: the precompute refuses a broken plug-in before it writes anything
(exit status 2, one line), GRPO optimises the plug-in's scores, and the evaluation stores them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lfp_core.config import REPO_ROOT
from lfp_core.rewards import load_reward
from tests.test_rewards import _direct_logits, _gpt2_classifier

COUNTER = """
import json

def score(prompts, completions):
    values = [float(c.count("e")) for c in completions]
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"prompts": list(prompts), "completions": list(completions), "values": values}}) + "\\n")
    return values
"""


def _precompute(out, reward: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--out", str(out), "--reward", reward]
    return subprocess.run(
        [*args, *extra],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugins")
    (d / "bad.py").write_text(
        "def short(p, c):\n    return [0.0]\n"
        "def nan(p, c):\n    return [float('nan')] * len(c)\n"
        "def fine(p, c):\n    return [0.0] * len(c)\n"
    )
    _gpt2_classifier(d / "clf", 2, {0: "NEG", 1: "POS"})
    return d


BAD = [
    ("bogus", "reward spec 'bogus' does not parse; accepted forms: vader · classifier:PATH_OR_ID[:LABEL][@prob]"),
    ("python:no_such_reward_module:f", "no module named 'no_such_reward_module' on sys.path"),
    ("python:{d}/bad.py:missing", "module {d}/bad.py has no function 'missing' (its functions: fine, nan, short)"),
    ("python:{d}/absent.py:f", "the module file {d}/absent.py does not exist"),
    ("python:{d}/bad.py:short", "returned 1 values (shape (1,)) for 2 (prompt, completion) pairs"),
    ("python:{d}/bad.py:nan", "returned non-finite values (nan) at 2 of 2 rows: 0, 1"),
    ("classifier:{d}/nowhere", "is neither a local directory nor a hub id that resolves"),
    ("classifier:{d}/clf:toxic", "label 'toxic' is not in the classifier's config; its labels: NEG, POS"),
    ("reward-model:{d}/clf", "a preference model has one scalar output (num_labels 1)"),
]


@pytest.mark.parametrize("spec, message", BAD, ids=[b[0].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_a_broken_reward_is_refused_before_anything_is_written(tmp_path, plugins, spec, message):
    out = tmp_path / "run"
    proc = _precompute(out, spec.format(d=plugins))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.format(d=plugins) in last, last
    assert not out.exists()


def test_an_existing_run_directory_is_left_unchanged(tmp_path, plugins):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = _precompute(out, f"python:{plugins}/bad.py:nan", "--rebuild")
    assert proc.returncode == 2 and "non-finite" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "x"


def test_the_hh_task_refuses_a_reward(tmp_path, plugins):
    proc = _precompute(tmp_path / "run", f"python:{plugins}/bad.py:fine", "--task", "hh")
    assert proc.returncode == 2 and "the hh task trains DPO on preference pairs" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_evaluation_stores_the_classifier_s_score_of_the_same_text(plugins, demo_model_dir):
    """What the base_samples/rl_eval stages store as a completion's reward is the classifier's logit on
    prompt + completion; the lexicon columns are left empty for a sequence reward."""
    from lfp_core.models import load_model
    from lfp_core.pipeline.base import _completion_rows

    tok = load_model("demo").tokenizer
    prompts = {0: "The movie was", 1: "I watched"}
    outs = [(tok(" great fun, I loved it")["input_ids"], 11), (tok(" a dull plot")["input_ids"], 12)]
    jobs = [(0, 0, 5), (1, 0, 3)]
    rw = load_reward(f"classifier:{plugins / 'clf'}")
    rows = _completion_rows(tok, "base", jobs, outs, rw, prompts)
    direct = _direct_logits(plugins / "clf", [prompts[0] + rows[0]["text"], prompts[1] + rows[1]["text"]])
    np.testing.assert_allclose([r["reward"] for r in rows], direct[:, 1], rtol=1e-5, atol=1e-6)
    assert all(r["raw_score"] == r["reward"] and r["lexicon_words"] is None for r in rows)
    vader = _completion_rows(tok, "base", jobs, outs, load_reward("vader"), prompts)
    assert vader[0]["lexicon_words"] == ["great", "fun", "loved"] and vader[0]["raw_score"] > 0


def test_grpo_optimises_the_python_plugin_s_scores(tmp_path, demo_model_dir):
    """The rlhf stage's trainer gets its rewards from the plug-in: every step's logged reward is the mean
    of what the plug-in returned for that step's completions, of prompts given without the BOS."""
    from lfp_core import rlhf
    from lfp_core.models import load_model
    from lfp_core.settings import RLStageSettings, preset_config

    log = tmp_path / "calls.jsonl"
    (tmp_path / "count_e.py").write_text(COUNTER.format(log=str(log)))
    spec = f"python:{tmp_path / 'count_e.py'}:score"
    base = load_model("demo")
    texts = ["The movie was", "This film is", "I think the", "What a"]
    prompt_ids = [base.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cfg = preset_config(
        "quick",
        reward=spec,
        rl_steps=3,
        rl_prompts_per_step=2,
        rl_generations=2,
        rl_save_every=100,
        min_new_tokens=4,
        max_new_tokens=6,
    )
    _, steps, samples = rlhf.train_policy(base, prompt_ids, cfg.stage_settings(RLStageSettings), tmp_path / "art")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == len(steps) == 3
    for step, call in zip(steps, calls):
        assert len(call["values"]) == 4 and set(call["prompts"]) <= set(texts)
        assert call["values"] == [float(c.count("e")) for c in call["completions"]]
        assert step["reward"] == pytest.approx(np.mean(call["values"]))
    assert samples and all(s["reward"] == s["completion"].count("e") and s["prompt"] in texts for s in samples)
