"""Sampling completions from a policy with the paper's settings (top_k=0, top_p=1, temperature 1).

Prompts are grouped by length so batches need no padding (prompts are 2–9 tokens, so there are
at most 8 groups); the model's BOS token, when it has one, is prepended as transformer-lens does.
Every batch is generated with its own seed, so a completion depends only on (seed, batch).
A completion stops at the first end-of-text token it samples.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


@torch.no_grad()
def sample_batch(
    model, prompts: list[list[int]], max_new_tokens: int, seed: int, allow_eos: bool = True
) -> list[list[int]]:
    """Sample ``max_new_tokens`` tokens after each prompt (all prompts the same length).

    Args:
        model: a :class:`lfp_core.models.LoadedModel`.
        prompts: token ids without BOS, all of one length (may be empty: sample from BOS).
        max_new_tokens: tokens to sample per prompt.
        seed: seeds torch's generator for this batch.
        allow_eos: when False the end-of-text token is never sampled (used for prompt prefixes).

    Returns:
        The new token ids of each prompt, cut at the first EOS.
    """
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("sample_batch needs prompts of equal length; use sample_completions")
    tok = model.tokenizer
    bos = _bos(tok)
    if not bos and not prompts[0]:
        raise ValueError("cannot sample from an empty prompt: the tokenizer has no BOS token")
    ids = torch.tensor([bos + list(p) for p in prompts], dtype=torch.long, device=model.device)
    torch.manual_seed(seed)
    out = model.hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=None if allow_eos or tok.eos_token_id is None else [tok.eos_token_id],
    )
    new = out[:, ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    return [row[: row.index(eos)] if eos is not None and eos in row else row for row in new]


def sample_completions(
    model, prompts: list[list[int]], n_new: list[int], seed: int, batch_size: int = 64
) -> list[tuple[list[int], int]]:
    """Sample one completion per prompt, of ``n_new[i]`` tokens (fewer if EOS comes first).

    Each batch samples the longest requested length and truncates the others, which gives each
    row an exact sample of its own length (sampling is autoregressive).

    Returns:
        ``(new_token_ids, batch_seed)`` per prompt, in input order.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    results: list[tuple[list[int], int] | None] = [None] * len(prompts)
    batch_no = 0
    for length in sorted(groups):
        idx = groups[length]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            batch_seed = int(np.random.SeedSequence([seed, batch_no]).generate_state(1)[0])
            batch_no += 1
            outs = sample_batch(model, [prompts[i] for i in chunk], max(n_new[i] for i in chunk), batch_seed)
            for i, o in zip(chunk, outs):
                results[i] = (o[: n_new[i]], batch_seed)
    return results  # type: ignore[return-value]
