"""Preference-model stages: train a reward model on the oracle's preferences (the run's reward plug-in,
VADER by default) between base-model completions and SAEs on its residual stream (``reward_model``), then
rank those SAE features by single-feature attribution (AtP, and integrated gradients along one feature's
axis), verify it by true ablation of the top features and of a random sample, find the features behind the
model's disagreements with the oracle, and (lexicon reward) run the same attribution on a behaviour of the
policy: its expected next-token VADER valence over its completions (``attribution``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from lfp_core import activations, attribution, features, reward, reward_model, rewards, saes, sampling
from lfp_core.models import continuation_decoder
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import (
    harvest_dir,
    own_saes,
    reward_info,
    run_reward,
    selected_layers,
    special_tokens,
    tuned_policy,
)
from lfp_core.settings import AttributionStageSettings, RewardModelStageSettings
from lfp_core.store import artifacts_dir, put_rows

log = logging.getLogger(__name__)
ROLE = "rm"


def rm_dir(ctx: Context):
    return artifacts_dir(ctx.writer.run_dir) / "reward_model"


def loaded_rm(ctx: Context) -> reward_model.RewardModel:
    if "rm" not in ctx.cache:
        ctx.cache["rm"] = reward_model.RewardModel(rm_dir(ctx), ctx.model, device=ctx.run.device)
    return ctx.cache["rm"]


def rm_layers(ctx: Context, s: RewardModelStageSettings) -> list[int]:
    """The residual-stream layers that get SAEs (``rm.layers`` resolved for the model)."""
    n = ctx.model.hooked().cfg.n_layers
    layers = s.rm.layer_list(n)
    activations.check_layers(layers, n)
    return layers


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def sample_pairs(ctx: Context, s: RewardModelStageSettings) -> list[dict]:
    """``rm.samples_per_prompt`` base completions of every prompt (one length per prompt, drawn as in
    the RL), scored by the run's reward (the oracle) and turned into oracle pairs; pairs of RL prompts
    train, pairs of held-out prompts evaluate."""
    m, r, seed, lo, hi = (
        ctx.model,
        ctx.writer.reader(),
        s.run.seed,
        s.completions.min_new_tokens,
        s.completions.max_new_tokens,
    )
    prompts = r.prompts()
    rng = np.random.default_rng([seed, 83])
    lengths = {int(p): int(rng.integers(lo, hi + 1)) for p in prompts.prompt_id}
    jobs = [
        (int(p), list(t)) for p, t in zip(prompts.prompt_id, prompts.token_ids) for _ in range(s.rm.samples_per_prompt)
    ]
    outs = sampling.sample_completions(
        m,
        [t for _, t in jobs],
        [lengths[p] for p, _ in jobs],
        seed=seed * 7919 + 83,
        batch_size=s.generation.batch_size,
    )
    text_of = dict(zip(prompts.prompt_id.astype(int), prompts.text))
    scores = run_reward(ctx, s.reward.spec).score(
        [text_of[pid] for pid, _ in jobs], [m.tokenizer.decode(ids) for ids, _ in outs]
    )
    groups: dict[int, list] = {}
    for (pid, _), (ids, _), score in zip(jobs, outs, scores):
        groups.setdefault(pid, []).append((ids, float(score)))
    split = dict(zip(prompts.prompt_id.astype(int), prompts.split))
    pairs = reward_model.oracle_pairs(groups)
    for i, p in enumerate(pairs):
        p["pair_id"], p["split"] = i, "train" if split[p["prompt_id"]] == "train" else "eval"
    return pairs


def stage_reward_model(ctx: Context, s: RewardModelStageSettings, config_hash: str) -> None:
    tok, r = ctx.model.tokenizer, ctx.writer.reader()
    decode = continuation_decoder(tok)  # a completion's text as it reads after its prompt
    prompts = {int(p): list(t) for p, t in zip(*r.prompts()[["prompt_id", "token_ids"]].to_numpy().T)}
    pairs = sample_pairs(ctx, s)
    train = [p for p in pairs if p["split"] == "train"]
    held = [p for p in pairs if p["split"] == "eval"]
    rw = run_reward(ctx, s.reward.spec)
    log.info(
        "preference pairs (oracle: higher reward preferred by %s, ties dropped): %d training, %d held out",
        rw.name,
        len(train),
        len(held),
    )
    ctx.cache.pop("rm", None)
    ctx.cache.pop("rm_saes", None)
    _, steps = reward_model.train_reward_model(
        ctx.model, train, prompts, s.rm, rm_dir(ctx), seed=s.run.seed, device=s.run.device
    )
    rm = loaded_rm(ctx)
    bos = rm.bos

    def seqs(items, key):
        return [bos + prompts[p["prompt_id"]] + p[key] for p in items]

    detail: dict = {"n_train": len(train), "n_eval": len(held), "train_log": steps, "oracle": reward_info(rw)}
    for name, items in (("eval", held), ("train", train)):
        c, j = rm.score(seqs(items, "chosen_ids")), rm.score(seqs(items, "rejected_ids"))
        detail[f"pair_acc_{name}" if name == "train" else "pair_acc"] = reward_model.pair_accuracy(
            c, j, np.array([p["prompt_id"] for p in items]), seed=s.run.seed
        )  # CI: cluster bootstrap over prompts (pairs of one prompt share completions)
        if name == "eval":
            for p, a, b in zip(held, c, j):
                p["chosen_pm"], p["rejected_pm"] = float(a), float(b)
    acc = detail["pair_acc"]
    log.info(
        "preference model: held-out pair accuracy %.3f (95%% CI %.3f–%.3f, %d pairs from %d prompts); training %.3f",
        acc["acc"],
        acc["lo"],
        acc["hi"],
        acc["n"],
        acc.get("n_prompts", acc["n"]),
        detail["pair_acc_train"]["acc"],
    )
    sae_rows, detail["saes"] = train_rm_saes(ctx, s, rm, held, prompts)
    rows = [
        {
            "pair_id": p["pair_id"],
            "split": p["split"],
            "prompt_id": p["prompt_id"],
            "prompt": tok.decode(prompts[p["prompt_id"]]),
            "chosen": decode(p["chosen_ids"]),
            "rejected": decode(p["rejected_ids"]),
            "chosen_ids": [int(t) for t in p["chosen_ids"]],
            "rejected_ids": [int(t) for t in p["rejected_ids"]],
            "chosen_oracle": p["chosen_oracle"],
            "rejected_oracle": p["rejected_oracle"],
            "chosen_pm": p.get("chosen_pm"),
            "rejected_pm": p.get("rejected_pm"),
        }
        for p in pairs
    ]

    def write(con):
        put_rows(con, "rm_pairs", rows)
        put_rows(con, "saes", sae_rows)

    ctx.commit(write, detail)


def train_rm_saes(
    ctx: Context, s: RewardModelStageSettings, rm, held: list[dict], prompts: dict[int, list[int]]
) -> tuple[list[dict], dict]:
    """Harvest the preference model's residual stream over the activation corpus (same documents and
    row index as the policy's harvest) and train one SAE per ``rm.layers`` layer with the run's SAE
    settings; report FVU, L0, dead fraction and the held-out pair accuracy with the SAE spliced in (no
    error term)."""
    tok, r, seed = ctx.model.tokenizer, ctx.writer.reader(), s.run.seed
    layers = rm_layers(ctx, s)
    docs_df = r.corpus_docs()
    docs = [
        activations.Doc(int(d), src, sp, [int(t) for t in ids])
        for d, src, sp, ids in zip(docs_df.doc_id, docs_df.source, docs_df.split, docs_df.token_ids)
    ]
    h = harvest_dir(ctx)
    idx = h.index()
    info = activations.harvest_role(
        rm.hooked,
        docs,
        layers,
        h.root,
        ROLE,
        rm.bos,
        special_tokens(tok),
        device=s.run.device,
        batch_size=ctx.batch(),
        hook_of=resid_hook,
    )
    train_rows, eval_rows = np.nonzero(~idx["is_eval"])[0], np.nonzero(idx["is_eval"])[0]
    chosen = [rm.bos + prompts[p["prompt_id"]] + p["chosen_ids"] for p in held]
    rejected = [rm.bos + prompts[p["prompt_id"]] + p["rejected_ids"] for p in held]
    out, detail = [], {"harvest": info}
    for layer in layers:
        spec = saes.SAESpec.from_settings(s.sae, rm.hooked.cfg.d_model, seed, s.run.device)
        acts = h.acts(ROLE, layer)
        src = saes.ActivationSource(acts, train_rows, spec.batch_size, seed=seed + 97 + layer, layer=layer)
        sae, tinfo = saes.train_sae(spec, src, resid_hook(layer), model_name=f"{ctx.model.spec.name}:{ROLE}")
        sid = f"{ROLE}-L{layer}-main"
        path = saes.save_sae(sae, artifacts_dir(ctx.writer.run_dir) / "saes" / sid)
        m = saes.reconstruction_metrics(sae, acts, eval_rows)
        with rm.hooked.saes(saes=[sae], use_error_term=False):
            acc = reward_model.pair_accuracy(rm.score(chosen), rm.score(rejected))
        log.info(
            "SAE %-18s FVU %.3f  L0 %.1f  dead %.3f  held-out pair accuracy spliced %.3f  (%.1fs)",
            sid,
            m["fvu"],
            m["l0"],
            m["dead_frac"],
            acc["acc"],
            tinfo["seconds"],
        )
        detail[sid] = {**{k: m[k] for k in ("fvu", "l0", "dead_frac")}, "pair_acc_spliced": acc["acc"]}
        out.append(
            {
                "sae_id": sid,
                "role": ROLE,
                "layer": layer,
                "kind": "rm",
                **saes.sae_record(sae, spec),
                "seed": spec.seed,
                "hook_name": resid_hook(layer),
                "path": str(path.relative_to(ctx.writer.run_dir)),
                "train_tokens": spec.train_tokens,
                "seconds": tinfo["seconds"],
                **{
                    k: m[k]
                    for k in ("mse", "fvu", "l0", "dead_frac", "dead_tokens", "n_eval_tokens", "cos_sim", "l2_ratio")
                },
            }
        )
    return out, detail


# --- attribution --------------------------------------------------------------------------------------
def rm_saes(ctx: Context) -> dict:
    """The preference model's residual-stream SAEs (loaded once per invocation)."""
    if "rm_saes" not in ctx.cache:
        table = ctx.writer.reader().saes()
        layers = sorted({int(x) for x in table.layer[(table.role == ROLE) & (table.kind == "rm")]})
        if not layers:
            raise RuntimeError("the preference model has no SAEs: run the reward_model stage first")
        ctx.cache["rm_saes"] = saes.main_saes(
            ctx.writer.run_dir,
            table,
            ROLE,
            layers,
            loaded_rm(ctx).hooked.cfg.d_model,
            hook_of=resid_hook,
            device=ctx.run.device,
            kind="rm",
        )
    return ctx.cache["rm_saes"]


