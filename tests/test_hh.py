"""The HH task: pair splitting, malformed files, DPO moving the implicit-reward margin, and the
toxicity loaders."""

from __future__ import annotations

import gzip
import json

import pytest
from streamlit.testing.v1 import AppTest

from lfp_core import corpora, precompute, report
from lfp_core.config import REPO_ROOT, preset_config
from lfp_core.store import RunReader


def test_split_at_the_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, here is how."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No."
    prompt, c, r = corpora.split_hh(chosen, rejected)
    assert prompt.endswith("help?\n\nAssistant:") and c == " Sure, here is how." and r == " No."
    assert corpora.split_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: other\n\nAssistant: c") is None


def test_malformed_hh_file_names_the_line(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    good = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"})
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + good + "\n{not json\n")
    with pytest.raises(corpora.DataFormatError, match=r"line 3"):
        corpora.read_hh_file(path)
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + json.dumps({"chosen": 1, "rejected": "x"}) + "\n")
    with pytest.raises(corpora.DataFormatError, match=r"line 2: expected an object"):
        corpora.read_hh_file(path)


def test_real_hh_and_toxicity_files_load(shared_data):
    pairs, where = corpora.hh_pairs(shared_data)
    assert len(pairs) > 8000 and where.startswith("local:")
    assert all(p["prompt"].endswith("\n\nAssistant:") for p in pairs[:100])
    rtp = corpora.rtp_records(shared_data)
    assert len(rtp) == 2000 and all(0 <= r["continuation_toxicity"] <= 1 for r in rtp if r["continuation_toxicity"])
    assert {len(v) for v in corpora.rtp_challenging(shared_data).values()} == {100}
    tweets = corpora.davidson_tweets(shared_data)
    assert len(tweets) == 24783 and {t["label"] for t in tweets} == {0, 1, 2}


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("hh") / "hh"
    cfg = preset_config(
        "quick",
        task="hh",
        n_pairs=160,
        n_eval_pairs=32,
        dpo_max_length=96,
        dpo_max_prompt_length=48,
        dpo_lr=1e-4,
        data_dir=str(shared_data),
    )
    precompute.run_pipeline(cfg, out)
    return out


def test_dpo_moves_the_training_margin_the_right_way(hh_run):
    rep = report.build_report(str(hh_run))
    assert rep["stages"] == {"model": "done", "pairs": "done", "rlhf": "done", "rl_eval": "done", "divergence": "done"}
    x = rep["rlhf"]
    assert x["n_train"] == 32 and x["n_eval"] == 32
    assert x["train_margin"]["mean"] > 0 and x["train_accuracy"] > 0.6
    assert len(rep["divergence"]["selected_layers"]) == 2
    steps = RunReader(hh_run).rl_steps()
    assert len(steps) == 20 and steps.loss.notna().all()  # 160 pairs / batch 8, one epoch


def test_overview_of_an_hh_run(monkeypatch, hh_run):
    monkeypatch.setenv("LFP_RUNS_DIR", str(hh_run.parent))
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.query_params["run"] = str(hh_run)
    at.run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert "Held-out implicit-reward accuracy" in labels and "Training-pair accuracy" in labels
    assert list(at.dataframe[0].value.stage) == ["model", "pairs", "rlhf", "rl_eval", "divergence"]


@pytest.mark.slow
def test_a_resumed_dpo_stage_reproduces_the_uninterrupted_one(tmp_path, shared_data):
    """DPO killed right after a checkpoint and resumed ends with the uninterrupted run's weights (the
    checkpoint is read back as from_pretrained reads it; see lfp_core.rlhf._weights_as_saved)."""
    import sys

    from safetensors.torch import load_file

    from lfp_core.store import artifacts_dir
    from tests.helpers import clean_and_killed_after_checkpoint

    def args(run):
        return [
            sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--task", "hh", "--out", str(run),
            "--data-dir", str(shared_data), "--until", "rlhf", "--set", "n_pairs=48", "--set", "n_eval_pairs=8",
            "--set", "dpo_max_length=64", "--set", "dpo_max_prompt_length=32", "--set", "dpo_batch_size=4",
            "--set", "dpo_save_every=4",
        ]  # fmt: skip

    clean, run = clean_and_killed_after_checkpoint(args, tmp_path)
    wa = load_file(str(artifacts_dir(clean) / "policy" / "model.safetensors"))
    wb = load_file(str(artifacts_dir(run) / "policy" / "model.safetensors"))
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst == 0.0, f"resumed DPO policy differs from the uninterrupted one by up to {worst:.3g}"
