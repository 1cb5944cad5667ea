"""The causal checks of the model-diffing stage: are the latents a crosscoder calls tuned-only (and the top
difference-SAE features) causal for the reward, more than latents of the same dictionary picked at random?

For each dictionary (pair × layer × crosscoder / difference SAE) the tested set is its robust tuned-only
latents by activation mass (density × mean activation; tuned-only when none is robust, and the latents of the
highest relative decoder norm when none is tuned-only — the ``selection`` column says which); for a difference
SAE, its features of the largest activation mass; at most ``diffing.causal_top`` of them. Two interventions,
each on the diffing prefixes with one seed per prefix shared by every set (coupled sampling):

* ``ablate``: sample the fine-tuned model (tuned, or the null model for the null pair) with the set's
  contribution removed at the dictionary's hook — for a crosscoder, Σ_i f_i(x_base, x_other) · d_i^other with
  f encoded from both models' live activations on the same tokens (:mod:`lfp_core.lockstep`); for a difference
  SAE, Σ_i f_i(x_other − x_base) · d_i. The hypothesis: the reward drops ('lower').
* ``steer``: sample the base model with the set's average contribution added at every position,
  Σ_i E[f_i] · d_i^other (E over held-out tokens: density × mean active value). Hypothesis: 'raise'.

Controls: ``diffing.random`` sets of as many latents drawn from the same dictionary's firing latents outside the
tested set, matched latent by latent in activation mass (:func:`lfp_core.ablation.random_sets`); the rank p of
the tested set's mean change among theirs (:func:`lfp_core.ablation.compare_with_controls`). Each tested latent
is also ablated alone (kind 'single', no test).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lfp_core import ablation, crosscoder, localise, lockstep, saes
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.diffing import other_model, pairs_of
from lfp_core.pipeline.localisation import diff_prefixes, reward_fn
from lfp_core.pipeline.shared import reward_info, role_model, run_reward
from lfp_core.settings import DiffingStageSettings
from lfp_core.store import put_rows

log = logging.getLogger(__name__)
HYPOTHESIS = {"ablate": "lower", "steer": "raise"}


def raw_decoder(cc, slot: int) -> torch.Tensor:
    """[d_sae, d_in]: the crosscoder's slot decoder in the models' raw units."""
    return (cc.W_dec[:, slot, :] / cc.scale[slot]).detach()


def choose_tested(lat, kind: str, top: int) -> tuple[list[int], str]:
    """The tested set of one dictionary's latents table and how it was chosen."""
    mass = (lat.density.fillna(0) * lat.mean_act.fillna(0)).to_numpy()
    order = np.argsort(-mass, kind="stable")
    if kind == "crosscoder":
        for cls, what in (("robust tuned-only", "robust tuned-only"), ("tuned-only", "tuned-only (none robust)")):
            pick = [int(lat.latent.iloc[i]) for i in order if lat["class"].iloc[i] == cls and mass[i] > 0]
            if pick:
                return pick[:top], what
        # no latent crosses the tuned-only cut-off: the crosscoder's most tuned-leaning latents instead, said so
        rel = lat.rel_norm.to_numpy(dtype=float)
        lean = [
            int(lat.latent.iloc[i]) for i in np.argsort(-np.nan_to_num(rel, nan=-1.0), kind="stable") if mass[i] > 0
        ]
        return lean[:top], "highest relative norm (no tuned-only latent)"
    pick = [int(lat.latent.iloc[i]) for i in order if mass[i] > 0]
    return pick[:top], "largest activation mass"


def _ablate_edit(kind: str, model_obj, ids: list[int], hook: str) -> dict:
    idx = torch.tensor(ids, dtype=torch.long)
    if kind == "crosscoder":
        dec = raw_decoder(model_obj, 1)[idx]

        def fn(base_act, other_act):
            b, t, d = other_act.shape
            f = model_obj.encode(torch.stack([base_act, other_act], dim=-2).reshape(b * t, 2, d).float())[:, idx]
            return other_act - (f @ dec).reshape(b, t, d).to(other_act.dtype)

    else:
        dec = model_obj.W_dec.detach()[idx]

        def fn(base_act, other_act):
            b, t, d = other_act.shape
            f = model_obj.encode((other_act - base_act).reshape(b * t, d).float())[:, idx]
            return other_act - (f @ dec).reshape(b, t, d).to(other_act.dtype)

    return {hook: fn}


