"""The activation-difference lens (Minder, Dumas et al. 2025, "Narrow finetuning leaves clearly
readable traces in activation differences", arXiv 2510.13900): the mean tuned − base activation on
the first few tokens of plain held-out text, read through the unembedding and tested by steering.

* :func:`mean_difference`: both models on the same tokens (BOS + the first ``k`` tokens of each
  document); the difference at ``blocks.L.<hook>`` averaged over the positions after BOS (pooled over
  those ``k`` positions and every document; the paper also reads each position separately).
* :func:`lens_tokens`: the vector read through the final LayerNorm's elementwise weight and the
  unembedding: ``logits = (c(v) ⊙ w_ln) @ W_U`` with ``c`` the centring of a LayerNorm (v − mean(v);
  none for RMSNorm). The norm's division by the residual's scale is a positive scalar, so it cannot
  change the ranking and is left out; the norm's bias and the unembedding's bias are constants that
  do not depend on ``v`` and are left out too (they would add the same offset to any vector's
  reading). With ``LNPre``/``RMSPre`` (weights folded into ``W_U``) only the centring applies.
* :func:`steering_effect`: the base model sampled with ``alpha · v`` added to
  ``blocks.L.hook_resid_post`` at every position, paired with the unsteered base on the same prompts
  and seeds: the mean reward change with a 95% bootstrap interval over prompts, and its exact rank p
  against ``n_random`` random directions of the same norm, each sampled with the same prompts and seeds
  (one-sided, "the vector raises the reward more than a random direction of its norm"):
  (1 + #{random ≥ it}) / (1 + N), by :func:`lfp_core.ablation.compare_with_controls`.

Written by hand: the authors' code (the diffing-toolkit) runs on nnsight with its own pipeline; no
maintained pip library provides the lens for transformer-lens models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lfp_core import ablation
from lfp_core.errors import BadInputError
from lfp_core.localise import N_BOOT, RewardFn, by_length, mean_ci
from lfp_core.lockstep import check_own_modules, sample_steered

MIN_RANDOM = 19
"""Random directions per steering test: the rank p can then reach 1/20 = 0.05."""


@torch.no_grad()
def mean_difference(
    base,
    tuned,
    docs: Sequence[Sequence[int]],
    bos: int | None,
    k_first_tokens: int,
    layers: Sequence[int],
    hook: str = "hook_resid_post",
    batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """Mean of tuned − base activations at ``blocks.L.<hook>`` over the first ``k_first_tokens`` tokens
    after BOS of each document (both models on the same tokens).

    Args:
        base: the base HookedTransformer.
        tuned: the tuned HookedTransformer (same shape).
        docs: held-out documents' token ids, without BOS; each contributes its first ``k`` tokens (fewer
            when shorter; empty ones are skipped).
        bos: the BOS token prepended (its position is not averaged); None: no BOS, all positions count.
        k_first_tokens: positions per document.
        layers: the layers to read.
        hook: the block hook (``hook_resid_post``, ``hook_mlp_out``, ...).
        batch_size: documents per forward pass.

    Returns:
        {layer: [d_model] float64 mean difference}.
    """
    if base.cfg.d_model != tuned.cfg.d_model:
        raise BadInputError(f"base d_model {base.cfg.d_model} differs from tuned d_model {tuned.cfg.d_model}")
    if k_first_tokens < 1:
        raise BadInputError(f"k_first_tokens must be at least 1, got {k_first_tokens}")
    bad = [la for la in layers if not 0 <= int(la) < min(base.cfg.n_layers, tuned.cfg.n_layers)]
    if bad or not layers:
        raise BadInputError(f"layers {bad or list(layers)} are not layers of both models (0–{base.cfg.n_layers - 1})")
    names = [f"blocks.{int(la)}.{hook}" for la in layers]
    missing = [n for n in names if n not in base.hook_dict or n not in tuned.hook_dict]
    if missing:
        raise BadInputError(f"hook {missing[0]!r} is not a hook of both models")
    check_own_modules(base, "the base model")
    check_own_modules(tuned, "the tuned model")
    head = [int(bos)] if bos is not None else []
    rows = [head + [int(t) for t in d[:k_first_tokens]] for d in docs if len(d)]
    if not rows:
        raise BadInputError("no non-empty document to take the first tokens of")
    stop = max(int(la) for la in layers) + 1
    sums = {int(la): torch.zeros(base.cfg.d_model, dtype=torch.float64) for la in layers}
    count = 0
    for idx in by_length(rows, batch_size):
        toks = torch.tensor([rows[i] for i in idx], dtype=torch.long, device=tuned.cfg.device)
        _, cb = base.run_with_cache(toks, names_filter=names, stop_at_layer=stop)
        _, ct = tuned.run_with_cache(toks, names_filter=names, stop_at_layer=stop)
        for la, name in zip(layers, names):
            d = ct[name][:, len(head) :] - cb[name][:, len(head) :]  # [batch, k, d_model]
            sums[int(la)] += d.double().sum((0, 1)).cpu()
        count += toks.shape[0] * (toks.shape[1] - len(head))
    return {la: (s / count).numpy() for la, s in sums.items()}


@torch.no_grad()
def lens_logits(model, vector) -> torch.Tensor:
    """[d_vocab] the vector's reading: ``(c(v) ⊙ w_ln) @ W_U`` (see the module docstring for what is applied)."""
    v = torch.as_tensor(np.asarray(vector), dtype=torch.float32, device=model.W_U.device).reshape(-1)
    if v.shape[0] != model.cfg.d_model:
        raise BadInputError(f"a vector of width {v.shape[0]} for a model of d_model {model.cfg.d_model}")
    norm = model.cfg.normalization_type
    if norm in ("LN", "LNPre"):
        v = v - v.mean()
    w = getattr(model.ln_final, "w", None) if norm is not None else None
    if w is not None:
        v = v * w
    return v @ model.W_U


