"""Single-feature attribution over SAE features, and its check by true ablation.

**Target.** For a scalar metric ``m`` of a text (a preference model's reward, or a behaviour of the policy)
and one feature ``f`` of one SAE layer, the quantity estimated is the *single-feature effect*

    Δ_f = m(a_f zeroed on the masked positions) − m(clean)

with every other feature of every layer, and the SAE's error term, at their clean values. The mask marks the
positions attributed (the completion tokens). :func:`true_effects` measures Δ_f by doing it.

**Estimators** (both target Δ_f):

- *AtP* (attribution patching: Nanda 2023; Syed et al. 2023, "Attribution patching outperforms automated
  circuit discovery"; Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM
  behaviour to components"): the first-order estimate at the clean point,
  ``atp_f = −Σ_pos a_f(pos) · ∂m/∂a_f(pos)``. One forward and one backward pass per batch of texts give every
  feature of a layer. Exact when ``m`` is linear in ``a_f``. Kramár et al. find two failure modes that make it
  miss important components (false negatives: saturated non-linearities, and direct and indirect effects that
  cancel) and bound the misses by checking a random subsample; likewise it is verified here on a uniform random
  sample of features as well as on its own top-k, which cannot show a feature the estimate missed.
- *Path* (integrated gradients, Sundararajan et al. 2017, "Axiomatic attribution for deep networks", on the
  path that moves only ``a_f``, from its clean value to 0 on the masked positions, everything else clean):
  ``Δ_f = −∫₀¹ Σ_pos a_f(pos) · ∂m/∂a_f(pos)|_{a_f ← α a_f} dα`` holds exactly along that path (fundamental
  theorem of calculus), approximated by the midpoint rule with ``steps`` points. It is exact for a metric
  quadratic in ``a_f`` at any ``steps`` and converges to Δ_f as ``steps`` grows (AtP is the one-point rule at
  the path's clean end). Each feature needs its own passes — ``steps`` forward and backward passes per
  (text, feature), batched by repeating the text across the batch dimension — which costs more than ablating
  the feature (one forward pass), so it is computed only on the verified features: it says how much of AtP's
  error is curvature along the feature's own axis, not a shortcut to the truth.

Not used: integrated gradients along the path that scales *every* feature of the layer together (the
"IG" of Marks et al. 2024, "Sparse feature circuits", used here before). By completeness that splits the
effect of zeroing the whole layer among the features, a different quantity from Δ_f whenever features
interact (for ``m = (Σ_f w_f a_f)²`` it is half of AtP's first-order term; tests/test_attribution.py).

**Gradients through other SAEs.** Only the attributed layer's SAE is spliced in (error term kept). With the
error term a spliced SAE computes its input exactly (``decode(encode(x)) + (x − decode(encode(x)))``), so
leaving the other layers' SAEs out changes no forward value — but sae-lens computes the error term under
``torch.no_grad``, so with another SAE spliced downstream, backpropagation would follow that SAE's
reconstruction Jacobian instead of the identity the forward pass implements.

**Verification** (:func:`rank_and_verify`): every feature of every layer is ranked by mean |AtP| over the
texts; the top ``top_k`` and a seeded uniform sample of ``random_k`` features per layer are ablated for real
and path-estimated, and :func:`agreement` compares each estimator with the truth on each sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lfp_core.ablation import _hook_point
from lfp_core.errors import BadInputError

# scorer(model, toks [batch, pos], last [batch], mask [batch, pos]) -> metric [batch]; runs under the hooks/SAEs
# active on model (mask: the positions attributed, e.g. for a metric summed over the completion). Each row's
# metric must depend on that row only (rows of one batch are independent texts or copies of one text).
Scorer = Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

REL_FLOOR = 0.01  # a true effect below this share of the sample's largest |true effect| counts as negligible


def check_layer(sae_map: Mapping[int, object], layer: int) -> object:
    """The SAE of ``layer``; a :class:`BadInputError` naming the layers that have one when it has none."""
    if layer not in sae_map:
        raise BadInputError(
            f"no SAE for layer {layer} to attribute over; layers with an SAE: {', '.join(map(str, sorted(sae_map)))}"
        )
    return sae_map[layer]


def _run(model, sae, hook, scorer: Scorer, toks, last, mask) -> torch.Tensor:
    """``scorer`` with only ``sae`` spliced in (error term kept) and ``hook`` on its feature activations."""
    with model.saes(saes=[sae], use_error_term=True), model.hooks(fwd_hooks=[(_hook_point(sae), hook)]):
        return scorer(model, toks, last, mask)


def clean_gradients(
    model, sae_map: Mapping[int, object], layer: int, toks, last, mask, scorer: Scorer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean feature activations and ∂m/∂a at the clean point, both [batch, pos, d_sae], and the metric
    [batch], with only ``layer``'s SAE spliced (see the module docstring: gradients pass through every
    other layer as through the clean model)."""
    sae = check_layer(sae_map, layer)
    held: dict = {}

    def leaf(acts, hook):  # [batch, pos, d_sae]
        held["x"] = acts.detach().requires_grad_(True)
        return held["x"]

    with torch.enable_grad():
        metric = _run(model, sae, leaf, scorer, toks, last, mask)
        (grad,) = torch.autograd.grad(metric.sum(), held["x"])
    return held["x"].detach(), grad, metric.detach()


