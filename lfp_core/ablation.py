"""Feature ablation: zero a set of SAE features at one or several layers while keeping each SAE's
error term, so the model's computation changes by exactly those features' decoder contributions and
nothing else (an empty set reproduces the clean model's logits).

Also here: sampling under an ablation with shared seeds (so the ablated and the clean policy draw
from the same random stream), and the statistics that compare a feature set's effect on the reward
with size-matched random sets. The ablation stage (:mod:`lfp_core.pipeline.ablation`) and the live
engine (:mod:`lfp_core.live`) build on these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from lfp_core.errors import BadInputError


def _hook_point(sae) -> str:
    return f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"


def check_features(saes: Mapping[int, Any], features: Mapping[int, Sequence[int]]) -> None:
    """Every layer has an SAE and every feature id is inside its dictionary; else a clear ValueError."""
    for layer, ids in features.items():
        if layer not in saes:
            raise BadInputError(f"no SAE for layer {layer}; layers with SAEs: {sorted(saes)}")
        d = int(saes[layer].cfg.d_sae)
        bad = [int(i) for i in ids if not 0 <= int(i) < d]
        if bad:
            raise BadInputError(f"feature ids {bad[:5]} are out of range for layer {layer} (0–{d - 1})")


def _zero_hook(ids: Sequence[int], mask: torch.Tensor | None = None):
    idx = torch.as_tensor(sorted({int(i) for i in ids}), dtype=torch.long)

    def hook(acts, hook):  # [batch, pos, d_sae]
        if mask is None:
            acts[..., idx] = 0.0
        else:  # mask [batch, pos]: 1 where the features are zeroed
            acts[..., idx] = acts[..., idx] * (1.0 - mask[..., None].to(acts.dtype))
        return acts

    return hook


@contextlib.contextmanager
def ablated(
    model, saes: Mapping[int, object], features: Mapping[int, Sequence[int]], mask: torch.Tensor | None = None
) -> Iterator[None]:
    """Within the context, ``model`` (a HookedSAETransformer) runs with every SAE of ``saes`` spliced
    in (error term kept) and the ``features`` {layer: ids} zeroed — at every position, or where
    ``mask`` is 1: [batch, pos] for whole-sequence passes, or [batch, 1] (whole rows, any position,
    so it also works with a KV cache)."""
    check_features(saes, features)
    hooks = [(_hook_point(saes[layer]), _zero_hook(ids, mask)) for layer, ids in features.items() if len(ids)]
    with model.saes(saes=list(saes.values()), use_error_term=True), model.hooks(fwd_hooks=hooks):
        yield


@torch.no_grad()
def run_with_ablation(
    model,
    saes: Mapping[int, object],
    features: Mapping[int, Sequence[int]],
    tokens: torch.Tensor,
    names: Sequence[str] = (),
) -> tuple[torch.Tensor, dict]:
    """Logits of ``model`` (a HookedSAETransformer) on ``tokens`` [batch, pos] with every SAE of ``saes``
    spliced in (error term kept) and the ``features`` {layer: ids} zeroed; plus the activations at
    ``names`` (e.g. ``blocks.2.hook_mlp_out.hook_sae_output``)."""
    cache: dict = {}
    keep = [(n, (lambda a, hook, _n=n: cache.__setitem__(_n, a.detach().clone()))) for n in names]
    with ablated(model, saes, features):
        logits = model.run_with_hooks(tokens, fwd_hooks=keep)
    return logits, cache


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new_tokens: int, seed: int) -> list[list[int]]:
    """Sample ``max_new_tokens`` after each row of ``prompts`` [batch, pos] (BOS included, equal
    lengths) with the RL settings (temperature 1, no top-k/top-p), under whatever hooks or SAEs are
    active on ``model``, with a KV cache; cut at the first end-of-text token.

    Tokens are drawn by inverse-CDF sampling from one uniform per (row, step) generated from
    ``seed``: a clean and an ablated run with the same seed pick the same token wherever the
    ablation leaves the distribution unchanged (a coupled comparison, lower-variance than two
    independent draws), and rows that share a uniform stay coupled inside one batch (see
    :func:`coupled_rows`).
    """
    from transformer_lens import TransformerLensKeyValueCache as HookedTransformerKeyValueCache

    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand((prompts.shape[0], max_new_tokens), generator=gen, dtype=torch.float64)
    return _sample_with_uniforms(model, prompts, u, HookedTransformerKeyValueCache)


def _sample_with_uniforms(model, prompts: torch.Tensor, u: torch.Tensor, cache_cls) -> list[list[int]]:
    cache = cache_cls.init_cache(model.cfg, model.cfg.device, prompts.shape[0])
    # the prompt pass fills the cache; only its last position needs the unembedding (for the demo
    # model, 4,096 x 256, a quarter of the multiply-adds of every prompt position, plus the softmax)
    resid = model(prompts, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)[:, -1:]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = model.unembed(resid)[:, -1]  # [batch, d_vocab]
    out = []
    for step in range(u.shape[1]):
        cdf = torch.softmax(logits, -1).cumsum(-1)  # float32: normalised by its own end below
        nxt = torch.searchsorted(cdf, u[:, step : step + 1].to(cdf) * cdf[:, -1:]).clamp_(max=cdf.shape[1] - 1)
        out.append(nxt)
        if step + 1 < u.shape[1]:
            logits = model(nxt, past_kv_cache=cache)[:, -1]
    new = torch.cat(out, 1).tolist() if out else [[] for _ in range(prompts.shape[0])]
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    return [row[: row.index(eos)] if eos is not None and eos in row else row for row in new]


@torch.no_grad()
def coupled_rows(
    model,
    saes: Mapping[int, object],
    features: Mapping[int, Sequence[int]],
    prompts: torch.Tensor,
    max_new_tokens: int,
    seed: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Clean and ablated completions of ``prompts`` in one batch: the first half of the rows runs
    with ``features`` kept, the second with them zeroed, each pair of rows drawing the same
    uniforms (what :func:`sample` with the same seed gives, at half the forward passes)."""
    from transformer_lens import TransformerLensKeyValueCache as HookedTransformerKeyValueCache

    n = prompts.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand((n, max_new_tokens), generator=gen, dtype=torch.float64)
    row_mask = torch.cat([torch.zeros(n, 1), torch.ones(n, 1)]).to(prompts.device)  # [2n, 1]: zero the 2nd half
    with ablated(model, saes, features, mask=row_mask):
        both = _sample_with_uniforms(model, prompts.repeat(2, 1), u.repeat(2, 1), HookedTransformerKeyValueCache)
    return both[:n], both[n:]


