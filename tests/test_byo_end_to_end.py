"""The bring-your-own bar, end to end: a third-party base model (the real pretrained Llama stories260K), its
RL partner made by this tool's GRPO, a python reward and a researcher's corpus, through every stage, then
the report and every dashboard page on the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_byo_inputs import _story

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--n-prompts", "16", "--n-eval-prompts", "16", "--gen-batch-size", "16",
    "--set", "rl_prompts_per_step=2", "--set", "rl_generations=4",
    "--set", "sae_corpus_docs=160", "--set", "sae_train_tokens=3000", "--set", "cc_train_tokens=3000", "--set", "sae_variants=",
    "--set", "sae_sweep_l1=", "--set", "mfr_n=0", "--set", "sae_ce_docs=8", "--set", "divergence_sequences=16",
    "--set", "feature_top_k=5", "--set", "label_probe_top=4", "--set", "label_random=4",
    "--set", "ablation_n=16", "--set", "ablation_rank_n=16", "--set", "ablation_k=4",
    "--set", "rm_samples_per_prompt=2", "--set", "rm_epochs=1", "--set", "atp_pairs=4",
    "--set", "atp_top_k=4", "--set", "atp_random_k=4", "--set", "probe_texts_per_class=20",
]  # fmt: skip

HAPPY = """
WORDS = {"happy", "smile", "smiled", "fun", "love", "loved", "good", "nice", "kind", "laughed", "friend"}


def score(prompts, completions):
    out = []
    for c in completions:
        words = [w.strip(".,!?\\"'").lower() for w in c.split()]
        n = max(1, len(words))
        out.append(10 * sum(w in WORDS for w in words) / n + len(set(words)) / n)  # happy words, and variety
    return out
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", *args, *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def byo_run(shared_data, tmp_path_factory) -> dict:
    stories = shared_data / "models" / "stories260K" / "hf"
    if not (stories / "config.json").exists():
        pytest.skip("needs ../shared/data/models/stories260K/hf")
    d = tmp_path_factory.mktemp("byo")
    (d / "happy.py").write_text(HAPPY)
    reward = f"python:{d / 'happy.py'}:score"
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(160):
            f.write(json.dumps({"text": _story(i)}) + "\n")
    # its RL partner: this tool's GRPO against the same reward, kept as a plain HF directory
    trained = d / "stories-grpo"
    res = _run(
        "--model", str(stories), "--reward", reward, "--set", "rl_steps=8", "--out", str(trained), "--until", "rlhf"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    partner = trained / "artifacts" / "policy"
    out = d / "given"
    res = _run(
        "--model", str(stories), "--tuned", str(partner), "--reward", reward, "--corpus", str(d / "corpus.jsonl"),
        "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return {"out": out, "partner": partner, "reward": reward, "log": res.stderr, "corpus": d / "corpus.jsonl"}


def test_every_applicable_stage_runs_on_the_given_pair_reward_and_corpus(byo_run):
    from lfp_core.report import build_report, format_report
    from lfp_core.store import RunReader
    from lfp_core.store.summaries import AttributionSummary, LabelsSummary, ProbesSummary, RLEvalSummary

    r = RunReader(byo_run["out"])
    assert {s.name: s.status for s in r.stages()} == {s: "done" for s in (
        "model", "prompts", "base_samples", "rlhf", "rl_eval", "divergence", "activations", "saes", "features",
        "probes", "labels", "ablation", "reward_model", "attribution", "null_rlhf", "crosscoders", "localisation",
        "diff_causal")}  # fmt: skip
    assert r.rl_steps().empty  # nothing trained: the pair was given
    # model diffing of the given pair: no null control (its recipe is unknown), and the figures say so
    from lfp_core.store.summaries import NullSummary

    null = r.summary(NullSummary)
    assert null is not None and null.recipe == "none" and "--null PATH" in null.not_applicable["null control"]
    assert set(r.diff_dictionaries().pair) == {"tuned"} and set(r.diff_patching().pair) == {"tuned"}
    rep = build_report(str(byo_run["out"]))
    text = format_report(rep)
    assert f"tuned model: given: {byo_run['partner']}" in text
    assert rep["run"]["reward"]["spec"] == byo_run["reward"] and rep["run"]["reward"]["kind"] == "sequence"
    assert f"activation corpus from {byo_run['corpus']}" in text
    assert set(r.act_docs_summary().source) == {"corpus", "base_completion", "tuned_completion"}  # no IMDB
    # the reward the run stored is the plug-in's own score of those texts, wherever the run scored text
    namespace: dict = {}
    exec(HAPPY, namespace)
    score = namespace["score"]
    for role in ("base", "tuned"):
        comps = r.completions(role)
        assert len(comps) == 16
        assert comps.reward.tolist() == pytest.approx(score(list(comps.prompt), list(comps.completion)))
    ab = r.ablation_completions(["baseline", "all"])
    assert len(ab) and ab.reward.tolist() == pytest.approx(score(list(ab.prefix), list(ab.text)))
    # what a per-word lexicon reading would need is said not to apply, with the reason
    assert "token_probe" in r.summary(ProbesSummary).not_applicable and r.probe_words("tuned").empty
    assert "relevance" in r.summary(LabelsSummary).not_applicable
    at = r.summary(AttributionSummary)
    assert at.policy is None and at.pm is not None and "expected VADER valence" in at.not_applicable["policy"]
    assert "word_shifts" in r.summary(RLEvalSummary).not_applicable and r.word_shifts().empty
    assert {"base_samples", "rl_eval", "probes", "labels", "attribution"} <= set(rep["not_applicable"])


def test_every_page_renders_the_byo_run(byo_run, monkeypatch):
    from tests.helpers import open_page

    out = byo_run["out"]
    for page in sorted((REPO / "views").glob("*.py")):
        if page.stem in ("__init__", "common", "data", "seqprobe"):  # helpers, not pages
            continue
        at = open_page(monkeypatch, out.parent, f"views/{page.name}", run=out)
        assert not at.exception, (page.name, [e.value for e in at.exception])
        assert not at.error, (page.name, [e.value for e in at.error])
