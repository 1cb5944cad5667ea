"""Reward plug-ins (lfp_core/rewards.py): each plug-in scores what it should (against a direct forward
pass of the model, or the function itself), bad specs are refused with a specific message, and a
changed plug-in file changes the hashes of exactly the stages that score with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfp_core import reward, rewards
from lfp_core.rewards import RewardError, RewardSpecError, load_reward, parse_spec

GPT2_TOKENIZER = "/work/shared/data/tokenizers/gpt2"
PAIRS = [
    ("The movie was", " great fun"),
    ("I watched this film", " and it was awful, boring and far too long for me."),
    ("A", " b"),
    ("The plot", " was fine."),
    ("Honestly", " the best thing I have seen all year, truly wonderful!"),
]
PROMPTS, COMPLETIONS = [p for p, _ in PAIRS], [c for _, c in PAIRS]


def _tokenizer():
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    except OSError:
        pytest.skip(f"needs the GPT-2 tokenizer at {GPT2_TOKENIZER}")


def _gpt2_classifier(path, num_labels: int, id2label: dict[int, str] | None = None):
    """A tiny random GPT2ForSequenceClassification with the real GPT-2 tokenizer, saved to ``path``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=num_labels)
    if id2label is not None:
        cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    model = GPT2ForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "sentiment-tiny"
    _gpt2_classifier(path, 2, {0: "NEG", 1: "POS"})
    return path