# --- statistics ------------------------------------------------------------------------------------
def paired_effect(before: np.ndarray, after: np.ndarray, level: float = 0.95) -> dict:
    """Mean reward before/after (with t confidence intervals) and the paired difference after − before."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    n = len(before)

    def ci(x):
        m = float(x.mean())
        if n < 2:
            return m, float("nan"), float("nan")
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n))
        return m, m - half, m + half

    b, d = ci(before), ci(after - before)
    a = ci(after)
    return {
        "n": n,
        "before": b[0],
        "before_lo": b[1],
        "before_hi": b[2],
        "after": a[0],
        "after_lo": a[1],
        "after_hi": a[2],
        "diff": d[0],
        "diff_lo": d[1],
        "diff_hi": d[2],
    }


def compare_with_controls(target: np.ndarray, controls: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """How a feature set's paired reward differences compare with size-matched random sets'.

    Args:
        target: [n] reward differences (after − before) of the tested set, per prefix.
        controls: [m, n] the same for ``m`` random sets, on the same prefixes and seeds.

    Returns:
        ``p_rank``: (1 + #controls whose mean difference is ≤ the target's) / (1 + m) — the exact
        p-value of "the target lowers the reward more than a random set would" under exchangeability;
        ``p``: bootstrap over prefixes (resampled jointly for all sets) of the target's mean
        difference not being below the controls' mean; ``lower_than_all``: whether the target's
        mean difference is below every control's.
    """
    target, controls = np.asarray(target, float), np.atleast_2d(np.asarray(controls, float))
    t_mean, c_means = float(target.mean()), controls.mean(axis=1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(target), size=(n_boot, len(target)))
    gap = target[idx].mean(axis=1) - controls[:, idx].mean(axis=2).mean(axis=0)  # [n_boot]
    return {
        "target_diff": t_mean,
        "random_diffs": [float(x) for x in c_means],
        "random_diff_mean": float(c_means.mean()),
        "p_rank": float((1 + (c_means <= t_mean).sum()) / (1 + len(c_means))),
        "p": float((1 + (gap >= 0).sum()) / (1 + n_boot)),
        "lower_than_all": bool((t_mean < c_means).all()),
    }


def random_sets(
    alive: Mapping[int, Sequence[int]],
    like: Mapping[int, Sequence[int]],
    n: int,
    seed: int,
    exclude: Mapping[int, Sequence[int]] | None = None,
) -> list[dict[int, list[int]]]:
    """``n`` random feature sets with as many features per layer as ``like``, drawn from ``alive``
    (features that fire) minus ``exclude``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        draw = {}
        for layer, ids in like.items():
            pool = sorted({int(i) for i in alive.get(layer, ())} - {int(i) for i in (exclude or {}).get(layer, ())})
            if len(pool) < len(ids):
                raise ValueError(
                    f"layer {layer} has {len(pool)} firing features outside the set; cannot draw {len(ids)}"
                )
            draw[layer] = sorted(int(x) for x in rng.choice(pool, size=len(ids), replace=False))
        out.append(draw)
    return out