def lens_tokens(model, vector, top: int = 20) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The ``top`` tokens the vector promotes most (highest lens logit first) and suppresses most
    (lowest first), as (token id, lens logit)."""
    logits = lens_logits(model, vector)
    k = min(int(top), logits.shape[0])
    hi = torch.topk(logits, k)
    lo = torch.topk(-logits, k)
    return (
        [(int(i), float(x)) for i, x in zip(hi.indices, hi.values)],
        [(int(i), float(-x)) for i, x in zip(lo.indices, lo.values)],
    )


def random_directions(vector, n: int, seed: int) -> np.ndarray:
    """[n, d] isotropic Gaussian directions scaled to ``vector``'s norm."""
    v = np.asarray(vector, float).reshape(-1)
    g = np.random.default_rng([int(seed), 23]).standard_normal((int(n), v.shape[0]))
    return g / np.linalg.norm(g, axis=1, keepdims=True) * np.linalg.norm(v)


@torch.no_grad()
def steering_effect(
    base,
    vector,
    layer: int,
    prompts: Sequence[Sequence[int]],
    bos: int | None,
    max_new_tokens: int,
    seeds: Sequence[int],
    reward_fn: RewardFn,
    n_random: int = MIN_RANDOM,
    alpha: float = 1.0,
    seed: int = 0,
    batch_rows: int = 128,
    n_boot: int = N_BOOT,
) -> dict:
    """The reward change from adding ``alpha · vector`` to the base model's ``blocks.<layer>.hook_resid_post``
    at every position while sampling, against random directions of the same norm.

    Args:
        base: the model to steer (a HookedTransformer).
        vector: [d_model] (e.g. :func:`mean_difference`'s at ``layer``).
        layer: the block whose ``hook_resid_post`` is steered.
        prompts: prompt token ids without BOS (any lengths; sampled in equal-length batches).
        bos: BOS token prepended (None: none).
        max_new_tokens: tokens per completion.
        seeds: one sampling seed per prompt, shared by every condition (paired comparisons).
        reward_fn: (prompts' ids, completions' ids) -> rewards.
        n_random: random directions (at least :data:`MIN_RANDOM`).
        alpha: the vector's scale (the random directions get the scaled vector's norm).
        seed: seed of the random directions and of the bootstrap.
        batch_rows: rows per sampling batch.
        n_boot: bootstrap resamples of the prompts.

    Returns:
        ``steered``/``unsteered``: mean rewards; ``change``: mean paired change with ``lo``/``hi`` (bootstrap
        over prompts); ``p_rank`` and the controls' summary (:func:`ablation.compare_with_controls`,
        hypothesis "raise"); ``rewards`` {"unsteered", "steered", "random": [N][n]}; ``norm``: the
        steering vector's norm.
    """
    n = len(prompts)
    if len(seeds) != n:
        raise BadInputError(f"{len(seeds)} seeds for {n} prompts; give one per prompt")
    if int(n_random) < MIN_RANDOM:
        raise BadInputError(f"n_random={n_random}: the rank p needs at least {MIN_RANDOM} random directions")
    if not 0 <= int(layer) < base.cfg.n_layers:
        raise BadInputError(f"layer {layer} is not a layer of the model (0–{base.cfg.n_layers - 1})")
    v = float(alpha) * np.asarray(vector, float).reshape(-1)
    if v.shape[0] != base.cfg.d_model:
        raise BadInputError(f"a vector of width {v.shape[0]} for a model of d_model {base.cfg.d_model}")
    dirs = [None, v, *random_directions(v, n_random, seed)]  # condition 0 unsteered, 1 the vector
    hook = f"blocks.{int(layer)}.hook_resid_post"
    head = [int(bos)] if bos is not None else []
    rows = [(i, c) for i in range(n) for c in range(len(dirs))]
    outs: dict[tuple[int, int], list[int]] = {}
    for idx in by_length([prompts[i] for i, _ in rows], batch_rows):
        chunk = [rows[j] for j in idx]
        toks = torch.tensor([head + list(prompts[i]) for i, _ in chunk], dtype=torch.long, device=base.cfg.device)
        vecs = [None if dirs[c] is None else torch.as_tensor(dirs[c], dtype=torch.float32) for _, c in chunk]
        new = sample_steered(base, toks, max_new_tokens, [int(seeds[i]) for i, _ in chunk], hook, vecs)
        outs.update(zip(chunk, new))
    plist = [list(p) for p in prompts]
    r = np.stack([np.asarray(reward_fn(plist, [outs[(i, c)] for i in range(n)]), float) for c in range(len(dirs))])
    change = r[1] - r[0]
    ci = mean_ci(change, n_boot, seed)
    test = ablation.compare_with_controls(change, r[2:] - r[0], hypothesis="raise")
    return {
        "layer": int(layer),
        "alpha": float(alpha),
        "norm": float(np.linalg.norm(v)),
        "n": n,
        "unsteered": float(r[0].mean()),
        "steered": float(r[1].mean()),
        "change": {"mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"]},
        "p_rank": test["p_rank"],
        "n_random": test["n_random"],
        "random_changes": test["random_diffs"],
        "random_median": test["random_median"],
        "beyond_all": test["beyond_all"],
        "method": f"paired change over {n} prompts (bootstrap, {n_boot} resamples); rank p against {n_random} "
        "random directions of the same norm, one-sided (raises the reward)",
        "rewards": {"unsteered": r[0].tolist(), "steered": r[1].tolist(), "random": r[2:].tolist()},
    }