def _pair_seqs(ctx: Context, pairs) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """BOS + prompt + chosen / rejected completion, and where the completion starts."""
    p = ctx.writer.reader().prompts()
    prompts = dict(zip(p.prompt_id.astype(int), p.token_ids))
    bos = loaded_rm(ctx).bos
    heads = [bos + [int(t) for t in prompts[int(p)]] for p in pairs.prompt_id]
    return (
        [h + [int(t) for t in c] for h, c in zip(heads, pairs.chosen_ids)],
        [h + [int(t) for t in c] for h, c in zip(heads, pairs.rejected_ids)],
        [len(h) for h in heads],
    )


PM_METRIC = "the preference model's reward (its scalar head at the text's last token)"
POLICY_METRIC = (
    "the policy's expected VADER valence of its next token, Σ_v softmax(logits)[v] · valence(v), summed over "
    "the completion positions (valence: the lexicon value of the whole-word token, else 0)"
)


def _rows(target: str, res: dict) -> tuple[list[dict], list[dict]]:
    feats = [{"target": target, "n_texts": len(res["clean"]), "contrast": None, **f} for f in res["features"]]
    return feats, [{"target": target, **p} for p in res["points"]]


def _result(res: dict, s: AttributionStageSettings, n_texts: int, metric: str) -> dict:
    """The stage summary of one target (an AttributionResult)."""
    atp = s.atp
    return {
        "n_texts": n_texts,
        "metric": metric,
        "steps": atp.steps,
        "top_k": atp.top_k,
        "random_k": atp.random_k,
        "n_random": res["n_random"],
        "n_random_active": res["n_random_active"],
        "rel_floor_share": attribution.REL_FLOOR,
        "checks": res["checks"],
        "seconds": res["seconds"],
        "spearman_top": res["spearman_top"],
        "spearman_points": res["spearman_points"],
    }


