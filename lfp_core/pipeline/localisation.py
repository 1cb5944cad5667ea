"""The localisation stage (model diffing): which components carry the fine-tune's reward gain, by patching
each attention and MLP output of the tuned policy with the base model's while sampling
(:mod:`lfp_core.localise`), and the activation-difference lens with its steering check
(:mod:`lfp_core.difflens`) for the fine-tune and the null control.

Prefixes: ``diffing.prefixes`` held-out prompts (the ones the rl_eval stage measures the gain on) — those of
the most common lengths, length by length, so every condition of a prefix and all prefixes of one length sample
in one batch (the sampler needs equal-length rows; prompts of 2–9 tokens in one-token steps would otherwise make
eight batches of everything) —, each with one sampling seed shared by every condition, completed to ``completions.max_new_tokens`` tokens
(one length for all, so the steering and patching samples of a prefix are the same length).
"""

from __future__ import annotations

import logging

import numpy as np

from lfp_core import difflens, localise
from lfp_core.models import continuation_decoder
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.diffing import other_model, pairs_of
from lfp_core.pipeline.shared import reward_info, role_model, run_reward
from lfp_core.settings import DiffingStageSettings
from lfp_core.store import put_rows

log = logging.getLogger(__name__)
LENS_HOOK = "hook_resid_post"
LENS_TOP = 20


def diff_prefixes(ctx: Context, s: DiffingStageSettings) -> tuple[list[list[int]], list[int], list[int]]:
    """(prefix token ids, completion lengths, sampling seeds) of the diffing stages' prefixes."""
    every = [[int(t) for t in p] for p in ctx.writer.reader().prompts("eval").token_ids]
    count: dict[int, int] = {}
    for p in every:
        count[len(p)] = count.get(len(p), 0) + 1
    picked: list[int] = []
    for length in sorted(count, key=lambda n: (-count[n], n)):  # the most common lengths first
        picked += [i for i, p in enumerate(every) if len(p) == length][: s.diffing.prefixes - len(picked)]
        if len(picked) >= s.diffing.prefixes:
            break
    ids = [every[i] for i in sorted(picked)]
    lengths = [int(s.completions.max_new_tokens)] * len(ids)
    seeds = [int(np.random.SeedSequence([s.run.seed, 71, i]).generate_state(1)[0]) for i in range(len(ids))]
    return ids, lengths, seeds


def reward_fn(ctx: Context, s: DiffingStageSettings):
    """(prefix ids, completion ids) -> the run's reward of each (prompt text, completion text)."""
    rw = run_reward(ctx, s.reward.spec)
    tok = ctx.model.tokenizer
    piece = continuation_decoder(tok)

    def score(prefixes: list[list[int]], completions: list[list[int]]) -> np.ndarray:
        return np.asarray(rw.score([tok.decode(p) for p in prefixes], [piece(c) for c in completions]), float)

    return score


def _bos(ctx: Context) -> int | None:
    return ctx.model.tokenizer.bos_token_id


def _interval(d: dict | None) -> dict | None:
    return None if d is None else {k: d.get(k) for k in ("mean", "lo", "hi", "n", "method") if k in d}


def patching_rows(out: dict, pair: str) -> list[dict]:
    """The diff_patching rows of one :func:`localise.component_patching` result."""
    n = out["n"]
    rows = []
    for name, c in out["components"].items():
        layer, kind = int(name.split(".")[1]), "attn" if "attn" in name else "mlp"
        rewards = np.asarray(out["rewards"][name], float)
        ci = localise.mean_ci(rewards)
        rows.append(
            {
                "pair": pair,
                "component": f"L{layer}.{kind}",
                "layer": layer,
                "kind": kind,
                "n": n,
                "reward": c["reward"],
                "reward_lo": ci["lo"],
                "reward_hi": ci["hi"],
                "frac": c["frac"],
                "frac_lo": c["frac_lo"],
                "frac_hi": c["frac_hi"],
            }
        )
    for cond in ("tuned", "base", "all"):
        r = np.asarray(out["rewards"][cond], float)
        ci = localise.mean_ci(r)
        a = out.get("all_patched", {}) if cond == "all" else {}
        rows.append(
            {
                "pair": pair,
                "component": cond if cond != "tuned" else "clean",
                "layer": None,
                "kind": {"tuned": "clean", "base": "base", "all": "all"}[cond],
                "n": n,
                "reward": ci["mean"],
                "reward_lo": ci["lo"],
                "reward_hi": ci["hi"],
                "frac": a.get("frac"),
                "frac_lo": a.get("frac_lo"),
                "frac_hi": a.get("frac_hi"),
            }
        )
    return rows