def _direct_logits(path, texts: list[str], bos: list[int] | None = None) -> np.ndarray:
    """Logits of each text alone (batch of one, no padding), straight from transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for t in texts:
            ids = (bos or []) + tok(t)["input_ids"]
            out.append(model(input_ids=torch.tensor([ids])).logits[0].numpy())
    return np.array(out, dtype=np.float64)


# --- parsing -----------------------------------------------------------------------------------------------
def test_specs_parse_into_their_parts(tmp_path):
    assert parse_spec("vader").kind == "lexicon"
    c = parse_spec("classifier:org/model:toxic@prob")
    assert (c.form, c.target, c.label, c.prob, c.kind) == ("classifier", "org/model", "toxic", True, "sequence")
    assert parse_spec("classifier:org/model").label is None
    (tmp_path / "a:b").mkdir()  # a directory whose name holds a colon is a path, not PATH:LABEL
    assert parse_spec(f"classifier:{tmp_path / 'a:b'}").label is None
    p = parse_spec("python:/x/my_reward.py:score")
    assert (p.form, p.target, p.label) == ("python", "/x/my_reward.py", "score")
    assert parse_spec("reward-model:/runs/x/artifacts/reward_model").form == "reward-model"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("vadr", "does not parse"),
        ("classifier:", "names no model"),
        ("python:just_a_module", "python:MODULE:FUNCTION"),
        ("python:mod:not-an-identifier", "FUNCTION a Python identifier"),
        ("classifier:org/model:POS@maybe", "unknown '@' suffix"),
    ],
)
def test_a_spec_that_does_not_parse_says_the_accepted_forms(spec, message):
    with pytest.raises(RewardSpecError, match=message) as exc:
        parse_spec(spec)
    assert "accepted forms: vader · classifier:PATH_OR_ID[:LABEL][@prob]" in str(exc.value)


# --- the plug-ins ------------------------------------------------------------------------------------------
def test_vader_is_todays_lexicon_reward():
    rw = load_reward("vader")
    assert (rw.kind, rw.name) == ("lexicon", "VADER lexicon")
    got = rw.score(PROMPTS, COMPLETIONS)
    assert got.dtype == np.float64
    assert got.tolist() == [reward.reward(c) for c in COMPLETIONS]  # exactly, and the prompt is not read
    assert rw.score(["great great great"] * 5, COMPLETIONS).tolist() == got.tolist()


def test_classifier_scores_the_named_labels_logit(classifier_dir):
    texts = [p + c for p, c in PAIRS]
    direct = _direct_logits(classifier_dir, texts)
    rw = load_reward(f"classifier:{classifier_dir}")  # two labels: the last (POS) by default
    assert rw.kind == "sequence" and rw.name == "classifier sentiment-tiny (POS logit)"
    np.testing.assert_allclose(rw.score(PROMPTS, COMPLETIONS), direct[:, 1], rtol=1e-5, atol=1e-6)
    neg = load_reward(f"classifier:{classifier_dir}:NEG").score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(neg, direct[:, 0], rtol=1e-5, atol=1e-6)
    prob = load_reward(f"classifier:{classifier_dir}:POS@prob").score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(prob, torch.softmax(torch.tensor(direct), -1)[:, 1].numpy(), rtol=1e-5)
    assert len(set(np.round(direct[:, 1], 6))) > 1  # the texts really score differently


def test_classifier_batches_equal_lengths_without_changing_a_score(classifier_dir):
    rw = load_reward(f"classifier:{classifier_dir}")
    one = np.array([rw.score([p], [c])[0] for p, c in PAIRS])
    rw.batch_size = 2
    np.testing.assert_allclose(rw.score(PROMPTS * 3, COMPLETIONS * 3), np.tile(one, 3), rtol=1e-5, atol=1e-6)


def test_a_label_not_in_the_config_names_the_labels(classifier_dir, tmp_path):
    with pytest.raises(RewardSpecError, match=r"label 'toxic' is not in the classifier's config; its labels: NEG, POS"):
        load_reward(f"classifier:{classifier_dir}:toxic")
    _gpt2_classifier(tmp_path / "three", 3, {0: "a", 1: "b", 2: "c"})
    with pytest.raises(RewardSpecError, match=r"has 3 labels \(a, b, c\); name one"):
        load_reward(f"classifier:{tmp_path / 'three'}")
    assert load_reward(f"classifier:{tmp_path / 'three'}:b").name.endswith("(b logit)")


def test_a_reward_model_dir_scores_its_scalar_head(tmp_path):
    _gpt2_classifier(tmp_path / "pm", 1)
    rw = load_reward(f"reward-model:{tmp_path / 'pm'}")
    direct = _direct_logits(tmp_path / "pm", [p + c for p, c in PAIRS])  # this tokenizer has no BOS
    np.testing.assert_allclose(rw.score(PROMPTS, COMPLETIONS), direct[:, 0], rtol=1e-5, atol=1e-6)
    _gpt2_classifier(tmp_path / "two", 2)
    with pytest.raises(RewardSpecError, match=r"one scalar output \(num_labels 1\).*has 2 labels"):
        load_reward(f"reward-model:{tmp_path / 'two'}")


def test_the_reward_model_stage_s_own_format_is_accepted(tmp_path, demo_model_dir):
    """A preference model as the reward_model stage saves it (trl RewardTrainer, save_pretrained of the
    model and tokenizer) scores as that stage's own RewardModel does on BOS + prompt + completion."""
    from lfp_core import reward_model
    from lfp_core.models import load_model
    from lfp_core.settings import RMSettings

    base = load_model("demo")
    tok = base.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for p, c in PAIRS:  # the precondition of comparing text with token ids: no merge across the boundary
        assert enc(p + c) == enc(p) + enc(c), (p, c)
    prompts = {i: enc(p) for i, (p, _) in enumerate(PAIRS)}
    pairs = [
        {"prompt_id": i, "chosen_ids": enc(c), "rejected_ids": enc(PAIRS[(i + 1) % 5][1]), "chosen_oracle": 1.0}
        for i, (_, c) in enumerate(PAIRS)
    ]
    out, _ = reward_model.train_reward_model(
        base, pairs, prompts, RMSettings(epochs=1, batch_size=4), tmp_path / "reward_model", seed=0
    )
    theirs = reward_model.RewardModel(out, base).score([[tok.bos_token_id] + enc(p + c) for p, c in PAIRS])
    rw = load_reward(f"reward-model:{out}")
    assert rw.name == "reward model reward_model"
    np.testing.assert_allclose(rw.score(PROMPTS, COMPLETIONS), theirs, rtol=1e-4, atol=1e-5)