def _pm_scorer(rm):
    return lambda m, t, la, mk: rm.score_tokens(t, la)


def pm_attribution(ctx: Context, s: AttributionStageSettings) -> tuple[dict, list[dict], list[dict]]:
    """Single-feature attribution of the preference model's reward over its SAE features on the completion
    tokens of both texts of the held-out pairs with the largest oracle gaps: AtP for every feature, the top
    ``atp.top_k`` by mean |AtP| and ``atp.random_k`` random features per layer verified by true ablation and
    path-estimated (lfp_core/attribution.py)."""
    atp, r = s.atp, ctx.writer.reader()
    rm, sae_map = loaded_rm(ctx), rm_saes(ctx)
    held = r.rm_pairs("eval")
    held = held.assign(gap=held.chosen_oracle - held.rejected_oracle).sort_values(
        ["gap", "pair_id"], ascending=[False, True]
    )
    top = held.head(atp.pairs)
    chosen, rejected, starts = _pair_seqs(ctx, top)
    res = attribution.rank_and_verify(
        rm.hooked,
        sae_map,
        chosen + rejected,
        starts + starts,
        _pm_scorer(rm),
        rm.batch,
        atp.steps,
        atp.top_k,
        atp.random_k,
        seed=s.run.seed,
        batch_size=ctx.batch(),
    )
    feats, points = _rows("pm", res)
    return _result(res, s, len(chosen) * 2, PM_METRIC), feats, points


