"""Feature ablation: zero a set of SAE features at one or several layers while keeping each SAE's
error term, so the model's computation changes by exactly those features' decoder contributions and
nothing else (an empty set reproduces the clean model's logits).

This module holds the core operation; the ablation stage, random controls and the live engine build
on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def _hook_point(sae) -> str:
    return f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"


def check_features(saes: Mapping[int, object], features: Mapping[int, Sequence[int]]) -> None:
    """Every layer has an SAE and every feature id is inside its dictionary; else a clear ValueError."""
    for layer, ids in features.items():
        if layer not in saes:
            raise ValueError(f"no SAE for layer {layer}; layers with SAEs: {sorted(saes)}")
        d = int(saes[layer].cfg.d_sae)
        bad = [int(i) for i in ids if not 0 <= int(i) < d]
        if bad:
            raise ValueError(f"feature ids {bad[:5]} are out of range for layer {layer} (0–{d - 1})")


@torch.no_grad()
def run_with_ablation(model, saes: Mapping[int, object], features: Mapping[int, Sequence[int]],
                      tokens: torch.Tensor, names: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
    """Logits of ``model`` (a HookedSAETransformer) on ``tokens`` [batch, pos] with every SAE of ``saes``
    spliced in (error term kept) and the ``features`` {layer: ids} zeroed; plus the activations at
    ``names`` (e.g. ``blocks.2.hook_mlp_out.hook_sae_output``)."""
    check_features(saes, features)

    def zero(ids):
        idx = torch.as_tensor(sorted({int(i) for i in ids}), dtype=torch.long)

        def hook(acts, hook):  # [batch, pos, d_sae]
            acts[..., idx] = 0.0
            return acts
        return hook

    hooks = [(_hook_point(saes[layer]), zero(ids)) for layer, ids in features.items() if len(ids)]
    cache: dict = {}
    keep = [(n, (lambda a, hook, _n=n: cache.__setitem__(_n, a.detach().clone()))) for n in names]
    with model.saes(saes=list(saes.values()), use_error_term=True):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks + keep)
    return logits, cache
