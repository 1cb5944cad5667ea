"""Model loading: the shipped demo model, random-weight pythia/gpt-neo/gpt2-shaped models with the
real tokenizers, the real pretrained stories260K Llama, and every bad-input path.

Each loaded model's hooked (transformer-lens) log-probs must match the HF model's (< 1e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lfp_core.models import ModelLoadError, load_model, resolve_spec

TEXT = "This movie was surprisingly good, although the ending felt rushed."


def _max_logprob_diff(m) -> float:
    ids = m.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if m.tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.tensor([[m.tokenizer.bos_token_id]]), ids], dim=1)
    with torch.no_grad():
        hf = torch.log_softmax(m.hf(ids).logits.float(), -1)
        tl = torch.log_softmax(m.hooked()(ids).float(), -1)
    assert hf.shape == tl.shape
    return float((hf - tl).abs().max())


def _save_random(tmp_path: Path, model, tokenizer) -> Path:
    d = tmp_path / "model"
    torch.manual_seed(0)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)  # saved and reloaded by load_model, as transformer-lens needs
    return d


def _neox_tokenizer(shared_data: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _gpt2_tokenizer(shared_data: Path):
    from transformers import GPT2TokenizerFast

    d = shared_data / "tokenizers" / "gpt2"
    return GPT2TokenizerFast(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"))


def test_demo_model_loads_and_matches(demo_model_dir):
    m = load_model("demo")
    info = m.info()
    assert info["architecture"] == "GPTNeoXForCausalLM"
    assert 3e6 <= info["n_params"] <= 8e6
    assert _max_logprob_diff(m) < 1e-3


@pytest.mark.shared
def test_random_pythia_shaped_model(shared_data, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = _neox_tokenizer(shared_data)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    d = _save_random(tmp_path, GPTNeoXForCausalLM(cfg), tok)
    m = load_model(d)
    assert m.hooked().cfg.rotary_dim == 4  # 25% of d_head 16
    assert _max_logprob_diff(m) < 1e-3


@pytest.mark.shared
def test_random_gpt_neo_shaped_model(shared_data, tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tok = _gpt2_tokenizer(shared_data)
    cfg = GPTNeoConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=128,
    )
    d = _save_random(tmp_path, GPTNeoForCausalLM(cfg), tok)
    m = load_model(d)
    assert _max_logprob_diff(m) < 1e-3


@pytest.mark.shared
def test_random_gpt2_shaped_model(shared_data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _gpt2_tokenizer(shared_data)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    d = _save_random(tmp_path, GPT2LMHeadModel(cfg), tok)
    m = load_model(d)
    assert m.info()["architecture"] == "GPT2LMHeadModel"
    assert _max_logprob_diff(m) < 1e-3


@pytest.mark.shared
def test_pretrained_stories260k_llama(shared_data):
    m = load_model(shared_data / "models" / "stories260K" / "hf")
    assert m.info()["architecture"] == "LlamaForCausalLM"
    assert m.info()["n_params"] == 260_032
    assert _max_logprob_diff(m) < 1e-3


def test_missing_path_names_it_and_the_accepted_forms(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError) as e:
        resolve_spec(str(missing))
    assert str(missing) in str(e.value) and "hub id" in str(e.value) and "demo" in str(e.value)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_spec(f)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelLoadError, match="BertForMaskedLM"):
        resolve_spec(tmp_path)


def test_hub_id_while_offline_says_so():
    with pytest.raises(ModelLoadError) as e:
        load_model("EleutherAI/pythia-70m")
    msg = str(e.value)
    assert "offline" in msg and "--model" in msg and "local" in msg
