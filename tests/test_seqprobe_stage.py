"""The probes stage by reward kind, on a tiny real run (the demo model, a few dozen held-out prompts, two
GRPO steps, small SAEs): a reward that is not a per-word lexicon skips the token probe with its reason and
stores the sequence probe; VADER keeps the token probe and gets the sequence probe beside it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy import stats

from lfp_core.precompute import parse_overrides, run_pipeline
from lfp_core.report import build_report, format_report
from lfp_core.settings import preset_config
from lfp_core.store import RunReader, RunWriter, replace_rows
from lfp_core.store.summaries import ProbesSummary

pytestmark = pytest.mark.slow

TINY = [
    "n_prompts=8",
    "n_eval_prompts=24",
    "samples_per_prompt=2",
    "gen_batch_size=48",
    "rl_steps=2",
    "divergence_sequences=8",
    "sae_corpus_docs=12",
    "sae_doc_tokens=48",
    "sae_train_tokens=1500",
    "sae_batch_size=256",
    "sae_variants=",
    "sae_sweep_l1=1",
    "mfr_n=0",
    "sae_ce_docs=4",
    "probe_min_points=10",
    "probe_contrast_items=50",
    "probe_texts_per_class=20",
]


def _cfg(**extra):
    return preset_config("quick", data_dir=None, **parse_overrides(TINY), **extra)


def _probes(run, cfg) -> None:
    """The probes stage on ``run`` as the precompute runs it (its own settings, its clears, committed with its
    summary), without the features stage before it (which it does not read)."""
    from lfp_core.pipeline import stage_names
    from lfp_core.pipeline.core import Context
    from lfp_core.pipeline.probes import stage_probes
    from lfp_core.settings import ProbesStageSettings
    from lfp_core.stages import STAGES

    w = RunWriter(run)
    spec = next(x for x in STAGES if x.name == "probes")
    w.clear_stage("probes", spec.clears)
    ctx = Context(run=cfg.run, writer=w)
    pos = stage_names("vader").index("probes")
    ctx.finisher = lambda con, detail: w.mark_stage("probes", pos, "test", "done", 0.0, detail, con=con)
    stage_probes(ctx, cfg.stage_settings(ProbesStageSettings), "test")


def _rescore(run, fn) -> None:
    """Replace every stored completion reward by ``fn(text, n_new)``: what a sequence reward (e.g. a
    classifier) would have stored, without the plug-in (the reward helper's branch)."""
    r = RunReader(run)
    rows = []
    for role in ("base", "tuned"):
        c = r.completions(role)
        for x in c.itertuples():
            rows.append(
                {
                    "role": role,
                    "prompt_id": int(x.prompt_id),
                    "sample_idx": int(x.sample_idx),
                    "seed": int(x.seed),
                    "n_new": int(x.n_new),
                    "token_ids": [int(t) for t in x.token_ids],
                    "text": x.completion,
                    "reward": float(fn(x.completion, int(x.n_new))),
                    "raw_score": 0.0,
                    "lexicon_words": None,
                    "lexicon_valences": None,
                }
            )
    with RunWriter(run).transaction() as con:
        replace_rows(con, "completions", rows)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The tiny run up to and including its SAEs."""
    run = tmp_path_factory.mktemp("seq") / "upstream"
    run_pipeline(_cfg(), run, until="saes")
    return run


@pytest.fixture(scope="module")
def sequence_run(upstream, tmp_path_factory):
    run = tmp_path_factory.mktemp("seq") / "sequence"
    shutil.copytree(upstream, run)
    # a reward no lexicon gives: the share of characters that are vowels (a whole-text property)
    _rescore(run, lambda text, n: sum(ch in "aeiou" for ch in text.lower()) / max(1, len(text)))
    _probes(run, _cfg(reward="python:tests.rewards:vowels"))
    return run


def test_sequence_reward_skips_the_token_probe_with_its_reason_and_stores_the_sequence_probe(sequence_run):
    r = RunReader(sequence_run)
    pr = r.summary(ProbesSummary)
    assert pr is not None and pr.feature_ranking == "sequence"
    assert set(pr.not_applicable) == {"token_probe", "implicit_reward", "contrastive_probe", "token_attributions"}
    assert "not a per-word lexicon" in pr.not_applicable["token_probe"]
    assert "python:tests.rewards:vowels" in pr.not_applicable["token_probe"]
    assert pr.tuned is not None and pr.tuned.tau_occurrence is None and pr.tau_difference is None
    assert r.table_size("probe_words") == 0 and r.table_size("probe_tokens") == 0
    seq = pr.sequence
    assert seq is not None and seq["reward"] == "python:tests.rewards:vowels"
    assert 0 < seq["n_test"] < seq["n_completions"] and seq["n_test_prompts"] >= 2
    for role in ("tuned", "base"):
        x = seq[role]
        for part in ("probe", "shuffled", "untrained"):
            assert x[part]["n"] == seq["n_test"]
        assert set(x["inputs"]) == {"raw_selected", "token_embedding", "length", "policy"}
        assert all("vs_probe" in v for v in x["inputs"].values())
        stored = r.probe_sequences(role)
        assert len(stored) == seq["n_test"]
        # what is stored is what was scored: ρ of the stored held-out predictions
        assert stats.spearmanr(stored.pred, stored.reward).statistic == pytest.approx(x["probe"]["rho"])
    # the stored rewards are the completions' own
    held = r.probe_sequences("tuned")
    held = held[held.policy == "tuned"].merge(r.completions("tuned"), on=["prompt_id", "sample_idx"])
    assert len(held) and np.allclose(held.reward_x, held.reward_y)
    assert "difference" in seq and seq["difference"]["n"] == seq["n_test"]
    # the feature ranking the labels and ablation stages read comes from the sequence probe
    pf = r.probe_features("tuned", limit=None)
    assert len(pf) and sorted(pf["rank"]) == list(range(len(pf)))
    rep = build_report(str(sequence_run))
    assert rep["probe"]["sequence"]["tuned"]["probe"]["rho"] == seq["tuned"]["probe"]["rho"]
    assert rep["not_applicable"]["probes"] == pr.not_applicable
    text = format_report(rep)
    assert "sequence probe" in text and "not applicable (probes, token_probe)" in text and "τ occurrence" not in text


def test_vader_keeps_the_token_probe_and_adds_the_sequence_probe(upstream, tmp_path):
    run = tmp_path / "vader"
    shutil.copytree(upstream, run)
    _probes(run, _cfg(probe_contrast_items=0))
    r = RunReader(run)
    pr = r.summary(ProbesSummary)
    assert pr.feature_ranking == "token" and not pr.not_applicable
    assert pr.tuned.tau_occurrence is not None and r.table_size("probe_tokens") > 0
    assert pr.sequence["reward"] == "vader" and len(r.probe_sequences("tuned")) == pr.sequence["n_test"]
    assert len(r.probe_tokens("tuned")) == pr.n_points  # the token probe's rows, as before