def disagreement(ctx: Context, s: AttributionStageSettings) -> tuple[dict, list[dict]]:
    """Where the preference model prefers the oracle's rejected completion: the features whose removal
    would move the margin r(chosen) − r(rejected) most towards the oracle (AtP, the single-feature estimate,
    on both texts of the 4 × atp_pairs disagreeing pairs with the largest oracle gaps), with the same mean on
    as many agreeing pairs as the contrast."""
    atp, r = s.atp, ctx.writer.reader()
    rm, sae_map = loaded_rm(ctx), rm_saes(ctx)
    held = r.rm_pairs("eval")
    held = held.assign(gap=held.chosen_oracle - held.rejected_oracle).sort_values(
        ["gap", "pair_id"], ascending=[False, True]
    )
    n_wrong = int((held.chosen_pm < held.rejected_pm).sum())
    cap = 4 * atp.pairs  # the clearest cases: the largest oracle gaps
    wrong = held[held.chosen_pm < held.rejected_pm].head(cap)
    right = held[held.chosen_pm >= held.rejected_pm].head(max(len(wrong), 1))
    if wrong.empty:
        return {"n_disagree": 0, "n_eval": len(held), "n_attributed": 0}, []

    def margin_effects(pairs):
        c, j, st = _pair_seqs(ctx, pairs)
        out = {}
        for layer in sae_map:
            parts = []
            for seqs in (c, j):
                parts.append(
                    np.concatenate(
                        [
                            attribution.atp(rm.hooked, sae_map, layer, toks, last, mask, _pm_scorer(rm))[0]
                            for toks, last, mask in attribution.masked_batches(seqs, st, rm.batch, ctx.batch())
                        ]
                    )
                )
            out[layer] = parts[0] - parts[1]  # [pairs, d_sae]: estimated change of the margin
        return out

    bad, good = margin_effects(wrong), margin_effects(right)
    rows = [
        {
            "target": "pm_disagree",
            "layer": int(layer),
            "feature": int(f),
            "estimate": float(bad[layer][:, f].mean()),
            "estimate_atp": float(bad[layer][:, f].mean()),
            "estimate_abs": float(np.abs(bad[layer][:, f]).mean()),
            "contrast": float(good[layer][:, f].mean()),
            "n_texts": len(wrong),
            "true_effect": None,
        }
        for layer in bad
        for f in range(bad[layer].shape[1])
    ]
    rows.sort(key=lambda x: -float(x["estimate"] or 0.0))
    for i, x in enumerate(rows):
        x["rank"] = i
    return {
        "n_disagree": n_wrong,
        "n_eval": len(held),
        "n_attributed": len(wrong),
        "top": [{k: x[k] for k in ("layer", "feature", "estimate", "contrast")} for x in rows[:5]],
    }, rows


def policy_scorer(model) -> attribution.Scorer:
    """The policy-side metric: ``model``'s expected VADER valence of its next token, summed over the
    attributed (completion) positions — a behaviour of the policy, computed from its logits, not a read-out
    of the features attributed."""
    n = min(len(model.tokenizer), int(model.cfg.d_vocab))
    table = torch.zeros(int(model.cfg.d_vocab), device=model.cfg.device)
    table[:n] = torch.tensor(reward.token_valence_table(model.tokenizer, n), device=model.cfg.device)
    return attribution.expected_valence(table)


