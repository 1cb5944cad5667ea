"""Attribution patching over SAE features, with integrated-gradient steps, and its check by true ablation.

For a scalar metric ``m`` of a text (a preference model's reward, or the policy's probe-predicted
reward) and the features ``a`` of one SAE layer on the masked positions (the completion tokens), the
estimated change of ``m`` when feature ``f`` is zeroed on those positions is

    est_f = −Σ_pos a_f(pos) · mean_{α} ∂m/∂a_f(pos) |_{features scaled by α}

with α at the midpoints of ``steps`` equal intervals between 1 (clean) and 0 (every feature of the
layer zeroed on the mask): integrated gradients along the straight path, which is exact for a
metric linear in the features and tracks the non-linear rest better than one gradient (AtP). The
SAE's error term is kept fixed, so only the features' contributions move. :func:`true_effects`
measures the same quantity by zeroing each feature for real.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lfp_core.ablation import _hook_point, ablated

# scorer(model, toks [batch, pos], last [batch], mask [batch, pos]) -> metric [batch]; runs under the hooks/SAEs
# active on model (mask: the positions attributed, e.g. for a metric summed over the completion)
Scorer = Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def integrated_gradients(
    model,
    sae_map: Mapping[int, object],
    layer: int,
    toks: torch.Tensor,
    last: torch.Tensor,
    mask: torch.Tensor,
    scorer: Scorer,
    steps: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Estimated metric change [batch, d_sae] when each feature of ``layer`` is zeroed where ``mask``
    [batch, pos] is 1, and the clean metric [batch]. Every SAE of ``sae_map`` is spliced in (error
    term kept); only ``layer``'s features are scaled."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = mask.to(torch.float32)[..., None]  # [batch, pos, 1]
    total: torch.Tensor | None = None
    clean_acts: torch.Tensor | None = None
    for k in range(steps):
        alpha = (k + 0.5) / steps
        held: dict = {}

        def scale(acts, hook, alpha=alpha, held=held):  # [batch, pos, d_sae]
            base = acts.detach()
            x = (base * (1 - (1 - alpha) * m)).requires_grad_(True)
            held["x"], held["clean"] = x, base
            return x

        with (
            torch.enable_grad(),
            model.saes(saes=list(sae_map.values()), use_error_term=True),
            model.hooks(fwd_hooks=[(_hook_point(sae_map[layer]), scale)]),
        ):
            metric = scorer(model, toks, last, mask)
            (grad,) = torch.autograd.grad(metric.sum(), held["x"])
        total = grad if total is None else total + grad
        clean_acts = held["clean"]
    with torch.no_grad(), ablated(model, sae_map, {}):
        clean_metric = scorer(model, toks, last, mask)
    assert total is not None and clean_acts is not None  # steps >= 1
    est = -(clean_acts * (total / steps) * m).sum(1)  # [batch, d_sae]
    return est.detach().cpu().numpy(), clean_metric.detach().cpu().numpy()


@torch.no_grad()
def true_effects(
    model,
    sae_map: Mapping[int, object],
    layer: int,
    features: Sequence[int],
    toks: torch.Tensor,
    last: torch.Tensor,
    mask: torch.Tensor,
    scorer: Scorer,
) -> np.ndarray:
    """Metric change [batch, len(features)] when each feature alone is zeroed where ``mask`` is 1
    (every SAE of ``sae_map`` spliced in with its error term)."""
    with ablated(model, sae_map, {}):
        clean = scorer(model, toks, last, mask)
    out = []
    for f in features:
        with ablated(model, sae_map, {layer: [int(f)]}, mask=mask):
            out.append((scorer(model, toks, last, mask) - clean).cpu().numpy())
    return np.stack(out, axis=1) if out else np.zeros((len(toks), 0))


def spearman(a: Sequence[float], b: Sequence[float]) -> dict:
    """Spearman ρ with its p-value (NaN when fewer than three points or a constant input)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": float("nan"), "p": float("nan"), "n": int(len(x))}
    res = spearmanr(x, y)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(len(x))}