def atp(
    model, sae_map: Mapping[int, object], layer: int, toks, last, mask, scorer: Scorer
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AtP estimate of Δ_f [batch, d_sae] for every feature of ``layer`` zeroed where ``mask`` [batch, pos]
    is 1, the clean metric [batch], and whether each feature fires on the masked positions [batch, d_sae]
    (where it does not, Δ_f and both estimates are exactly 0)."""
    acts, grad, metric = clean_gradients(model, sae_map, layer, toks, last, mask, scorer)
    m = mask.to(acts.dtype)[..., None]  # [batch, pos, 1]
    est = -(acts * grad * m).sum(1)  # [batch, d_sae]
    active = ((acts * m) != 0).any(1)
    return est.cpu().numpy(), metric.cpu().numpy(), active.cpu().numpy()


def _axis_hook(feats: torch.Tensor, mask: torch.Tensor, alpha: float, held: dict | None):
    """Scale feature ``feats[r]`` of row ``r`` by ``alpha`` where ``mask[r]`` is 1, nothing else; with
    ``held``, the scaled column [rows, pos] becomes a leaf whose gradient is ∂m/∂a_f at that point."""
    rows = torch.arange(len(feats), device=feats.device)

    def hook(acts, hook):  # [rows, pos, d_sae]
        col = acts[rows, :, feats].detach()  # [rows, pos]
        x = col * (1 - (1 - alpha) * mask.to(col.dtype))
        if held is not None:
            x.requires_grad_(True)
            held["x"], held["a"] = x, col
        pos = torch.arange(acts.shape[1], device=acts.device)
        return acts.index_put((rows[:, None], pos[None, :], feats[:, None]), x)

    return hook


def _pairs(active: np.ndarray, features: Sequence[int]) -> list[tuple[int, int]]:
    """(row, column in ``features``) of every text on which the feature fires."""
    return [(int(i), j) for j, f in enumerate(features) for i in np.nonzero(active[:, int(f)])[0]]


def _active(model, sae, scorer: Scorer, toks, last, mask) -> np.ndarray:
    """[batch, d_sae]: whether each feature fires on the masked positions (a clean pass)."""
    held: dict = {}

    def keep(acts, hook):
        held["a"] = acts
        return acts

    with torch.no_grad():
        _run(model, sae, keep, scorer, toks, last, mask)
    return ((held["a"] * mask.to(held["a"].dtype)[..., None]) != 0).any(1).cpu().numpy()


def single_feature(
    model,
    sae_map: Mapping[int, object],
    layer: int,
    features: Sequence[int],
    toks,
    last,
    mask,
    scorer: Scorer,
    steps: int = 0,
    active: np.ndarray | None = None,
    rows: int = 32,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per (text, feature) of ``features``: the true effect Δ_f (one forward pass) and, with ``steps`` > 0,
    the path estimate (``steps`` forward + backward passes), each [batch, len(features)]. Only the
    (text, feature) pairs where the feature fires are computed (elsewhere both are exactly 0), ``rows`` of
    them per pass, the text repeated across the batch dimension with one feature moved per row.

    Args:
        active: [batch, d_sae] whether each feature fires on the masked positions (from :func:`atp`);
            computed when None.
    """
    sae = check_layer(sae_map, layer)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if active is None:
        active = _active(model, sae, scorer, toks, last, mask)
    b, n = toks.shape[0], len(features)
    true, path = np.zeros((b, n)), np.zeros((b, n)) if steps else None
    pairs = _pairs(active, features)
    if not pairs:
        return true, path
    with torch.no_grad():
        clean = _run(model, sae, lambda a, hook: a, scorer, toks, last, mask)
    for c in range(0, len(pairs), rows):
        chunk = pairs[c : c + rows]
        ti = torch.tensor([i for i, _ in chunk], device=toks.device)
        ji = np.array([j for _, j in chunk])
        fi = torch.tensor([int(features[j]) for j in ji], device=toks.device)
        t, la, mk = toks[ti], last[ti], mask[ti]
        with torch.no_grad():
            ablated = _run(model, sae, _axis_hook(fi, mk, 0.0, None), scorer, t, la, mk)
        true[ti.cpu().numpy(), ji] = (ablated - clean[ti]).cpu().numpy()
        if steps:
            total, col = None, None
            for k in range(steps):
                held: dict = {}
                with torch.enable_grad():
                    metric = _run(model, sae, _axis_hook(fi, mk, (k + 0.5) / steps, held), scorer, t, la, mk)
                    (g,) = torch.autograd.grad(metric.sum(), held["x"])  # [rows, pos]
                total, col = (g if total is None else total + g), held["a"]
            assert total is not None and col is not None and path is not None
            path[ti.cpu().numpy(), ji] = (-(col * (total / steps) * mk.to(col.dtype)).sum(-1)).cpu().numpy()
    return true, path


def true_effects(
    model, sae_map: Mapping[int, object], layer: int, features: Sequence[int], toks, last, mask, scorer: Scorer
) -> np.ndarray:
    """Metric change Δ_f [batch, len(features)] when each feature alone is zeroed where ``mask`` is 1 (the
    error term kept, so nothing else changes)."""
    return single_feature(model, sae_map, layer, features, toks, last, mask, scorer)[0]


def path_estimates(
    model, sae_map: Mapping[int, object], layer: int, features: Sequence[int], toks, last, mask, scorer, steps: int
) -> np.ndarray:
    """The path estimate of Δ_f [batch, len(features)] (integrated gradients along the feature's own axis,
    ``steps`` midpoints)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    path = single_feature(model, sae_map, layer, features, toks, last, mask, scorer, steps)[1]
    assert path is not None
    return path


def expected_valence(valence: torch.Tensor) -> Scorer:
    """A behaviour of a language model as a differentiable metric: at every masked position the expected
    valence of its next token, ``Σ_v softmax(logits)[v] · valence[v]``, summed over the positions
    (``valence`` [d_vocab], e.g. :func:`lfp_core.reward.token_valence_table`)."""

    def scorer(model, toks, last, mask):
        probs = torch.softmax(model(toks).float(), -1)  # [batch, pos, d_vocab]
        return ((probs @ valence.to(probs)) * mask.to(probs.dtype)).sum(-1)

    return scorer


# --- statistics ------------------------------------------------------------------------------------
def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict:
    """Spearman ρ with its p-value (NaN when fewer than three points or a constant input)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": float("nan"), "p": float("nan"), "n": int(len(x))}
    res = spearmanr(x, y)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(len(x))}


