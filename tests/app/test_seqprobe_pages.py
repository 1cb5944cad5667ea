"""Token scores, Separation and Overview for the sequence probe (tests/tiny_run.py's sequence variant): a
run whose reward is not a per-word lexicon says which lexicon-only views do not apply and why, and shows
the sequence probe's figures beside their controls; a VADER run shows it beside the token probe."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from lfp_core.store import RunReader
from lfp_core.store.summaries import ProbesSummary
from tests.helpers import open_page
from tests.tiny_run import TinyRun, sequence_probes, sequence_run


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    return sequence_run(tmp_path_factory.mktemp("runs") / "seq")


@pytest.fixture(scope="module")
def lexicon_run(tmp_path_factory):
    """A VADER tiny run whose probes stage holds the token probe (the stage's own ``token_probe`` on synthetic
    per-word features) and the sequence probe beside it."""
    from lfp_core import probes
    from lfp_core.pipeline.probes import LexiconPoints, token_probe

    rng = np.random.default_rng(3)
    vocab = [f"word{i}" for i in range(80)]
    valence = dict(zip(vocab, rng.choice([-1, 1], 80) * rng.uniform(0.5, 3.5, 80)))
    words = np.array([w for w in vocab for _ in range(4)], dtype=object)
    y = np.array([valence[w] for w in words])
    n = len(y)
    pts = LexiconPoints(*(np.arange(n),) * 3, np.ones(n, bool), np.zeros(n, bool), words, y,
                        probes.occurrence_split(n, 0), probes.word_split(words, 0), probes.stems(words))  # fmt: skip
    X = np.outer(y, rng.normal(size=16)) + 2 * rng.normal(size=(n, 16))
    d, _, word_rows = token_probe(X, pts, "tuned", (-3.9, 3.4), Counter(), 0)
    d.update(irm={"pearson": 0.4, "spearman": 0.4, "n": 10}, sign_acc_pos=0.8, sign_acc_neg=0.7)
    labels = np.array(["pos", "neg"] * 100)
    texts = rng.normal(size=(200, 8)) + (labels == "pos")[:, None]
    d["logistic"] = {"imdb": {**probes.logistic_probe(texts, labels, 0), "raw_acc": 0.7}}
    d["pca_var_ratio_by_task"] = {"imdb": [0.3, 0.2]}
    detail = {"n_points": n, "n_words": len(vocab), "word_split_by": "stem", "tuned": d}
    run = TinyRun(tmp_path_factory.mktemp("runs") / "lexicon", n_eval=30)
    run.until("features")
    sequence_probes(run, token_detail=detail)
    return run.run_dir


def _infos(at) -> str:
    """The info boxes' text as a reader sees it (markdown escapes of run text resolved)."""
    return re.sub(r"\\(.)", r"\1", " ".join(i.value for i in at.info)).replace("\u2060", "")


def test_token_scores_says_the_token_probe_does_not_apply_and_shows_the_sequence_probe(monkeypatch, seq_run):
    at = open_page(monkeypatch, seq_run.parent, "views/token_scores.py", run=seq_run)
    assert not at.exception
    pr = RunReader(seq_run).summary(ProbesSummary)
    infos = _infos(at)
    for part in ("per-token probe", "implicit reward model", "contrastive probe", "Per-token attributions"):
        assert part in infos
    assert infos.count("is not a per-word lexicon") == 4 and "classifier:tiny-sentiment" in infos
    seq = pr.sequence
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ρ, sequence probe (held out)"] == f"{seq['tuned']['probe']['rho']:.3f}"
    assert metrics["ρ, sequence probe, shuffled targets"] == f"{seq['tuned']['shuffled']['rho']:.3f}"
    assert "τ, occurrence split" not in metrics  # the lexicon-only figures are not drawn
    table = at.dataframe[0].value
    assert list(table["input"][:3]) == [
        "SAE features (the probe)",
        "shuffled targets (control)",
        "untrained random map (control)",
    ]
    assert table["Spearman ρ"][0] == pytest.approx(seq["tuned"]["probe"]["rho"])
    assert {"completion length (tokens)", "which policy wrote it (base or tuned)"} <= set(table["input"])
    assert len(at.get("plotly_chart")) == 1  # held-out predictions against rewards
    captions = " ".join(c.value for c in at.caption)
    assert "bootstrap over held-out prompts" in captions and "Tuned − base model features" in captions
    at.radio(key="probe_role").set_value("base").run()
    assert not at.exception
    base = {m.label: m.value for m in at.metric}["ρ, sequence probe (held out)"]
    assert base == f"{seq['base']['probe']['rho']:.3f}"


def test_separation_shows_the_sequence_logistic_variant_and_what_does_not_apply(monkeypatch, seq_run):
    at = open_page(monkeypatch, seq_run.parent, "views/separation.py", run=seq_run)
    assert not at.exception
    seq = RunReader(seq_run).summary(ProbesSummary).sequence
    table = at.dataframe[0].value
    assert list(table.model) == ["tuned", "base"]
    assert table.acc[0] == pytest.approx(seq["tuned"]["logistic"]["acc"])
    assert (table.lo <= table.acc).all() and (table.acc <= table.hi).all()
    assert "is not a per-word lexicon" in _infos(at)


def test_overview_lists_what_does_not_apply_generically(monkeypatch, seq_run):
    at = open_page(monkeypatch, seq_run.parent, "views/overview.py", run=seq_run)
    assert not at.exception
    na = RunReader(seq_run).summary(ProbesSummary).not_applicable
    infos = _infos(at)
    assert "Not applicable to this run" in infos
    assert all(f"**probes**, {what}: {why}" in infos for what, why in na.items())
    assert "sequence probe (reward classifier:tiny-sentiment)" in at.code[0].value


def test_vader_run_shows_the_sequence_probe_beside_the_token_probe(monkeypatch, lexicon_run):
    at = open_page(monkeypatch, lexicon_run.parent, "views/token_scores.py", run=lexicon_run)
    assert not at.exception
    pr = RunReader(lexicon_run).summary(ProbesSummary)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["τ, occurrence split"] == f"{pr.tuned.tau_occurrence['tau']:.3f}"
    assert metrics["ρ, sequence probe (held out)"] == f"{pr.sequence['tuned']['probe']['rho']:.3f}"
    assert "does not apply" not in _infos(at)
    charts = len(at.get("plotly_chart"))
    at.toggle(key="seq_scatter_tuned").set_value(True).run()
    assert not at.exception and len(at.get("plotly_chart")) == charts + 1


def test_separation_of_a_vader_run_puts_the_sequence_variant_after_the_separation_probes(monkeypatch, lexicon_run):
    at = open_page(monkeypatch, lexicon_run.parent, "views/separation.py", run=lexicon_run)
    assert not at.exception
    pr = RunReader(lexicon_run).summary(ProbesSummary)
    assert list(at.dataframe[0].value.task) == ["imdb"]  # the separation probes first, as before
    seq_table = at.dataframe[1].value
    assert seq_table.acc[0] == pytest.approx(pr.sequence["tuned"]["logistic"]["acc"])
    assert "does not apply" not in _infos(at)
