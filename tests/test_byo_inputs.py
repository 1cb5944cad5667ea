"""Bring your own tuned model, prompts and corpus (issue 18, items 1 and 3): ``--tuned``, ``--prompts``,
``--corpus``. The base is the real pretrained Llama stories260K (sentencepiece tokenizer, no pad token);
its tuned partner is a copy with perturbed MLP weights in two layers, saved with ``save_pretrained``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfp_core import precompute, report, texts
from lfp_core.errors import BadInputError, MissingInputError
from lfp_core.settings import RunConfig
from lfp_core.store import RunReader
from lfp_core.store.summaries import ActivationsSummary, PromptsSummary, RLEvalSummary, RLHFSummary
from lfp_core.tuned import check_tuned, tuned_fingerprint

REPO = Path(__file__).resolve().parents[1]
PERTURBED = (1, 3)
NAMES, THINGS = ["Lily", "Tom", "Sue", "Ben", "Max", "Anna"], ["dog", "cat", "ball", "tree", "cake", "bird"]
MOODS = ["happy", "sad", "good", "bad", "great", "scared", "kind", "angry"]
TINY = [  # small enough for 2 CPU cores: 8 + 8 prompts, 8 divergence sequences
    *("--preset", "quick", "--set", "n_prompts=6", "--set", "n_eval_prompts=8", "--set", "gen_batch_size=8"),
    *("--set", "divergence_sequences=8"),
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _story(i: int) -> str:
    n, t, m = NAMES[i % 6], THINGS[(i * 5) % 6], MOODS[(i * 3) % 8]
    return f"Once upon a time, there was a {m} {t} named {n}. It liked to play in the park. One day {n} felt {MOODS[i % 8]}."


@pytest.fixture(scope="module")
def stories(shared_data) -> Path:
    d = shared_data / "models" / "stories260K" / "hf"
    if not (d / "config.json").exists():
        pytest.skip("needs ../shared/data/models/stories260K/hf")
    return d


def _perturbed_copy(base: Path, out: Path, layers=PERTURBED, n_layers: int | None = None) -> Path:
    """base with noise on the MLP output weights of ``layers`` (optionally cut to ``n_layers``), saved as HF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            w = model.model.layers[layer].mlp.down_proj.weight
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=g))
    if n_layers is not None:
        model.model.layers = model.model.layers[:n_layers]
        model.config.num_hidden_layers = n_layers
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def partner(stories, tmp_path_factory) -> Path:
    return _perturbed_copy(stories, tmp_path_factory.mktemp("partner") / "stories-tuned")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("texts")
    prompts = [{"text": f"{NAMES[i % 6]} saw a {MOODS[i % 8]} {THINGS[i % 6]} and"} for i in range(14)]
    for i in (0, 1):
        prompts[i]["split"] = "eval"
    return {
        "prompts": _write_jsonl(d / "prompts.jsonl", prompts),
        "corpus": _write_jsonl(d / "corpus.jsonl", [{"text": _story(i), "id": i} for i in range(40)]),
    }