def right_pad(seqs: list[list[int]], pad: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token tensor [batch, pos] and the last real position of each sequence (with causal
    attention the padding cannot change anything up to that position)."""
    n = max(len(x) for x in seqs)
    toks = torch.tensor([x + [pad] * (n - len(x)) for x in seqs], dtype=torch.long, device=device)
    return toks, torch.tensor([len(x) - 1 for x in seqs], device=device)


def masked_batches(seqs: list[list[int]], starts: list[int], batcher, batch_size: int = 32):
    """Yield (toks, last, mask) per batch of ``seqs``; ``mask`` [batch, pos] marks positions from
    ``starts[i]`` to the sequence's last token (e.g. a completion after its prompt)."""
    for i in range(0, len(seqs), batch_size):
        toks, last = batcher(seqs[i : i + batch_size])
        pos = torch.arange(toks.shape[1], device=toks.device)[None]
        st = torch.tensor(starts[i : i + batch_size], device=toks.device)[:, None]
        yield toks, last, (pos >= st) & (pos <= last[:, None])


def rank_and_verify(
    model,
    sae_map: Mapping[int, object],
    seqs: list[list[int]],
    starts: list[int],
    scorer: Scorer,
    batcher,
    steps: int,
    top_k: int,
    batch_size: int = 32,
) -> dict:
    """Attribute every feature of every layer of ``sae_map`` on ``seqs`` (masked from ``starts[i]``),
    rank features by mean |estimate| over texts, verify the top ``top_k`` by true ablation.

    Args:
        batcher: ``seqs -> (toks, last)`` (right padding).

    Returns:
        {"features": rows (layer, feature, estimate, estimate_abs, rank, true_effect for the verified),
         "points": (layer, feature, text_id, estimate, true_effect) of the verified features,
         "per_text": {layer: est [n_texts, d_sae]}, "clean": metric [n_texts],
         "spearman_top": over the verified features' mean estimate vs mean true effect,
         "spearman_points": over their (text, feature) points}
    """
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in sae_map}
    clean_parts = []
    batches = list(masked_batches(seqs, starts, batcher, batch_size))
    for toks, last, mask in batches:
        for layer in sae_map:
            est, clean = integrated_gradients(model, sae_map, layer, toks, last, mask, scorer, steps)
            per_layer[layer].append(est)
        clean_parts.append(clean)
    per_text = {layer: np.concatenate(v) for layer, v in per_layer.items()}
    rows: list[dict[str, Any]] = [
        {
            "layer": int(layer),
            "feature": int(f),
            "estimate": float(est[:, f].mean()),
            "estimate_abs": float(np.abs(est[:, f]).mean()),
        }
        for layer, est in per_text.items()
        for f in range(est.shape[1])
    ]
    rows.sort(key=lambda r: -r["estimate_abs"])
    for i, r in enumerate(rows):
        r["rank"] = i
    top = rows[:top_k]
    points = []
    for layer in sae_map:
        feats = [r["feature"] for r in top if r["layer"] == layer]
        if not feats:
            continue
        true = np.concatenate([true_effects(model, sae_map, layer, feats, t, la, mk, scorer) for t, la, mk in batches])
        for j, f in enumerate(feats):
            row = next(r for r in top if r["layer"] == layer and r["feature"] == f)
            row["true_effect"] = float(true[:, j].mean())
            points += [
                {
                    "layer": int(layer),
                    "feature": int(f),
                    "text_id": t,
                    "estimate": float(per_text[layer][t, f]),
                    "true_effect": float(true[t, j]),
                }
                for t in range(len(seqs))
            ]
    return {
        "features": rows,
        "points": points,
        "per_text": per_text,
        "clean": np.concatenate(clean_parts),
        "spearman_top": spearman([r["estimate"] for r in top], [r["true_effect"] for r in top]),
        "spearman_points": spearman([p["estimate"] for p in points], [p["true_effect"] for p in points]),
    }
