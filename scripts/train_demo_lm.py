"""Train the shipped demo base model: a byte-level BPE tokenizer and a small GPT-NeoX LM on IMDB.

The result is the embedded default model of LFP Explorer (``data/models/imdb-neox-5m``), so the
whole pipeline runs with no hub access. It is a Pythia-architecture causal LM (GPT-NeoX:
parallel attention + MLP residual, partial rotary embeddings, untied unembedding).

Data: IMDB reviews. Training text is ``aclImdb/train/{pos,neg,unsup}`` (75k reviews); the
held-out split is ``aclImdb/test/{pos,neg}`` (25k reviews never seen in training), from which
perplexity is measured. Each review is cleaned of ``<br />`` tags and prefixed with the
``<|endoftext|>`` token, which is also BOS/EOS/PAD, as transformer-lens prepends BOS by default.
Documents are packed into fixed-length blocks.

The learning-rate schedule is a linear warm-up and a cosine decay over a *wall-time* budget
(``--minutes``), so the script trains for a predictable time on whatever machine runs it.

Usage::

    python scripts/train_demo_lm.py --data ../shared/data/imdb --minutes 60 \
        --out data/models/imdb-neox-5m

Writes the HF model directory, MODEL_CARD.md and a train_log.jsonl in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lfp_core.corpora import iter_imdb  # noqa: E402

log = logging.getLogger("train_demo_lm")

EOT = "<|endoftext|>"


def read_imdb(data_dir: Path) -> tuple[list[str], list[str]]:
    """Return (train_texts, heldout_texts) from the IMDB archives in ``data_dir`` (the imdb folder).

    Train: train/pos, train/neg and train/unsup. Held-out: test/pos and test/neg.
    """
    train: list[str] = []
    heldout: list[str] = []
    for r in iter_imdb(data_dir.parent, splits=("train", "test"), labels=("pos", "neg", "unsup")):
        (heldout if r.doc_id.startswith("test/") else train).append(r.text)
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=2048,
    )
    tok.save_pretrained(out_dir)
    # Reload from disk: the in-memory object is not what downstream loaders will see.
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def encode_corpus(tok, texts: list[str]) -> np.ndarray:
    """Tokenise documents as EOT + text, concatenated into one uint16 stream."""
    eot = tok.convert_tokens_to_ids(EOT)
    out: list[np.ndarray] = []
    batch = 2000
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], add_special_tokens=False)["input_ids"]
        for ids in enc:
            out.append(np.asarray([eot, *ids], dtype=np.uint16))
    return np.concatenate(out)


def save_half(model, out: Path) -> None:
    """Save the weights in float16 (halves the shipped size; loaders upcast to float32)."""
    import copy

    copy.deepcopy(model).to(torch.float16).save_pretrained(out)


def build_model(vocab_size: int, args) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=args.d_model,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        intermediate_size=4 * args.d_model,
        max_position_embeddings=args.max_positions,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return GPTNeoXForCausalLM(cfg)


@torch.no_grad()
def heldout_nll(model, stream: np.ndarray, ctx: int, max_blocks: int) -> tuple[float, int]:
    """Mean next-token NLL (nats) over non-overlapping blocks of the held-out stream."""
    model.eval()
    n_blocks = min(max_blocks, (len(stream) - 1) // ctx)
    total, count = 0.0, 0
    for i in range(0, n_blocks, 32):
        idx = range(i, min(n_blocks, i + 32))
        x = torch.from_numpy(np.stack([stream[j * ctx : (j + 1) * ctx].astype(np.int64) for j in idx]))
        logits = model(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    model.train()
    return total / count, count


def unigram_nll(train_stream: np.ndarray, eval_stream: np.ndarray, vocab: int, ctx: int, max_blocks: int) -> float:
    """NLL (nats) of an add-one-smoothed unigram model on the same positions heldout_nll scores."""
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    n_blocks = min(max_blocks, (len(eval_stream) - 1) // ctx)
    targets = np.concatenate([eval_stream[j * ctx + 1 : (j + 1) * ctx] for j in range(n_blocks)])
    return float(-logp[targets].mean())


@torch.no_grad()
def sample(model, tok, prompt: str, n_new: int, seed: int) -> str:
    """Pure ancestral sampling (temperature 1, top_k 0, top_p 1) — the RL stage's setting."""
    torch.manual_seed(seed)
    ids = tok(EOT + prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        ids,
        max_new_tokens=n_new,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    return tok.decode(out[0, 1:], skip_special_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LFP_DATA_DIR", "../shared/data")) / "imdb")
    ap.add_argument("--out", type=Path, default=Path("data/models/imdb-neox-5m"))
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-frac", type=float, default=0.02)
    ap.add_argument("--eval-blocks", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--max-reviews", type=int, default=0, help="use only this many training reviews (smoke tests)")
    ap.add_argument(
        "--card-only",
        action="store_true",
        help="rewrite MODEL_CARD.md from the train_result.json in --out (no training)",
    )
    args = ap.parse_args()
    if args.card_only:
        saved = json.loads((args.out / "train_result.json").read_text())
        prompts, samples = zip(*saved.pop("samples"))
        write_model_card(args.out, saved, list(prompts), list(samples))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    train_texts, heldout_texts = read_imdb(args.data)
    random.shuffle(train_texts)
    random.shuffle(heldout_texts)
    if args.max_reviews:
        train_texts = train_texts[: args.max_reviews]
    log.info("read %d train / %d held-out reviews in %.0fs", len(train_texts), len(heldout_texts), time.time() - t0)

    tok = train_tokenizer(train_texts, args.vocab, args.out)
    vocab = len(tok)
    train_stream = encode_corpus(tok, train_texts)
    heldout_stream = encode_corpus(tok, heldout_texts[:5000])
    log.info(
        "vocab %d; %d train tokens, %d held-out tokens (%.0fs)",
        vocab,
        len(train_stream),
        len(heldout_stream),
        time.time() - t0,
    )

    model = build_model(vocab, args)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters", n_params)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    n_blocks = (len(train_stream) - 1) // args.ctx
    order = np.random.permutation(n_blocks)
    budget = args.minutes * 60.0
    t_train = time.time()
    step, pos, tokens_seen, epochs = 0, 0, 0, 0
    log_path = args.out / "train_log.jsonl"
    with log_path.open("w") as logf:
        while True:
            frac = (time.time() - t_train) / budget
            if frac >= 1.0:
                break
            lr = args.lr * (
                frac / args.warmup_frac
                if frac < args.warmup_frac
                else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - args.warmup_frac) / (1 - args.warmup_frac)))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            if pos + args.batch > n_blocks:
                order, pos, epochs = np.random.permutation(n_blocks), 0, epochs + 1
            idx = order[pos : pos + args.batch]
            pos += args.batch
            x = torch.from_numpy(
                np.stack([train_stream[j * args.ctx : (j + 1) * args.ctx + 1].astype(np.int64) for j in idx])
            )
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens_seen += x[:, 1:].numel()
            if step % 100 == 0:
                rec = {
                    "step": step,
                    "tokens": tokens_seen,
                    "loss": float(loss),
                    "lr": lr,
                    "min": (time.time() - t_train) / 60,
                }
                if step % 1000 == 0:
                    nll, _ = heldout_nll(model, heldout_stream, args.ctx, 200)
                    rec["heldout_ppl_200blocks"] = math.exp(nll)
                    save_half(model, args.out)  # checkpoint: a kill loses at most ~1000 steps
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log.info("%s", rec)
    wall = time.time() - t_train
    save_half(model, args.out)

    nll, n_eval = heldout_nll(model, heldout_stream, args.ctx, args.eval_blocks)
    uni = unigram_nll(train_stream, heldout_stream, vocab, args.ctx, args.eval_blocks)
    model.eval()
    prompts = ["", "", "", "", "", "This movie", "I was", "The acting", "Worst", "One of the best"]
    samples = [sample(model, tok, p, 60, seed=1000 + i) for i, p in enumerate(prompts)]
    result = {
        "n_params": n_params,
        "vocab": vocab,
        "train_tokens_available": int(len(train_stream)),
        "tokens_seen": tokens_seen,
        "steps": step,
        "epochs_completed": epochs,
        "wall_minutes": wall / 60,
        "heldout_ppl": math.exp(nll),
        "unigram_ppl": math.exp(uni),
        "heldout_eval_tokens": n_eval,
        "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "train_result.json").write_text(
        json.dumps({**result, "samples": list(zip(prompts, samples))}, indent=2)
    )
    write_model_card(args.out, result, prompts, samples)
    log.info("done: %s", json.dumps(result))


def write_model_card(out: Path, r: dict, prompts: list[str], samples: list[str]) -> None:
    a = r["args"]
    lines = [
        "# imdb-neox-5m — the LFP Explorer demo base model",
        "",
        "A small GPT-NeoX (Pythia architecture) causal LM trained from scratch on IMDB movie reviews,",
        "shipped so that LFP Explorer runs end to end with no hub access. Produced by",
        "`scripts/train_demo_lm.py`; every figure below was written by that script.",
        "",
        "## Architecture",
        f"- GPT-NeoX, {a['n_layers']} layers, d_model {a['d_model']}, {a['n_heads']} heads, d_mlp {4 * int(a['d_model'])},",
        "  parallel residual, rotary on 25% of head dims, untied unembedding, GELU, LayerNorm.",
        f"- {r['n_params']:,} parameters; byte-level BPE tokenizer (`tokenizers`), vocab {r['vocab']};",
        "  `<|endoftext|>` (id 0) is BOS, EOS, PAD and UNK.",
        "- Weights are stored in float16 (half the size; trained in float32, loaders upcast to float32).",
        "",
        "## Data",
        "- Training: IMDB (Maas et al. 2011) `train/pos`, `train/neg`, `train/unsup` — 75,000 reviews,",
        f"  `<br />` removed, each prefixed by `<|endoftext|>`, packed into {a['ctx']}-token blocks",
        f"  ({r['train_tokens_available']:,} tokens).",
        "- Held out: IMDB `test/pos` and `test/neg` (never trained on). Perplexity is measured on",
        f"  {r['heldout_eval_tokens']:,} next-token predictions from 5,000 test reviews.",
        "",
        "## Training",
        f"- AdamW (β 0.9/0.95, weight decay 0.1), peak lr {a['lr']}, warm-up {a['warmup_frac']} then cosine to 10%",
        f"  over a wall-time budget; batch {a['batch']}×{a['ctx']} tokens; seed {a['seed']}.",
        f"- Tokens seen: {r['tokens_seen']:,} ({r['steps']:,} steps, {r['epochs_completed']} full epochs).",
        f"- Wall time: {r['wall_minutes']:.1f} minutes on {r['hardware']} (torch {r['torch']}).",
        "",
        "## Held-out perplexity",
        "| model | perplexity |",
        "|---|---|",
        f"| this model | {r['heldout_ppl']:.1f} |",
        f"| unigram baseline (add-one, train counts) | {r['unigram_ppl']:.1f} |",
        "",
        "## Ten unedited samples",
        "Pure sampling (temperature 1, top_k 0, top_p 1 — the RL stage's setting), 60 new tokens, seeds",
        "1000–1009; the first five start from `<|endoftext|>` alone, the rest from the prompt in bold.",
        "",
    ]
    for i, (p, s) in enumerate(zip(prompts, samples)):
        text = s.replace("\n", " ")
        shown = f"**{p}**{text[len(p) :]}" if p and text.startswith(p) else text
        lines.append(f"{i + 1}. {shown}")
    lines += [
        "",
        "## Limits",
        "A 5M-parameter model trained for about an hour on a CPU: its grammar is local and its reviews",
        "wander. It is a test bed for the method, not a model whose findings transfer to large LMs.",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