def stage_localisation(ctx: Context, s: DiffingStageSettings, config_hash: str) -> None:
    ids, lengths, seeds = diff_prefixes(ctx, s)
    score = reward_fn(ctx, s)
    base = role_model(ctx, "base").hooked()
    tuned = role_model(ctx, "tuned").hooked()
    pairs = pairs_of(ctx)
    out = localise.component_patching(
        base, tuned, ids, _bos(ctx), lengths, seeds, score, boot_seed=s.run.seed, batch_rows=ctx.batch(512)
    )
    rows = patching_rows(out, "tuned")
    comps = out["components"]
    top = max(comps, key=lambda k: comps[k]["drop"]) if comps else None
    detail: dict = {
        "n_prefixes": len(ids),
        "components": [r["component"] for r in rows if r["kind"] in ("attn", "mlp")],
        "gain": {**out["total_gain"], "n": out["n"], "method": out["method"]},
        "gain_defined": out["defined"],
        "sum_fraction": _interval(out.get("sum_frac")),
        "all_fraction": _interval(
            {
                "mean": out["all_patched"]["frac"],
                "lo": out["all_patched"]["frac_lo"],
                "hi": out["all_patched"]["frac_hi"],
            }
        )
        if "all_patched" in out
        else None,
        "top_component": None if top is None else f"L{int(top.split('.')[1])}.{'attn' if 'attn' in top else 'mlp'}",
        "reward_info": reward_info(run_reward(ctx, s.reward.spec)),
    }
    if not out["defined"]:
        detail["not_applicable"] = {"gain fractions": out["why"]}
    log.info(
        "component patching: gain %+.3f [%.3f, %.3f]; top component %s",
        out["total_gain"]["mean"],
        out["total_gain"]["lo"],
        out["total_gain"]["hi"],
        detail["top_component"],
    )
    gain_of = {"tuned": out["total_gain"]["mean"]}
    if "null" in pairs:  # the null's own gain over the base model, same prefixes and seeds
        null_r = sample_rewards(ctx, other_model(ctx, "null").hooked(), ids, lengths, seeds, score)
        g = localise.gain_fractions(null_r, np.asarray(out["rewards"]["base"]), {}, seed=s.run.seed)
        detail["null_gain"] = {**g["total_gain"], "n": g["n"], "method": g["method"]}
        gain_of["null"] = g["total_gain"]["mean"]
        log.info("null fine-tune: gain %+.3f [%.3f, %.3f]", *(g["total_gain"][k] for k in ("mean", "lo", "hi")))

    # -- the activation-difference lens: every layer's residual stream, for each pair
    lens_docs = ctx.writer.reader().corpus_docs(split="eval", completions=False, limit=s.diffing.lens_docs)
    docs = [[int(t) for t in d] for d in lens_docs.token_ids]
    n_layers = base.cfg.n_layers
    layers = list(range(n_layers))
    lens_rows = []
    piece = continuation_decoder(ctx.model.tokenizer)
    for pair in pairs:
        other = other_model(ctx, pair).hooked()
        hook = LENS_HOOK
        means = difflens.mean_difference(base, other, docs, _bos(ctx), s.diffing.lens_tokens, layers, hook=hook)
        for layer in layers:
            vec = means[layer]
            promoted, suppressed = difflens.lens_tokens(other, vec, top=LENS_TOP)
            steer = difflens.steering_effect(
                base,
                vec,
                layer,
                ids,
                _bos(ctx),
                lengths[0] if lengths else 1,
                seeds,
                score,
                n_random=s.diffing.random,
                alpha=s.diffing.steer_alpha,
                seed=s.run.seed,
                batch_rows=ctx.batch(512),
            )
            rnd = steer["random_changes"]
            gain = gain_of.get("tuned")
            lens_rows.append(
                {
                    "pair": pair,
                    "layer": layer,
                    "hook_name": f"blocks.{layer}.{hook}",
                    "n_tokens": sum(min(len(d), s.diffing.lens_tokens) for d in docs),
                    "norm": float(np.linalg.norm(vec)),
                    "promoted": [piece([int(t)]) for t, _ in promoted],
                    "promoted_logits": [float(v) for _, v in promoted],
                    "suppressed": [piece([int(t)]) for t, _ in suppressed],
                    "suppressed_logits": [float(v) for _, v in suppressed],
                    "steer_n": steer["n"],
                    "steer_diff": steer["change"]["mean"],
                    "steer_lo": steer["change"]["lo"],
                    "steer_hi": steer["change"]["hi"],
                    "steer_p_rank": steer["p_rank"],
                    "n_random": steer["n_random"],
                    "random_median": steer["random_median"],
                    "random_lo": float(min(rnd)),
                    "random_hi": float(max(rnd)),
                    "frac_of_gain": steer["change"]["mean"] / gain if gain and out["defined"] else None,
                }
            )
            log.info(
                "difference lens %s L%d: |δ| %.3f, steering %+.3f [%.3f, %.3f], rank p %.3f; promotes %s",
                pair,
                layer,
                lens_rows[-1]["norm"],
                steer["change"]["mean"],
                steer["change"]["lo"],
                steer["change"]["hi"],
                steer["p_rank"],
                lens_rows[-1]["promoted"][:5],
            )
    detail.update({"lens_layers": layers, "lens_hook": LENS_HOOK, "lens_tokens": s.diffing.lens_tokens})
    if "null" not in pairs:
        detail.setdefault("not_applicable", {})["null control"] = "the run has no null model"

    def write(con):
        put_rows(con, "diff_patching", rows)
        put_rows(con, "diff_lens", lens_rows)

    ctx.commit(write, detail)


def sample_rewards(ctx: Context, model, ids, lengths, seeds, score) -> np.ndarray:
    """The reward of ``model``'s completions of the prefixes with the shared seeds (plain sampling)."""
    import torch

    from lfp_core import ablation

    bos = [_bos(ctx)] if _bos(ctx) is not None else []
    outs: list[list[int]] = [[] for _ in ids]
    for group in localise.by_length(ids, ctx.batch(512)):
        toks = torch.tensor([bos + ids[i] for i in group], dtype=torch.long, device=model.cfg.device)
        new = ablation.sample(model, toks, max(lengths[i] for i in group), [seeds[i] for i in group])
        for i, o in zip(group, new):
            outs[i] = o[: lengths[i]]
    return score(ids, outs)