def agreement(est: Sequence[float], true: Sequence[float], k: int | None = None, floor: float = REL_FLOOR) -> dict:
    """How well estimates match true effects over a set of features (means over texts).

    Returns:
        {"rho", "p", "n": Spearman of est vs true over all; "sign_agree": share of the non-negligible
        features (|true| >= ``floor`` × the largest |true|; "n_rel" of them, threshold "rel_floor") whose
        estimate has the true sign; "median_rel_err": median |est − true| / |true| over them;
        "rho_sign_only": Spearman of sign(true) vs true, what an estimator that knew only the signs would
        score; with ``k``: "recall" (share of the true top-``k`` by |true| among the estimator's top-``k`` by
        |est|), "k" and "recall_chance" (k / n, a random order's expectation)}.
    """
    e, t = np.asarray(est, float), np.asarray(true, float)
    out: dict[str, Any] = spearman(e, t)
    thr = floor * float(np.abs(t).max()) if len(t) else 0.0
    big = np.abs(t) >= thr if thr > 0 else np.zeros(len(t), bool)
    out.update(
        rel_floor=thr,
        n_rel=int(big.sum()),
        sign_agree=float((np.sign(e[big]) == np.sign(t[big])).mean()) if big.any() else float("nan"),
        median_rel_err=float(np.median(np.abs(e[big] - t[big]) / np.abs(t[big]))) if big.any() else float("nan"),
        rho_sign_only=spearman(np.sign(t), t)["rho"],
    )
    if k is not None and len(t):
        k = max(1, min(k, len(t)))
        hit = set(np.argsort(-np.abs(t), kind="stable")[:k]) & set(np.argsort(-np.abs(e), kind="stable")[:k])
        out.update(recall=len(hit) / k, k=k, recall_chance=k / len(t))
    return out