def _steer_vector(kind: str, model_obj, ids: list[int], expected: dict[int, float]) -> torch.Tensor:
    dec = raw_decoder(model_obj, 1) if kind == "crosscoder" else model_obj.W_dec.detach()
    w = torch.tensor([expected[i] for i in ids], dtype=torch.float32)
    return (w[:, None] * dec[torch.tensor(ids)].float()).sum(0)


def run_sets(
    ctx, base, other, sets: list[list[int]], kind, model_obj, hook, expected, ids, lengths, seeds, score, n_steer: int
):
    """Per intervention: [len(sets), n] reward changes against the clean model with the same seeds (every set
    ablated; the first ``n_steer`` also added to the base model, the others' steering rows NaN)."""
    bos = ctx.model.tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    n = len(ids)
    out = {"ablate": np.zeros((len(sets), n)), "steer": np.full((len(sets), n), np.nan)}
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(ids):
        by_len.setdefault(len(p), []).append(i)
    edits = [_ablate_edit(kind, model_obj, s, hook) for s in sets]
    vecs = [_steer_vector(kind, model_obj, s, expected) for s in sets[:n_steer]]
    per_batch = max(1, ctx.batch(512) // (len(sets) + 1))  # every set's rows of a prompt in one sampling call
    for group in by_len.values():
        for start in range(0, len(group), per_batch):
            rows = group[start : start + per_batch]
            toks = torch.tensor([head + ids[i] for i in rows], dtype=torch.long, device=other.cfg.device)
            n_new = max(lengths[i] for i in rows)
            rs = [seeds[i] for i in rows]
            k = len(rows)
            all_toks = toks.repeat(len(sets) + 1, 1)
            new_a = lockstep.sample_lockstep(
                base, other, all_toks, n_new, rs * (len(sets) + 1), [None] * k + [e for e in edits for _ in rows]
            )
            new_s = lockstep.sample_steered(
                base,
                toks.repeat(len(vecs) + 1, 1),
                n_new,
                rs * (len(vecs) + 1),
                hook,
                [None] * k + [v for v in vecs for _ in rows],
            )
            for inter, new in (("ablate", new_a), ("steer", new_s)):
                comp = [o[: lengths[rows[j % k]]] for j, o in enumerate(new)]
                r = score([ids[rows[j % k]] for j in range(len(comp))], comp).reshape(len(comp) // k, k)
                out[inter][: r.shape[0] - 1, rows] = r[1:] - r[0]
    return out


def stage_diff_causal(ctx: Context, s: DiffingStageSettings, config_hash: str) -> None:
    d = s.diffing
    r = ctx.writer.reader()
    ids, lengths, seeds = diff_prefixes(ctx, s)
    score = reward_fn(ctx, s)
    base = role_model(ctx, "base").hooked()
    dicts = r.diff_dictionaries()
    rows: list[dict] = []
    sets_summary: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for rec in dicts.itertuples():
        pair, layer, kind = str(rec.pair), int(rec.layer), str(rec.kind)
        if pair not in pairs_of(ctx):
            continue
        lat = r.diff_latents(str(rec.dict_id))
        tested, selection = choose_tested(lat, kind, d.causal_top)
        if not tested:
            notes[f"causal check of {rec.dict_id}"] = selection
            continue
        path = ctx.writer.run_dir / str(rec.path)
        model_obj = crosscoder.load_crosscoder(path) if kind == "crosscoder" else saes.load_sae(path)
        mass = {int(i): float(m) for i, m in zip(lat.latent, lat.density.fillna(0) * lat.mean_act.fillna(0)) if m > 0}
        # E[f_i] over held-out tokens: density × mean activation when firing (diff_latents.mean_act)
        expected = {int(i): float(m) for i, m in zip(lat.latent, lat.density.fillna(0) * lat.mean_act.fillna(0))}
        try:
            controls = ablation.random_sets(
                {layer: mass}, {layer: tested}, d.random, s.run.seed + layer, {layer: tested}
            )
        except ValueError as exc:
            notes[f"causal check of {rec.dict_id}"] = f"too few firing latents for {d.random} random sets: {exc}"
            continue
        sets = [tested] + [c[layer] for c in controls] + [[i] for i in tested]
        other = other_model(ctx, pair).hooked()
        hook = str(rec.hook_name)
        n_ctrl = len(controls)
        eff = run_sets(
            ctx, base, other, sets, kind, model_obj, hook, expected, ids, lengths, seeds, score, n_steer=1 + n_ctrl
        )
        for inter in ("ablate", "steer"):
            test = ablation.compare_with_controls(eff[inter][0], eff[inter][1 : 1 + n_ctrl], HYPOTHESIS[inter])
            sid = f"{rec.dict_id}:{inter}"
            ci = localise.mean_ci(eff[inter][0], seed=s.run.seed)
            row = {
                "set_id": sid,
                "dict_id": str(rec.dict_id),
                "pair": pair,
                "layer": layer,
                "kind": "tested",
                "control_of": None,
                "intervention": inter,
                "selection": selection,
                "latents": tested,
                "size": len(tested),
                "n": len(ids),
                "diff": ci["mean"],
                "diff_lo": ci["lo"],
                "diff_hi": ci["hi"],
                "hypothesis": HYPOTHESIS[inter],
                "p_rank": test["p_rank"],
                "n_random": test["n_random"],
                "random_median": test["random_median"],
                "random_lo": test["random_lo"],
                "random_hi": test["random_hi"],
            }
            rows.append(row)
            sets_summary[sid] = {k: row[k] for k in row if k not in ("set_id", "kind", "control_of", "latents")}
            for j in range(n_ctrl):
                c = localise.mean_ci(eff[inter][1 + j], seed=s.run.seed)
                rows.append(
                    {
                        "set_id": f"{sid}:random{j}",
                        "dict_id": str(rec.dict_id),
                        "pair": pair,
                        "layer": layer,
                        "kind": "random",
                        "control_of": sid,
                        "intervention": inter,
                        "latents": sets[1 + j],
                        "size": len(sets[1 + j]),
                        "n": len(ids),
                        "diff": c["mean"],
                        "diff_lo": c["lo"],
                        "diff_hi": c["hi"],
                    }
                )
            log.info(
                "causal %s %s (%d %s latents): %+.4f [%.4f, %.4f], rank p %.3f among %d matched random sets",
                rec.dict_id,
                inter,
                len(tested),
                selection,
                ci["mean"],
                ci["lo"],
                ci["hi"],
                test["p_rank"],
                n_ctrl,
            )
        for j, lt in enumerate(tested):
            c = localise.mean_ci(eff["ablate"][1 + n_ctrl + j], seed=s.run.seed)
            rows.append(
                {
                    "set_id": f"{rec.dict_id}:ablate:single{lt}",
                    "dict_id": str(rec.dict_id),
                    "pair": pair,
                    "layer": layer,
                    "kind": "single",
                    "intervention": "ablate",
                    "latents": [lt],
                    "size": 1,
                    "n": len(ids),
                    "diff": c["mean"],
                    "diff_lo": c["lo"],
                    "diff_hi": c["hi"],
                }
            )
    detail = {
        "n_prefixes": len(ids),
        "n_random": d.random,
        "sets": sets_summary,
        "reward_info": reward_info(run_reward(ctx, s.reward.spec)),
    }
    if notes:
        detail["not_applicable"] = notes
    ctx.commit(lambda con: put_rows(con, "diff_causal", rows), detail)
