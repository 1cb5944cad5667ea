"""Localisation by component patching: which components carry the reward gain of a fine-tune.

For each prefix, with one sampling seed shared by every condition (coupled sampling, as in the
ablation stage), we sample

* the clean tuned policy (reward ``R_tuned``),
* the plain base model (``R_base``, :func:`lfp_core.ablation.sample`),
* the tuned policy with every component patched (each layer's attention and MLP output replaced by
  the base model's on the same tokens: a check — it differs from the base model only by what the
  fine-tune changed outside the components: embeddings, LayerNorms, unembedding), and
* the tuned policy with each single component patched (``R_c``),

and report, per component, the share of the reward gain it carries,
``frac_c = (R_tuned − R_c) / (R_tuned − R_base)`` (a ratio of means over prefixes), with a 95%
percentile bootstrap interval that resamples prefixes (the independent unit; one resample index set
for every statistic, so the sum of fractions and the total gain are computed on the same draws).
Fractions are defined only when the total gain's interval excludes 0; otherwise they are reported as
undefined with the reason, never as a number. The single-component fractions need not sum to 1:
components interact (a gain that needs two components together is lost when either is patched, and
counted twice), and the sum says how far from additive the gain is.

Written by hand: no maintained library patches one model's component outputs into another model's
forward passes while sampling (:mod:`lfp_core.lockstep` does the sampling).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from lfp_core import ablation
from lfp_core.errors import BadInputError
from lfp_core.lockstep import Edit, check_own_modules, component_hooks, patch, sample_lockstep

LEVEL = 0.95
N_BOOT = 2000
RewardFn = Callable[[list[list[int]], list[list[int]]], np.ndarray]
"""(prompt token ids without BOS, completion token ids) -> one reward per completion."""


def boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] unit indices drawn with replacement (one resample per row)."""
    if n < 2:
        raise BadInputError(f"a bootstrap over {n} unit(s) is meaningless; give at least 2 prefixes")
    return np.random.default_rng([int(seed), 19]).integers(0, n, (int(n_boot), n))