def policy_attribution(ctx: Context, s: AttributionStageSettings) -> tuple[dict, list[dict], list[dict]]:
    """The same attribution on the tuned policy, metric :func:`policy_scorer` on its completions of held-out
    prompts, over its SAE features at the selected layers (one layer's SAE spliced at a time)."""
    atp, r = s.atp, ctx.writer.reader()
    layers = selected_layers(ctx)
    hooked = tuned_policy(ctx).hooked()
    sae_map = own_saes(ctx, "tuned", layers)
    p = r.prompts()
    prompts = dict(zip(p.prompt_id.astype(int), p.token_ids))
    comp = r.completions("tuned", limit=2 * atp.pairs)
    bos = [hooked.tokenizer.bos_token_id] if hooked.tokenizer.bos_token_id is not None else []
    heads = [bos + [int(t) for t in prompts[int(p)]] for p in comp.prompt_id]
    seqs = [h + [int(t) for t in c] for h, c in zip(heads, comp.token_ids)]
    res = attribution.rank_and_verify(
        hooked,
        sae_map,
        seqs,
        [len(h) for h in heads],
        policy_scorer(hooked),
        lambda q: attribution.right_pad(q, ctx.model.tokenizer.pad_token_id or 0, ctx.run.device),
        atp.steps,
        atp.top_k,
        atp.random_k,
        seed=s.run.seed,
        batch_size=ctx.batch(),
    )
    feats, points = _rows("policy", res)
    return _result(res, s, len(seqs), POLICY_METRIC), feats, points


def add_top_tokens(ctx: Context, rows: list[dict], per_target: int = 60) -> None:
    """``top_tokens`` of each target's first ``per_target`` ranked features: the tokens they fire on most
    over the held-out rows of the activation corpus (the preference model's or the policy's harvest)."""
    piece = continuation_decoder(ctx.model.tokenizer)  # each token with its own leading space
    h = harvest_dir(ctx)
    idx = h.index()
    eval_rows = np.nonzero(idx["is_eval"])[0]
    maps = {
        "pm": ("rm", rm_saes(ctx)),
        "pm_disagree": ("rm", rm_saes(ctx)),
        "policy": ("tuned", own_saes(ctx, "tuned", selected_layers(ctx))),
    }
    wanted: dict[tuple[str, int], set[int]] = {}
    for x in rows:
        if x["rank"] < per_target:
            wanted.setdefault((maps[x["target"]][0], x["layer"]), set()).add(x["feature"])
    found = {}
    for (role, layer), feats in wanted.items():
        sae = next(m for r_, m in maps.values() if r_ == role)[layer]
        for f, toks in features.top_tokens_of(
            sae, h.acts(role, layer), eval_rows, idx["token_id"], sorted(feats), lambda t: piece([t])
        ).items():
            found[(role, layer, f)] = toks
    for x in rows:
        x["top_tokens"] = found.get((maps[x["target"]][0], x["layer"], x["feature"]))


def _check_line(name: str, d: dict) -> str:
    parts = []
    for sample, by in d.get("checks", {}).items():
        for est, c in by.items():
            parts.append(
                f"{sample}/{est}: Spearman {c['rho']:.3f} (p {c['p']:.2g}, n {c['n']}), sign {c['sign_agree']:.2f}, "
                f"median rel. error {c['median_rel_err']:.3f}"
                + (f", recall@{c['k']} {c['recall']:.2f} (chance {c['recall_chance']:.2f})" if "recall" in c else "")
            )
    return f"attribution ({name}) vs true ablation: " + "; ".join(parts)


def stage_attribution(ctx: Context, s: AttributionStageSettings, config_hash: str) -> None:
    detail: dict = {}
    rows, points = [], []
    targets = [("pm", pm_attribution), ("policy", policy_attribution)]
    if rewards.reward_kind(s.reward.spec) != "lexicon":  # the policy target is its expected next-token valence
        detail["not_applicable"] = {
            "policy": rewards.lexicon_only(
                "the policy target (expected VADER valence of the next token)", rewards.reward_name(s.reward.spec)
            )
        }
        targets = targets[:1]
    for name, fn in targets:
        d, f, p = fn(ctx, s)
        detail[name] = d
        rows += f
        points += p
        log.info(
            "%s (%.0fs AtP, %.0fs verification)", _check_line(name, d), d["seconds"]["atp"], d["seconds"]["verify"]
        )
    d, f = disagreement(ctx, s)
    detail["disagreement"] = d
    rows += f
    add_top_tokens(ctx, rows)
    log.info("preference model disagrees with the oracle on %d of %d held-out pairs", d["n_disagree"], d["n_eval"])

    def write(con):
        put_rows(con, "attribution", rows)
        put_rows(con, "attribution_points", points)

    ctx.commit(write, detail)
