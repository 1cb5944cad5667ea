"""Feature ablation: zero a set of SAE features at one or several layers while keeping each SAE's
error term, so the model's computation changes by exactly those features' decoder contributions and
nothing else (an empty set reproduces the clean model's logits).

Also here: sampling under an ablation with shared seeds (so the ablated and the clean policy draw
from the same random stream), and the statistics that compare a feature set's effect on the reward
with random control sets. The ablation stage (:mod:`lfp_core.pipeline.ablation`) and the live
engine (:mod:`lfp_core.live`) build on these.

The test (:func:`compare_with_controls`): the null hypothesis is "the tested set moves the reward as a
random set of the same size and the same activation mass would", so the controls are :func:`random_sets`
drawn from the same layers with as many features per layer and, feature by feature, from the features
nearest in activation mass (see :func:`random_sets`), and the p-value is the exact rank p of the tested
set's mean reward change among theirs, one-sided in the hypothesised direction:
(1 + #{controls at least as extreme}) / (1 + N). It is valid whatever the distribution of the set
effects, and its smallest value is 1/(N + 1): N >= :data:`MIN_RANDOM` (20) random sets are needed for
it to be able to go below 0.05 (with the 5 sets of old it could never go below 1/6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from lfp_core.errors import BadInputError
from lfp_core.settings import ABLATION_MIN_RANDOM


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
def sample(model, prompts: torch.Tensor, max_new_tokens: int, seed: int | Sequence[int]) -> list[list[int]]:
    """Sample ``max_new_tokens`` after each row of ``prompts`` [batch, pos] (BOS included, equal
    lengths) with the RL settings (temperature 1, no top-k/top-p), under whatever hooks or SAEs are
    active on ``model``, with a KV cache; cut at the first end-of-text token.

    Tokens are drawn by inverse-CDF sampling from one uniform per (row, step) generated from
    ``seed``: a clean and an ablated run with the same seed pick the same token wherever the
    ablation leaves the distribution unchanged (a coupled comparison, lower-variance than two
    independent draws), and rows that share a uniform stay coupled inside one batch (see
    :func:`coupled_rows`). ``seed`` may also be one seed per row: each row's uniforms then come
    from its own stream, so a row draws the same tokens whichever batch it is sampled in and
    whatever the batch's ``max_new_tokens`` (the ablation stage samples some sets on a subset of
    the prefixes).
    """
    from transformer_lens import TransformerLensKeyValueCache as HookedTransformerKeyValueCache

    if isinstance(seed, Sequence):
        if len(seed) != prompts.shape[0]:
            raise ValueError(f"{len(seed)} seeds for {prompts.shape[0]} rows")
        u = torch.stack(
            [
                torch.rand((max_new_tokens,), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                for s in seed
            ]
        ).reshape(prompts.shape[0], max_new_tokens)
    else:
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


MIN_RANDOM = ABLATION_MIN_RANDOM
"""Random control sets per tested set the ablation test needs: its smallest p-value is 1/(N + 1), and
1/21 ≈ 0.048 is the first below 0.05 (``ablation.random`` below it is refused)."""
MATCH_BINS = 10
"""Each control feature is drawn from the 1/MATCH_BINS of its layer's candidate features nearest in
activation mass to the tested feature it stands for (a decile-wide stratum centred on it)."""
Hypothesis = str  # "lower" (zeroing the set lowers the reward) or "raise"
HYPOTHESES = ("lower", "raise")


def min_p(n_random: int) -> float:
    """The smallest rank p-value ``n_random`` control sets can give: 1/(N + 1)."""
    return 1.0 / (int(n_random) + 1)


def compare_with_controls(target: np.ndarray, controls: np.ndarray, hypothesis: Hypothesis = "lower") -> dict:
    """Test a feature set's reward change against random control sets, one-sided in the hypothesised
    direction. Null hypothesis: the tested set is one more draw from the controls' distribution (a
    random set of the same size and activation mass), so its mean change is exchangeable with theirs.

    Args:
        target: [n] reward differences (after − before) of the tested set, per prefix.
        controls: [m, n] the same for ``m`` random sets, on the same prefixes with the same seeds (so the
            test statistic, a set's mean difference, is computed identically for all ``m + 1`` sets).
        hypothesis: ``"lower"``: zeroing the set lowers the reward more than a random set would;
            ``"raise"``: raises it more.

    Returns:
        ``p_rank``: the exact rank p, (1 + #{controls whose mean difference is at least as extreme as the
        target's in the hypothesised direction}) / (1 + m) — valid whatever the distribution of set
        effects (ties count against the target), at least 1/(1 + m);
        ``p``: the normal-theory version, P(T_{m−1} beyond (t − mean_c) / (sd_c·sqrt(1 + 1/m))) — the
        target as a new draw from a normal fitted to the controls (a t prediction interval); it can go
        below 1/(1 + m) when the target lies far outside the controls, but rests on normality;
        ``random_median``/``random_lo``/``random_hi``: the controls' mean differences' median, min and
        max; ``random_se``: the median over controls of their mean difference's standard error (prefix
        noise alone) and ``random_sd``: the spread of the controls' means (noise plus real differences
        between random sets) — when they are close, the controls differ mostly by prefix noise, and more
        prefixes would sharpen the test; ``beyond_all``: the target is more extreme than every control.
    """
    if hypothesis not in HYPOTHESES:
        raise ValueError(f"hypothesis must be one of {HYPOTHESES}, got {hypothesis!r}")
    target, controls = np.asarray(target, float), np.atleast_2d(np.asarray(controls, float))
    if controls.shape[1] != len(target):
        raise ValueError(f"controls cover {controls.shape[1]} prefixes, the target {len(target)}: not paired")
    m, n = controls.shape
    sign = 1.0 if hypothesis == "lower" else -1.0  # in "lower" units: smaller is more extreme
    t_mean, c_means = float(target.mean()), controls.mean(axis=1)
    t, c = sign * t_mean, sign * c_means
    out = {
        "target_diff": t_mean,
        "hypothesis": hypothesis,
        "n_random": int(m),
        "random_diffs": [float(x) for x in c_means],
        "random_diff_mean": float(c_means.mean()),
        "random_median": float(np.median(c_means)),
        "random_lo": float(c_means.min()),
        "random_hi": float(c_means.max()),
        "random_se": float(np.median(controls.std(axis=1, ddof=1) / np.sqrt(n))) if n > 1 else float("nan"),
        "random_sd": float(c_means.std(ddof=1)) if m > 1 else float("nan"),
        "p_rank": float((1 + (c <= t).sum()) / (1 + m)),
        "beyond_all": bool((t < c).all()),
        "lower_than_all": bool((t_mean < c_means).all()),
    }
    sd = float(c.std(ddof=1)) if m > 1 else 0.0
    if sd > 0:
        out["p"] = float(stats.t.cdf((t - c.mean()) / (sd * np.sqrt(1 + 1 / m)), m - 1))
    else:
        out["p"] = float("nan")
    return out


def random_sets(
    alive: Mapping[int, Sequence[int]] | Mapping[int, Mapping[int, float]],
    like: Mapping[int, Sequence[int]],
    n: int,
    seed: int,
    exclude: Mapping[int, Sequence[int]] | None = None,
) -> list[dict[int, list[int]]]:
    """``n`` random feature sets with as many features per layer as ``like``, drawn (independently of
    each other) from ``alive`` (features that fire) minus ``exclude``.

    When ``alive`` gives each layer's features with a matching value ({layer: {feature: activation
    mass}}), the draw is matched feature by feature: for each feature of ``like`` (in a random order)
    one is drawn uniformly from the ⌈candidates / MATCH_BINS⌉ candidates of its layer nearest to it in
    the value's rank (a decile-wide stratum centred on it, narrowed by nothing but the features this set
    already took), so each control set has about the same distribution of the value as ``like`` — a
    probe's top features are dense, and a random set of rare ones would be a weak control. With plain id
    lists the draw is uniform over the layer's candidates.
    """
    rng = np.random.default_rng(seed)
    plans: dict[int, tuple[list[int], np.ndarray | None, int]] = {}
    for layer, ids in like.items():
        feats = alive.get(layer, ())
        pool = sorted({int(i) for i in feats} - {int(i) for i in (exclude or {}).get(layer, ())})
        if len(pool) < len(ids):
            raise ValueError(f"layer {layer} has {len(pool)} firing features outside the set; cannot draw {len(ids)}")
        if isinstance(feats, Mapping):
            missing = [int(i) for i in ids if int(i) not in feats]
            if missing:
                raise ValueError(f"no matching value for features {missing[:5]} of layer {layer}")
            vals = np.array([float(feats[i]) for i in pool])
            order = np.argsort(vals, kind="stable")
            pool = [pool[i] for i in order]  # by value
            # each tested feature's position among the candidates by value
            where = np.searchsorted(vals[order], [float(feats[int(i)]) for i in ids])
            plans[layer] = (pool, where, max(1, int(np.ceil(len(pool) / MATCH_BINS))))
        else:
            plans[layer] = (pool, None, 0)
    out = []
    for _ in range(n):
        draw = {}
        for layer, ids in like.items():
            pool, where, w = plans[layer]
            if where is None:
                draw[layer] = sorted(int(x) for x in rng.choice(pool, size=len(ids), replace=False))
                continue
            free = np.ones(len(pool), bool)
            for j in rng.permutation(len(ids)):
                idx = np.flatnonzero(free)
                near = idx[np.argsort(np.abs(idx + 0.5 - where[j]), kind="stable")[:w]]
                pick = int(rng.choice(near))
                free[pick] = False
            draw[layer] = sorted(int(pool[i]) for i in np.flatnonzero(~free))
        out.append(draw)
    return out