# --- batching --------------------------------------------------------------------------------------
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


def random_features(d_sae: int, k: int, seed: int, layer: int) -> list[int]:
    """A uniform sample of ``k`` feature ids of a layer (all of them when ``k`` >= ``d_sae``), seeded."""
    rng = np.random.default_rng([int(seed), int(layer), 61])
    return sorted(int(x) for x in rng.choice(d_sae, size=min(k, d_sae), replace=False))


def rank_and_verify(
    model,
    sae_map: Mapping[int, object],
    seqs: list[list[int]],
    starts: list[int],
    scorer: Scorer,
    batcher,
    steps: int,
    top_k: int,
    random_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """AtP of every feature of every layer of ``sae_map`` on ``seqs`` (masked from ``starts[i]``), ranked by
    mean |AtP| over texts; the top ``top_k`` and ``random_k`` uniformly drawn features per layer verified
    by true ablation and path-estimated (``steps`` midpoints).

    Args:
        batcher: ``seqs -> (toks, last)`` (right padding).

    Returns:
        {"features": a row per (layer, feature): estimate (= estimate_atp, mean AtP over texts),
         estimate_abs (mean |AtP|), rank, n_active (texts it fires on), and for the verified ones
         estimate_path, true_effect (means) and verified ("top", "random" or "both"),
         "points": (layer, feature, text_id, estimate, estimate_path, true_effect) of the verified features on
         the texts they fire on, "per_text": {layer: AtP [n_texts, d_sae]}, "clean": metric [n_texts],
         "checks": {"top"|"random": {"atp"|"path": :func:`agreement`}} (the random sample over its features
         that fire on some text; recall only there, where the truth is known for every feature, of the true
         top k = min(top_k, a fifth of those features)),
         "n_random", "n_random_active", "seconds": {"atp", "verify"}}
    """
    t0 = time.perf_counter()
    for layer in sae_map:
        check_layer(sae_map, layer)
    batches = list(masked_batches(seqs, starts, batcher, batch_size))
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in sae_map}
    act_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in sae_map}
    clean_parts = []
    for toks, last, mask in batches:
        for layer in sae_map:
            est, clean, active = atp(model, sae_map, layer, toks, last, mask, scorer)
            per_layer[layer].append(est)
            act_layer[layer].append(active)
        clean_parts.append(clean)
    per_text = {layer: np.concatenate(v) for layer, v in per_layer.items()}
    active_all = {layer: np.concatenate(v) for layer, v in act_layer.items()}
    t_atp = time.perf_counter() - t0
    rows: list[dict[str, Any]] = [
        {
            "layer": int(layer),
            "feature": int(f),
            "estimate": float(est[:, f].mean()),
            "estimate_atp": float(est[:, f].mean()),
            "estimate_abs": float(np.abs(est[:, f]).mean()),
            "n_active": int(active_all[layer][:, f].sum()),
            "estimate_path": None,
            "true_effect": None,
            "verified": None,
        }
        for layer, est in per_text.items()
        for f in range(est.shape[1])
    ]
    rows.sort(key=lambda r: (-r["estimate_abs"], r["layer"], r["feature"]))
    for i, r in enumerate(rows):
        r["rank"] = i
    by_key = {(r["layer"], r["feature"]): r for r in rows}
    top = {(r["layer"], r["feature"]) for r in rows[:top_k]}
    rand = {
        (int(layer), f)
        for layer, sae in sae_map.items()
        for f in random_features(int(sae.cfg.d_sae), random_k, seed, layer)  # type: ignore[attr-defined]
    }
    for key in top | rand:
        by_key[key]["verified"] = "both" if key in top and key in rand else "top" if key in top else "random"
    points: list[dict[str, Any]] = []
    for layer in sae_map:
        feats = sorted(f for la, f in top | rand if la == layer)
        if not feats:
            continue
        parts, off = [], 0
        for toks, last, mask in batches:
            act = active_all[layer][off : off + len(toks)]
            parts.append(single_feature(model, sae_map, layer, feats, toks, last, mask, scorer, steps, act))
            off += len(toks)
        true = np.concatenate([p[0] for p in parts])
        path = np.concatenate([p[1] for p in parts]) if steps else np.full_like(true, np.nan)
        for j, f in enumerate(feats):
            r = by_key[(int(layer), f)]
            r["true_effect"], r["estimate_path"] = float(true[:, j].mean()), float(path[:, j].mean())
            points += [
                {
                    "layer": int(layer),
                    "feature": int(f),
                    "text_id": int(t),
                    "estimate": float(per_text[layer][t, f]),
                    "estimate_path": float(path[t, j]),
                    "true_effect": float(true[t, j]),
                }
                for t in np.nonzero(active_all[layer][:, f])[0]
            ]
    checks: dict[str, dict[str, dict]] = {}
    rand_rows = [by_key[k] for k in sorted(rand) if by_key[k]["n_active"] > 0]
    for name, sel, k in (
        ("top", [by_key[k] for k in sorted(top)], None),
        ("random", rand_rows, max(1, min(top_k, len(rand_rows) // 5))),
    ):
        if sel:
            t = [r["true_effect"] for r in sel]
            checks[name] = {
                "atp": agreement([r["estimate_atp"] for r in sel], t, k),
                **({"path": agreement([r["estimate_path"] for r in sel], t, k)} if steps else {}),
            }
    tops = [by_key[k] for k in sorted(top)]
    return {
        "features": rows,
        "points": points,
        "per_text": per_text,
        "clean": np.concatenate(clean_parts),
        "checks": checks,
        "n_random": len(rand),
        "n_random_active": len(rand_rows),
        "spearman_top": spearman([r["estimate_atp"] for r in tops], [r["true_effect"] for r in tops]),
        "spearman_points": spearman([p["estimate"] for p in points], [p["true_effect"] for p in points]),
        "seconds": {"atp": t_atp, "verify": time.perf_counter() - t0 - t_atp},
    }