def test_a_python_plugin_from_a_file_and_from_a_dotted_module(tmp_path, monkeypatch):
    src = (
        "def score(prompts, completions):\n"
        "    return [len(p) + 100 * c.count('a') for p, c in zip(prompts, completions)]\n"
    )
    (tmp_path / "my_reward.py").write_text(src)
    want = [len(p) + 100 * c.count("a") for p, c in PAIRS]
    by_file = load_reward(f"python:{tmp_path / 'my_reward.py'}:score")
    assert by_file.kind == "sequence" and by_file.name == "python my_reward.py:score"
    assert by_file.score(PROMPTS, COMPLETIONS).tolist() == want
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("python:my_reward:score").score(PROMPTS, COMPLETIONS).tolist() == want


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [1.0]", r"returned 1 values \(shape \(1,\)\) for 5 \(prompt, completion\) pairs"),
        (
            "return [float('inf') if 'b' in c else 0.0 for c in completions]",
            r"non-finite values \(inf\) at 3 of 5 rows: 1, 2, 4$",
        ),
        ("return ['x'] * len(completions)", "not a sequence of numbers"),
        ("raise KeyError('oops')", "raised KeyError: 'oops'"),
    ],
)
def test_a_python_plugin_s_bad_output_is_refused_naming_the_rows(tmp_path, body, message):
    (tmp_path / "bad.py").write_text(f"def f(prompts, completions):\n    {body}\n")
    with pytest.raises(RewardError, match=message):
        load_reward(f"python:{tmp_path / 'bad.py'}:f").score(PROMPTS, COMPLETIONS)


def test_missing_modules_functions_and_models_are_refused(tmp_path):
    (tmp_path / "m.py").write_text("def other(p, c):\n    return [0.0] * len(c)\n")
    cases = [
        ("python:no_such_module_xyz:f", "no module named 'no_such_module_xyz' on sys.path"),
        (f"python:{tmp_path / 'absent.py'}:f", "absent.py does not exist"),
        (f"python:{tmp_path / 'm.py'}:score", r"has no function 'score' \(its functions: other\)"),
        (f"classifier:{tmp_path / 'nowhere'}", "neither a local directory nor a hub id that resolves"),
        ("classifier:someone/not-in-the-cache", r"offline: HF_HUB_OFFLINE is set"),
        (f"classifier:{tmp_path}", "has no config.json"),
    ]
    for spec, message in cases:
        with pytest.raises(RewardSpecError, match=message):
            load_reward(spec)


def test_a_causal_lm_is_not_taken_for_a_classifier(demo_model_dir):
    with pytest.raises(RewardSpecError, match="not a sequence classifier"):
        load_reward(f"classifier:{demo_model_dir}")


# --- hashing ---------------------------------------------------------------------------------------------------
def test_changing_the_plugin_s_files_recomputes_the_stages_that_score_with_it(tmp_path):
    from lfp_core.precompute import stage_hashes
    from lfp_core.settings import preset_config
    from lfp_core.stages import stages_for

    holders = {s.name for s in stages_for("vader") if "reward" in s.groups}
    assert holders == {
        *("base_samples", "rlhf", "rl_eval", "probes", "labels", "ablation", "reward_model", "attribution"),
        *("null_rlhf", "crosscoders", "localisation", "diff_causal"),
    }
    mod = tmp_path / "r.py"
    mod.write_text("def f(p, c):\n    return [0.0] * len(c)\n")
    cfg = preset_config("quick", reward=f"python:{mod}:f")
    a = stage_hashes(cfg)
    mod.write_text("def f(p, c):\n    return [1.0] * len(c)\n")
    b = stage_hashes(cfg)
    assert {k for k in a if a[k] != b[k]} >= holders and a["model"] == b["model"] and a["prompts"] == b["prompts"]
    assert rewards.spec_fingerprint("vader") is None

    clf = tmp_path / "clf"
    _gpt2_classifier(clf, 2, {0: "NEG", 1: "POS"})
    spec = f"classifier:{clf}"
    before = rewards.spec_fingerprint(spec)
    assert before == rewards.spec_fingerprint(spec)
    (clf / "config.json").write_text((clf / "config.json").read_text().replace('"NEG"', '"NEGATIVE"'))
    assert rewards.spec_fingerprint(spec) != before
