"""Per-layer base-vs-tuned divergence and the choice of layers for the SAE stage.

Two measures per layer:

* **parameter divergence** (the paper's): Σ over the layer's weight tensors of ‖θ_base − θ_tuned‖_F,
  in float32;
* **activation divergence** of the MLP output (``blocks.L.hook_mlp_out``) on the same held-out
  token sequences: mean over tokens of 1 − cos(a_base, a_tuned) and the relative L2
  ‖a_tuned − a_base‖ / ‖a_base‖ (BOS positions excluded).

Layers are chosen by the activation measure by default. The paper's parameter divergence is
dominated by the optimiser rather than by what RL changed: Adam moves every parameter by about
the learning rate per step, so Σ‖Δθ‖_F grows like lr·steps·√(parameters) and is nearly the same
for layers of equal shape. Measured on the demo run (4 equal layers): parameter divergence
L0 2.19, L1 2.15, L2 2.17, L3 2.24, while 1 − cos of the MLP outputs was 0.006, 0.038, 0.040,
0.049 — layer 0's output barely changed although its weights moved as much as any layer's.
``divergence_measure='param'`` reproduces the paper's choice.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from lfp_core.errors import BadInputError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def parameter_divergence(base_hf, tuned_hf) -> list[float]:
    """Σ_tensors ‖θ_base − θ_tuned‖_F for each transformer layer (index = layer)."""
    tuned = dict(tuned_hf.named_parameters())
    out: dict[int, float] = {}
    for name, p in base_hf.named_parameters():
        m = _LAYER.search(name)
        if m is None:
            continue
        if name not in tuned or tuned[name].shape != p.shape:
            raise BadInputError(
                f"tuned model has no parameter {name} of shape {tuple(p.shape)}: not the same base model"
            )
        layer = int(m.group(1))
        diff = (p.detach().float() - tuned[name].detach().float()).norm().item()
        out[layer] = out.get(layer, 0.0) + diff
    return [out.get(i, 0.0) for i in range(max(out) + 1)] if out else []


@torch.no_grad()
def activation_divergence(
    base_hooked,
    tuned_hooked,
    sequences: list[list[int]],
    batch_size: int = 32,
) -> tuple[list[float], list[float]]:
    """(mean 1 − cos, mean relative L2) of hook_mlp_out per layer over the tokens of ``sequences``.

    ``sequences`` start with BOS, which is excluded; sequences are grouped by length (no padding).
    """
    n_layers = base_hooked.cfg.n_layers
    names = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    cos_sum = np.zeros(n_layers)
    rel_sum = np.zeros(n_layers)
    count = 0
    by_len: dict[int, list[list[int]]] = {}
    for s in sequences:
        by_len.setdefault(len(s), []).append(s)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            ids = torch.tensor(group[i : i + batch_size], device=base_hooked.cfg.device)
            _, cb = base_hooked.run_with_cache(ids, names_filter=lambda n: n in names)
            _, ct = tuned_hooked.run_with_cache(ids, names_filter=lambda n: n in names)
            for li, name in enumerate(names):
                a, b = cb[name][:, 1:].float(), ct[name][:, 1:].float()  # [batch, pos, d_model]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                rel = (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-8)
                cos_sum[li] += float((1 - cos).sum())
                rel_sum[li] += float(rel.sum())
            count += ids.shape[0] * (ids.shape[1] - 1)
    if count == 0:
        raise ValueError("no tokens to compare: the held-out sequences are empty")
    return list(cos_sum / count), list(rel_sum / count)


def select_layers(scores: list[float], k: int) -> list[int]:
    """The k layers of highest divergence, returned in numeric layer order."""
    if k < 1:
        raise ValueError("need k >= 1 layers")
    order = np.argsort(-np.asarray(scores), kind="stable")[: min(k, len(scores))]
    return sorted(int(i) for i in order)