def interval(boot: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN replicates dropped)."""
    b = np.asarray(boot, float)
    b = b[np.isfinite(b)]
    if not len(b):
        return float("nan"), float("nan")
    lo, hi = np.quantile(b, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(x: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """Mean of ``x`` over units with its percentile bootstrap interval."""
    x = np.asarray(x, float)
    idx = boot_indices(len(x), n_boot, seed)
    lo, hi = interval(x[idx].mean(1), level)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": len(x)}


def gain_fractions(
    r_tuned: np.ndarray,
    r_base: np.ndarray,
    r_patched: Mapping[str, np.ndarray],
    n_boot: int = N_BOOT,
    seed: int = 0,
    r_all: np.ndarray | None = None,
    level: float = LEVEL,
) -> dict:
    """The share of the reward gain each patched component carries, with bootstrap intervals over prefixes.

    Args:
        r_tuned: [n] reward of the clean tuned policy per prefix.
        r_base: [n] reward of the base model per prefix (same seeds).
        r_patched: {component: [n]} reward of the tuned policy with that component patched.
        n_boot: bootstrap resamples of the prefixes.
        seed: the resamples' seed.
        r_all: [n] reward with every component patched (optional).
        level: the intervals' coverage.

    Returns:
        ``total_gain``: mean(R_tuned) − mean(R_base) with its interval; ``defined``: whether that interval
        excludes 0 (else ``why`` says so and every fraction is None); ``components``: per component its
        mean reward, ``drop`` = R_tuned − R_c with interval (always defined), and ``frac`` =
        drop / total gain with interval (ratio of means on each resample); ``sum_frac``: the sum of the
        single-component fractions with interval; ``all_patched`` (with ``r_all``): its fraction, and
        ``vs_base``: R_all − R_base with interval (0 when only the components changed).
    """
    t, b = np.asarray(r_tuned, float), np.asarray(r_base, float)
    pat = {k: np.asarray(v, float) for k, v in r_patched.items()}
    n = len(t)
    bad = [k for k, v in {"r_base": b, **pat, **({"r_all": r_all} if r_all is not None else {})}.items() if len(v) != n]
    if bad:
        raise BadInputError(f"rewards of {bad[:3]} do not cover the {n} prefixes of r_tuned: not paired")
    idx = boot_indices(n, n_boot, seed)
    mt, mb = t[idx].mean(1), b[idx].mean(1)
    gain, gain_b = float(t.mean() - b.mean()), mt - mb
    g_lo, g_hi = interval(gain_b, level)
    defined = bool(g_lo > 0 or g_hi < 0)
    out: dict = {
        "n": n,
        "n_boot": int(n_boot),
        "level": level,
        "method": f"percentile bootstrap over {n} prefixes ({n_boot} resamples), ratio of means",
        "r_tuned": float(t.mean()),
        "r_base": float(b.mean()),
        "total_gain": {"mean": gain, "lo": g_lo, "hi": g_hi},
        "defined": defined,
        "why": None
        if defined
        else f"the total gain {gain:+.4g} has a {level:.0%} interval [{g_lo:.4g}, {g_hi:.4g}] that includes 0: "
        "no gain to divide, so the fractions are undefined",
    }

    def frac(drop: float, drop_b: np.ndarray) -> dict:
        if not defined:
            return {"frac": None, "frac_lo": None, "frac_hi": None}
        with np.errstate(divide="ignore", invalid="ignore"):
            lo, hi = interval(drop_b / gain_b, level)
        return {"frac": drop / gain, "frac_lo": lo, "frac_hi": hi}

    comps, drops_b = {}, []
    for name, r in pat.items():
        mc = r[idx].mean(1)
        drop, drop_b = float(t.mean() - r.mean()), mt - mc
        drops_b.append(drop_b)
        d_lo, d_hi = interval(drop_b, level)
        comps[name] = {"reward": float(r.mean()), "drop": drop, "drop_lo": d_lo, "drop_hi": d_hi, **frac(drop, drop_b)}
    out["components"] = comps
    if pat:
        s = frac(sum(c["drop"] for c in comps.values()), np.sum(drops_b, axis=0))
        out["sum_frac"] = {"mean": s["frac"], "lo": s["frac_lo"], "hi": s["frac_hi"]}
    if r_all is not None:
        a = np.asarray(r_all, float)
        ma = a[idx].mean(1)
        v_lo, v_hi = interval(ma - mb, level)
        out["all_patched"] = {
            "reward": float(a.mean()),
            **frac(float(t.mean() - a.mean()), mt - ma),
            "vs_base": {"mean": float(a.mean() - b.mean()), "lo": v_lo, "hi": v_hi},
        }
    return out


def by_length(rows: Sequence[Sequence[int]], size: int):
    """Indices of ``rows`` grouped by length (shortest first), in chunks of at most ``size``: the batches in
    which equal-length prompts are sampled together."""
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), size):
            yield idx[s : s + size]


def _chunks(rows: list[tuple[int, str]], prompts_ids: Sequence[Sequence[int]], size: int):
    """Rows (prefix, condition) grouped by prompt length, in chunks of at most ``size``."""
    for idx in by_length([prompts_ids[i] for i, _ in rows], size):
        yield [rows[j] for j in idx]


@torch.no_grad()
def component_patching(
    base,
    tuned,
    prompts_ids: Sequence[Sequence[int]],
    bos: int | None,
    max_new_tokens: int | Sequence[int],
    seeds: Sequence[int],
    reward_fn: RewardFn,
    components: Sequence[str] | None = None,
    batch_rows: int = 128,
    n_boot: int = N_BOOT,
    boot_seed: int = 0,
) -> dict:
    """Sample the tuned policy with each component patched by the base model's output, and measure the
    share of the reward gain each component carries (see the module docstring).

    Args:
        base: the base HookedTransformer.
        tuned: the tuned HookedTransformer (a separate object of the same shape).
        prompts_ids: the prefixes' token ids, without BOS (any lengths; sampled in equal-length batches).
        bos: the BOS token prepended to every prefix (None: none).
        max_new_tokens: tokens per completion, one number or one per prefix.
        seeds: one sampling seed per prefix, shared by every condition (rows are coupled across conditions
            and independent of their batch).
        reward_fn: (prefixes' ids, completions' ids) -> rewards.
        components: hook names to patch one at a time (default: every layer's attention and MLP output).
        batch_rows: rows per sampling batch.
        n_boot: bootstrap resamples of the prefixes.
        boot_seed: their seed.

    Returns:
        :func:`gain_fractions`' dict, plus ``rewards`` {condition: [n] list} for ``tuned``, ``base``,
        ``all`` and each component, and ``completions`` {condition: completions}.
    """
    n = len(prompts_ids)
    if len(seeds) != n:
        raise BadInputError(f"{len(seeds)} seeds for {n} prefixes; give one per prefix")
    lengths = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    if len(lengths) != n:
        raise BadInputError(f"{len(lengths)} completion lengths for {n} prefixes")
    comps = list(components) if components is not None else component_hooks(tuned)
    if not comps:
        raise BadInputError("no components to patch")
    check_own_modules(base, "the base model")
    head = [int(bos)] if bos is not None else []
    edits: dict[str, Edit | None] = {"tuned": None, "all": patch(comps), **{c: patch([c]) for c in comps}}
    done: dict[str, list[list[int]]] = {k: [[] for _ in range(n)] for k in ["base", *edits]}
    rows = [(i, k) for i in range(n) for k in edits]
    device = tuned.cfg.device
    for chunk in _chunks(rows, prompts_ids, batch_rows):
        toks = torch.tensor([head + list(prompts_ids[i]) for i, _ in chunk], dtype=torch.long, device=device)
        n_new = max(lengths[i] for i, _ in chunk)
        new = sample_lockstep(base, tuned, toks, n_new, [seeds[i] for i, _ in chunk], [edits[k] for _, k in chunk])
        for (i, k), o in zip(chunk, new):
            done[k][i] = o[: lengths[i]]
    for chunk in _chunks([(i, "base") for i in range(n)], prompts_ids, batch_rows):
        toks = torch.tensor([head + list(prompts_ids[i]) for i, _ in chunk], dtype=torch.long, device=device)
        new = ablation.sample(base, toks, max(lengths[i] for i, _ in chunk), [int(seeds[i]) for i, _ in chunk])
        for (i, _), o in zip(chunk, new):
            done["base"][i] = o[: lengths[i]]
    prompts_list = [list(p) for p in prompts_ids]
    rewards = {k: np.asarray(reward_fn(prompts_list, v), float) for k, v in done.items()}
    out = gain_fractions(
        rewards["tuned"], rewards["base"], {c: rewards[c] for c in comps}, n_boot, boot_seed, r_all=rewards["all"]
    )
    out["rewards"] = {k: [float(x) for x in v] for k, v in rewards.items()}
    out["completions"] = done
    return out