# --- the whole path through the CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def given_run(stories, partner, inputs, shared_data, tmp_path_factory) -> Path:
    """``python -m lfp_core.precompute --model stories260K --tuned <partner> --prompts --corpus --until activations``."""
    out = tmp_path_factory.mktemp("runs") / "given"
    cmd = [sys.executable, "-m", "lfp_core.precompute", "--model", str(stories), "--tuned", str(partner)]
    cmd += ["--prompts", str(inputs["prompts"]), "--corpus", str(inputs["corpus"]), "--out", str(out)]
    cmd += [*TINY, "--data-dir", str(shared_data), "--until", "activations"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_given_pair_is_evaluated_not_trained(given_run, partner, stories):
    r = RunReader(given_run)
    assert r.rl_steps().empty  # nothing was trained
    tuned = r.model_info("tuned")
    assert tuned is not None and tuned["source"] == "given" and tuned["location"] == str(partner)
    assert tuned["name"].endswith("(given)") and tuned["n_params"] == r.model_info("base")["n_params"]
    rl = r.summary(RLHFSummary)
    assert rl is not None and rl.given == str(partner) and rl.steps == 0
    policy = given_run / "artifacts" / "policy"
    assert (policy / "model.safetensors").read_bytes() == (partner / "model.safetensors").read_bytes()

    # rl_eval: the given pair sampled on the same held-out prompts, lengths and seeds
    base, tun = r.completions("base"), r.completions("tuned")
    assert len(base) == len(tun) == 8
    merged = base.merge(tun, on=["prompt_id", "sample_idx"], suffixes=("_b", "_t"))
    assert len(merged) == 8 and (merged.seed_b == merged.seed_t).all()
    ev = r.summary(RLEvalSummary)
    assert ev is not None and ev.difference is not None and ev.kl_per_token > 0
    assert ev.difference["mean"] == pytest.approx((merged.reward_t - merged.reward_b).mean())

    # divergence: the parameters differ exactly in the perturbed layers' MLPs, activations from the first on
    div = r.layer_divergence().sort_values("layer")
    param, act = div.param.to_numpy(), div.act_cos.to_numpy()
    assert all(param[i] > 0 for i in PERTURBED) and all(param[i] == 0 for i in range(5) if i not in PERTURBED)
    assert act[0] == pytest.approx(0, abs=1e-6) and (act[1:] > 1e-4).all()

    text = report.format_report(report.build_report(str(given_run)))
    assert f"tuned model: given: {partner} (not trained here" in text


@pytest.mark.slow
def test_given_prompts_are_whole_texts_split_by_document(given_run, inputs):
    r = RunReader(given_run)
    given = [json.loads(x) for x in inputs["prompts"].read_text().splitlines()]
    prompts = r.prompts()
    assert set(prompts.source) == {"given"}
    assert (prompts.split == "train").sum() == 6 and (prompts.split == "eval").sum() == 8
    by_line = {f"line {i + 1}": g for i, g in enumerate(given)}
    for p in prompts.itertuples():
        assert p.text == by_line[p.doc_id]["text"]  # the whole prompt, as written
        if "split" in by_line[p.doc_id]:
            assert p.split == by_line[p.doc_id]["split"]
    assert not set(prompts.doc_id[prompts.split == "train"]) & set(prompts.doc_id[prompts.split == "eval"])
    s = r.summary(PromptsSummary)
    assert s is not None and s.source == str(inputs["prompts"]) and s.n_trimmed == 0


@pytest.mark.slow
def test_the_given_corpus_replaces_imdb_in_the_activation_corpus(given_run, inputs, stories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories)
    r = RunReader(given_run)
    docs = r.corpus_docs()
    text_docs = docs[~docs.source.str.endswith("_completion")]
    assert set(text_docs.source) == {"corpus"} and len(text_docs) == 40
    want = {tuple(tok(_story(i), add_special_tokens=False)["input_ids"][:128]) for i in range(40)}
    assert {tuple(t) for t in text_docs.token_ids} == want
    assert (docs.split == np.where(docs.doc_id % 10 == 0, "eval", "train")).all()  # every 10th held out
    acts = r.summary(ActivationsSummary)
    assert acts is not None and acts.source == str(inputs["corpus"])
    assert "activation corpus from " + str(inputs["corpus"]) in report.format_report(
        report.build_report(str(given_run))
    )
    once, comma = tok("Once,", add_special_tokens=False)["input_ids"]  # "▁Once" and ","
    assert r.token_strings([once, comma]) == [" Once", ","]  # Llama pieces keep their leading space


@pytest.mark.slow
def test_base_completions_read_on_from_their_prompts(given_run):
    """Llama's tokenizer drops a leading space when a piece is decoded alone; a completion's text keeps it, so
    prompt + completion reads as the whole sequence does."""
    from transformers import AutoTokenizer

    r = RunReader(given_run)
    tok = AutoTokenizer.from_pretrained(given_run / "artifacts" / "policy")
    prompts = r.prompts("eval").set_index("prompt_id")
    for c in r.completions("base").itertuples():
        p = prompts.loc[c.prompt_id]
        assert p.text + c.completion == tok.decode(list(p.token_ids) + list(c.token_ids))


# --- bad input: exit 2, nothing written ---------------------------------------------------------
def _refused(argv: list[str], out: Path, capsys) -> str:
    capsys.readouterr()  # what building the inputs printed
    code = precompute.main([*argv, "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a refused run must write nothing"
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    return err


def test_a_tuned_model_of_another_vocabulary_is_refused_naming_both(stories, demo_model_dir, tmp_path, capsys):
    err = _refused(["--model", str(stories), "--tuned", str(demo_model_dir)], tmp_path / "run", capsys)
    assert "the tuned model's vocab_size is 4096, the base model's is 512" in err
    assert "the tuned model's architecture is GPTNeoXForCausalLM, the base model's is LlamaForCausalLM" in err
    assert str(demo_model_dir) in err and "stories260K" in err


def test_a_tuned_model_with_other_layers_is_refused(stories, tmp_path, capsys):
    short = _perturbed_copy(stories, tmp_path / "short", layers=(), n_layers=4)
    err = _refused(["--model", str(stories), "--tuned", str(short)], tmp_path / "run", capsys)
    assert "the tuned model's n_layers is 4, the base model's is 5" in err


def test_a_missing_tuned_model_is_refused(stories, tmp_path, capsys):
    err = _refused(["--model", str(stories), "--tuned", str(tmp_path / "nope")], tmp_path / "run", capsys)
    assert "--tuned" in err and str(tmp_path / "nope") in err


def test_a_tuned_hub_id_while_offline_says_how_to_get_it(tmp_path, capsys):
    err = _refused(["--tuned", "someorg/some-model"], tmp_path / "run", capsys)
    assert "hub is offline" in err and "hf download someorg/some-model" in err


def test_a_corpus_line_without_text_is_refused_naming_the_line(tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    err = _refused(["--corpus", str(bad)], tmp_path / "run", capsys)
    assert f"--corpus {bad}, line 3: no 'text' field (its fields: body)" in err


def test_a_corpus_too_small_for_the_held_out_split_says_how_many_are_needed(tmp_path, capsys):
    small = _write_jsonl(tmp_path / "c.jsonl", [{"text": _story(i)} for i in range(7)])
    err = _refused(["--corpus", str(small)], tmp_path / "run", capsys)
    assert "gives 7 documents" in err and "every 10th" in err and "needs at least 11" in err


def test_corpus_and_prompts_files_that_are_not_jsonl_or_missing(tmp_path, capsys):
    notjson = tmp_path / "c.txt"
    notjson.write_text("just some text\nmore\n")
    err = _refused(["--corpus", str(notjson)], tmp_path / "run", capsys)
    assert "is not JSONL: line 1 is not valid JSON" in err
    err = _refused(["--prompts", str(tmp_path / "none.jsonl")], tmp_path / "run", capsys)
    assert "--prompts" in err and "no such file" in err
    one = _write_jsonl(tmp_path / "p.jsonl", [{"text": "Once upon a time"}])
    err = _refused(["--prompts", str(one)], tmp_path / "run", capsys)
    assert "has 1 non-empty texts; it needs at least 2 (one RL prompt and one held-out prompt)" in err
    bad_split = _write_jsonl(tmp_path / "q.jsonl", [{"text": "a", "split": "test"}, {"text": "b"}])
    err = _refused(["--prompts", str(bad_split)], tmp_path / "run", capsys)
    assert "line 1: 'split' must be \"train\" or \"eval\", got 'test'" in err


def test_a_refused_input_leaves_an_existing_run_unchanged(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    bad = _write_jsonl(tmp_path / "c.jsonl", [{"nottext": 1}])
    code = precompute.main(["--corpus", str(bad), "--out", str(run), "--rebuild", *TINY])
    assert code == 2 and sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_texts_are_refused_for_the_hh_task(tmp_path, capsys):
    ok = _write_jsonl(tmp_path / "c.jsonl", [{"text": _story(i)} for i in range(20)])
    err = _refused(["--task", "hh", "--corpus", str(ok)], tmp_path / "run", capsys)
    assert "applies to the vader task" in err


# --- the loaders --------------------------------------------------------------------------------
def test_hf_datasets_saved_to_disk_and_local_files_load_offline(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"body": ["one story", "two", "three"], "split": ["train", "eval", "train"]})
    DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    got = texts.read_texts(f"hf:{tmp_path / 'dd'}:test:body")
    assert [(r.text, r.split, r.where) for r in got] == [
        ("one story", "train", "row 0"),
        ("two", "eval", "row 1"),
        ("three", "train", "row 2"),
    ]
    with pytest.raises(BadInputError, match="no split 'train'; the dataset has test"):
        texts.read_texts(f"hf:{tmp_path / 'dd'}")
    with pytest.raises(BadInputError, match=r"no column 'text' \(its columns: body, split\)"):
        texts.read_texts(f"hf:{tmp_path / 'dd'}:test")
    ds.save_to_disk(str(tmp_path / "one"))
    assert len(texts.read_texts(f"hf:{tmp_path / 'one'}::body")) == 3
    jl = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": "  "}, {"text": "c"}])
    assert [r.text for r in texts.read_texts(f"hf:{jl}")] == ["a b", "c"]  # load_dataset("json"); empty skipped
    with pytest.raises(MissingInputError):
        texts.read_texts("hf:/no/such/dir")
    with pytest.raises(BadInputError, match="expected hf:NAME_OR_PATH"):
        texts.parse_source("hf:a:b:c:d")


def test_the_prompt_split_honours_split_fields_and_caps_counts(stories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories)
    recs = [texts.TextRecord(f"text number {i}", "eval" if i < 3 else None, f"line {i + 1}") for i in range(20)]
    rows, trimmed = texts.prompt_rows(tok, recs, n_train=5, n_eval=6, seed=0, max_tokens=3)
    ev = [r for r in rows if r["split"] == "eval"]
    tr = [r for r in rows if r["split"] == "train"]
    assert len(ev) == 6 and len(tr) == 5 and {"line 1", "line 2", "line 3"} <= {r["doc_id"] for r in ev}
    n_long = sum(
        len(tok(r.text, add_special_tokens=False)["input_ids"]) > 3
        for r in recs
        if r.where in {x["doc_id"] for x in rows}
    )
    assert trimmed == n_long > 0 and all(r["n_tokens"] <= 3 for r in rows)
    ends = {r.where: tok(r.text, add_special_tokens=False)["input_ids"][-3:] for r in recs}
    assert all(r["token_ids"] == ends[r["doc_id"]] for r in rows)  # a long prompt keeps its end
    assert [r["prompt_id"] for r in rows] == list(range(11))
    again, _ = texts.prompt_rows(tok, recs, n_train=5, n_eval=6, seed=0, max_tokens=3)
    other, _ = texts.prompt_rows(tok, recs, n_train=5, n_eval=6, seed=1, max_tokens=3)
    assert again == rows and other != rows  # the run's seed decides the split
    few, _ = texts.prompt_rows(tok, recs[3:7], n_train=256, n_eval=256, seed=0, max_tokens=64)
    assert sorted(r["split"] for r in few) == ["eval", "eval", "train", "train"]  # in proportion


def test_fingerprints_follow_the_file_contents(stories, partner, tmp_path):
    f = _write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}])
    a = texts.source_fingerprint(str(f))
    _write_jsonl(f, [{"text": "b"}])
    assert texts.source_fingerprint(str(f)) != a
    cfg = RunConfig()
    assert tuned_fingerprint(cfg) is None and texts.prompts_fingerprint(cfg) is None  # defaults: nothing added
    with_partner = cfg.with_values({"tuned": str(partner)})
    assert tuned_fingerprint(with_partner) == tuned_fingerprint(with_partner)
    assert tuned_fingerprint(with_partner) != tuned_fingerprint(cfg.with_values({"tuned": str(stories)}))
    hashes = precompute.stage_hashes(cfg)
    given = precompute.stage_hashes(with_partner)
    assert given["model"] == hashes["model"] and given["prompts"] == hashes["prompts"]
    assert given["rlhf"] != hashes["rlhf"] and given["activations"] != hashes["activations"]


def test_our_own_grpo_policy_passes_the_check(stories, tmp_path):
    """A policy saved by this tool (tokenizer saved with the pad token load_model sets) is a fine-tune of its base."""
    from lfp_core.models import load_model

    m = load_model(stories)
    m.hf.save_pretrained(tmp_path / "policy")
    m.tokenizer.save_pretrained(tmp_path / "policy")
    check_tuned(RunConfig().with_values({"model": str(stories), "tuned": str(tmp_path / "policy")}))


# --- what the report and the Overview say about a given pair ------------------------------------
def _given_tiny(run_dir: Path, given: str) -> Path:
    from tests.tiny_run import TinyRun

    t = TinyRun(run_dir).model().prompts().base_samples().rlhf(given=given)
    t.rl_eval()
    return run_dir


def test_report_and_overview_say_the_pair_was_given(tmp_path, monkeypatch):
    from tests.helpers import open_page

    run = _given_tiny(tmp_path / "runs" / "given", "/models/my-tuned")
    rep = report.build_report(str(run))
    assert rep["tuned_model"] == {"given": "/models/my-tuned"} and rep["rlhf"]["given"] == "/models/my-tuned"
    text = report.format_report(rep)
    assert "tuned model: given: /models/my-tuned (not trained here, so there is no RL training curve" in text
    assert "gain " in text  # the evaluation of the given pair is still reported

    at = open_page(monkeypatch, tmp_path / "runs", "views/overview.py", run=str(run))
    assert not at.exception
    assert any("Tuned model given: `/models/my-tuned`" in x.value and "no RL reward" in x.value for x in at.info)
    assert [x.value for x in at.subheader].count("Tuned model (given)") == 1
    assert not any("fine-tuned yet" in x.value for x in at.info)
    assert any(m.label == "Gain over base" for m in at.metric)  # the paired evaluation is shown
    assert len(at.get("plotly_chart")) == 1  # the base reward histogram; no RL curves


def test_report_of_a_trained_pair_says_so(tiny):
    text = report.format_report(report.build_report(str(tiny)))
    assert "tuned model: trained here by GRPO, 6 steps" in text and "given" not in text


@pytest.mark.slow
def test_a_given_pair_on_the_hh_task_skips_dpo(stories, partner, shared_data, tmp_path):
    out = tmp_path / "hh"
    argv = ["--task", "hh", "--model", str(stories), "--tuned", str(partner), "--out", str(out)]
    argv += ["--preset", "quick", "--data-dir", str(shared_data), "--set", "n_pairs=8", "--set", "n_eval_pairs=8"]
    assert precompute.main([*argv, "--set", "divergence_sequences=8"]) == 0
    r = RunReader(out)
    assert r.rl_steps().empty and r.model_info("tuned")["source"] == "given"
    ev = r.summary(RLEvalSummary)
    assert ev is not None and ev.n_eval == 8 and ev.eval_margin is not None and ev.eval_margin["mean"] != 0
    param = r.layer_divergence().sort_values("layer").param.to_numpy()
    assert (param[list(PERTURBED)] > 0).all() and param[[0, 2, 4]].max() == 0
