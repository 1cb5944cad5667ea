"""Crosscoder metrics: per-latent decoder and activation statistics, FVU per model, and the loss
recovered when the crosscoder's reconstruction replaces each model's activation.

Written by hand (no library evaluates crosscoders); the conventions are :mod:`lfp_core.saes`'s:
FVU over the per-dimension variance, CE on sequences grouped by length, zero ablation as the baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from lfp_core.crosscoder import SLOTS, Crosscoder, pair_batches
from lfp_core.errors import BadInputError


# --- statistics ---------------------------------------------------------------------------------------
def decoder_stats(cc: Crosscoder) -> dict[str, np.ndarray]:
    """Per latent, from the decoder (normalised space): ``norm_base``, ``norm_other``, ``rel_norm``
    r = ‖d¹‖/(‖d⁰‖+‖d¹‖) (0 base-only, 0.5 shared, 1 other-only; NaN for a latent with both decoders
    zero) and ``dec_cos`` (cosine between d⁰ and d¹; NaN where either is zero)."""
    with torch.no_grad():
        w = cc.W_dec.detach().double().cpu()
        n = w.norm(dim=-1)
        tot = n.sum(-1)
        rel = torch.where(tot > 0, n[:, 1] / tot.clamp_min(1e-30), torch.full_like(tot, float("nan")))
        prod = n[:, 0] * n[:, 1]
        cos = torch.where(
            prod > 0, (w[:, 0] * w[:, 1]).sum(-1) / prod.clamp_min(1e-30), torch.full_like(prod, float("nan"))
        )
    return {
        "norm_base": n[:, 0].numpy(),
        "norm_other": n[:, 1].numpy(),
        "rel_norm": rel.numpy(),
        "dec_cos": cos.numpy(),
    }


@torch.no_grad()
def latent_stats(cc: Crosscoder, acts_base, acts_other, rows=None, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """:func:`decoder_stats` plus, over the (held-out) ``rows``: ``density`` (fraction of tokens where
    f_i > 0; one code serves both models, so there is one density per latent), ``mean_act`` (mean f_i
    over all tokens) and ``mean_act_active`` (over the tokens where it fires; NaN if never)."""
    cc.eval()
    fired = torch.zeros(cc.d_sae, dtype=torch.float64)
    total = torch.zeros(cc.d_sae, dtype=torch.float64)
    n = 0
    for x in pair_batches(acts_base, acts_other, rows, batch_size):
        f = cc.encode(x.to(cc.device)).double().cpu()
        fired += (f > 0).sum(0)
        total += f.sum(0)
        n += f.shape[0]
    if n == 0:
        raise BadInputError("no rows to compute crosscoder latent statistics on")
    out = decoder_stats(cc)
    out["density"] = (fired / n).numpy()
    out["mean_act"] = (total / n).numpy()
    out["mean_act_active"] = torch.where(fired > 0, total / fired.clamp_min(1), torch.nan).numpy()
    return out


@torch.no_grad()
def reconstruction(cc: Crosscoder, acts_base, acts_other, rows=None, batch_size: int = 4096) -> dict:
    """Per model on the (held-out) ``rows``, in raw units: ``fvu_base``/``fvu_other`` = Σ‖x − x̂‖² /
    Σ‖x − mean‖² (per-dimension mean, as :func:`lfp_core.saes.reconstruction_metrics`), ``mse_*`` (per
    element), and ``l0`` (mean active latents per token, inference encoding)."""
    cc.eval()
    d = cc.d_in
    s1 = torch.zeros(2, d, dtype=torch.float64)
    s2 = torch.zeros(2, d, dtype=torch.float64)
    err = torch.zeros(2, dtype=torch.float64)
    l0, n = 0.0, 0
    for x in pair_batches(acts_base, acts_other, rows, batch_size):
        x = x.to(cc.device)
        f = cc.encode(x)
        xh = cc.decode(f)
        x64 = x.double().cpu()
        s1 += x64.sum(0)
        s2 += (x64**2).sum(0)
        err += ((x - xh).double().cpu() ** 2).sum(dim=(0, 2))
        l0 += float((f > 0).sum())
        n += x.shape[0]
    if n == 0:
        raise BadInputError("no rows to measure the crosscoder's reconstruction on")
    var = (s2 - s1**2 / n).sum(-1)
    out: dict = {"l0": l0 / n, "n_eval_tokens": n}
    for m, name in enumerate(SLOTS):
        out[f"fvu_{name}"] = float(err[m] / var[m])
        out[f"mse_{name}"] = float(err[m] / (n * d))
    return out


# --- loss recovered -----------------------------------------------------------------------------------
def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(zero − spliced)/(zero − clean) = (spliced − zero)/(clean − zero): 1 when splicing costs
    nothing, 0 when it is as bad as zero-ablating the hook; NaN when zero-ablation does not hurt."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / gap if gap > 0 else float("nan")


@torch.no_grad()
def ce_recovered(
    base_hooked, other_hooked, cc: Crosscoder, hook_name: str, sequences: list[list[int]], batch_size: int = 32
) -> dict[str, dict]:
    """Next-token cross-entropy of each model on the same ``sequences`` (BOS + tokens, grouped by length
    as :func:`lfp_core.saes.ce_metrics`): clean; with the hook's activation replaced by the crosscoder's
    reconstruction for that model, encoded from the pair of both models' clean activations on the same
    tokens, at every position and without the error term (what "loss recovered" measures; the
    dashboard's ablations keep the error term); and with the hook zero-ablated (see
    :func:`lfp_core.saes.ce_baselines` on what that baseline means at a residual-stream hook).

    Returns:
        ``{"base": {...}, "other": {...}}``, each with the keys of :func:`lfp_core.saes.ce_metrics`:
        ``ce_clean``, ``ce_spliced``, ``ce_zero``, ``ce_tokens``, ``ce_loss_recovered``.

    Raises:
        BadInputError: a model lacks ``hook_name``, the models differ in width or vocabulary, or the
            crosscoder reads another width.
    """
    from lfp_core.saes import _ce_batches, _nll

    for name, m in (("base", base_hooked), ("other", other_hooked)):
        if hook_name not in m.hook_dict:
            raise BadInputError(f"the {name} model has no hook {hook_name!r}")
    if base_hooked.cfg.d_model != other_hooked.cfg.d_model or base_hooked.cfg.d_vocab != other_hooked.cfg.d_vocab:
        raise BadInputError(
            f"base and other models differ (d_model {base_hooked.cfg.d_model} vs {other_hooked.cfg.d_model}, "
            f"d_vocab {base_hooked.cfg.d_vocab} vs {other_hooked.cfg.d_vocab}): no crosscoder pairs them"
        )
    if cc.d_in != base_hooked.cfg.d_model:
        raise BadInputError(f"the crosscoder reads d_in={cc.d_in}, the models' d_model is {base_hooked.cfg.d_model}")
    was_training = cc.training
    cc.eval()
    models = (base_hooked, other_hooked)
    sums = {s: {"clean": 0.0, "spliced": 0.0, "zero": 0.0} for s in SLOTS}
    n = 0
    try:
        for toks in _ce_batches(sequences, batch_size, base_hooked.cfg.device):
            acts: list[torch.Tensor] = []

            def keep(x, hook, acts=acts):  # noqa: ARG001
                acts.append(x.detach())
                return x

            for s, m in zip(SLOTS, models):
                sums[s]["clean"] += _nll(m.run_with_hooks(toks, fwd_hooks=[(hook_name, keep)]), toks)
            b, t, d = acts[0].shape
            pair = torch.stack(acts, dim=-2).reshape(b * t, 2, d).to(cc.device)
            xh = cc(pair).reshape(b, t, 2, d)
            for slot, (s, m) in enumerate(zip(SLOTS, models)):
                rec = xh[:, :, slot, :]

                def splice(x, hook, rec=rec):  # noqa: ARG001
                    return rec.to(device=x.device, dtype=x.dtype)

                def zero(x, hook):  # noqa: ARG001
                    return torch.zeros_like(x)

                sums[s]["spliced"] += _nll(m.run_with_hooks(toks, fwd_hooks=[(hook_name, splice)]), toks)
                sums[s]["zero"] += _nll(m.run_with_hooks(toks, fwd_hooks=[(hook_name, zero)]), toks)
            n += toks[:, 1:].numel()
    finally:
        cc.train(was_training)
    if n == 0:
        raise BadInputError("no sequences of at least two tokens to measure the loss on")
    out = {}
    for s in SLOTS:
        c, sp, z = (sums[s][k] / n for k in ("clean", "spliced", "zero"))
        out[s] = {
            "ce_clean": c,
            "ce_spliced": sp,
            "ce_zero": z,
            "ce_tokens": n,
            "ce_loss_recovered": loss_recovered(c, sp, z),
        }
    return out


__all__ = ["ce_recovered", "decoder_stats", "latent_stats", "loss_recovered", "reconstruction"]
