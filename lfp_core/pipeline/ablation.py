"""Ablation stage: zero feature sets of the tuned policy's SAEs (error term kept), sample completions of
held-out review prefixes with the same seeds as the clean policy, and compare each set's effect on the
VADER reward with size-matched random sets.

Sets: ``baseline`` (nothing zeroed: every SAE spliced in with its error term, which reproduces the
clean policy), ``probe_top`` (the ablation_k firing features with the largest positive probe
importance — what the probe reads as positive feedback), ``labelled`` (the features the labeller
called reward-related), ``all`` (every feature of every selected layer: the most any feature set at
these layers can do), and ``ablation_random`` random sets per tested set with the same number of
features per layer. One chunk per set: a killed run resumes at the first set not stored.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lfp_core import ablation, corpora, reward
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import own_saes, selected_layers, tuned_policy
from lfp_core.settings import AblationStageSettings
from lfp_core.store import RunWriter, put_rows

log = logging.getLogger(__name__)
BATCH = 128


def prefixes(ctx: Context, s: AblationStageSettings) -> list[dict]:
    """``ablation.n`` prefixes of ``ablation.prefix_tokens`` tokens from IMDB test reviews (model-sampled
    when IMDB is not reachable), each with its completion length drawn as in the RL."""
    m, seed = ctx.model, s.run.seed
    n, k = s.ablation.n, s.ablation.prefix_tokens
    try:
        reviews, _ = corpora.imdb_reviews(s.run.data_dir, ("test",))
        rows = corpora.imdb_prompts(m.tokenizer, reviews["test"], n, k, k, seed + 53, split="ablation")
    except FileNotFoundError as exc:
        log.warning("IMDB not reachable (%s): sampling the ablation prefixes from the base model", exc)
        rows = corpora.model_prompts(m, n, k, k, seed + 53, s.generation.batch_size, split="ablation")
    lo, hi = s.completions.min_new_tokens, s.completions.max_new_tokens
    lengths = np.random.default_rng([seed, 59]).integers(lo, hi + 1, size=len(rows))
    return [
        {
            "prefix_id": i,
            "token_ids": [int(t) for t in r["token_ids"]],
            "text": m.tokenizer.decode(r["token_ids"]),
            "n_new": int(ln),
        }
        for i, (r, ln) in enumerate(zip(rows, lengths))
    ]


def feature_sets(ctx: Context, s: AblationStageSettings, layers: list[int]) -> list[dict]:
    """Every set the stage ablates, in a fixed order (its position is its chunk index)."""
    r, seed = ctx.writer.reader(), s.run.seed
    firing = {layer: ids for layer, ids in r.firing_features("tuned").items() if layer in layers}
    pf = r.probe_features("tuned", limit=10**6)
    alive = {(int(a), int(b)) for a, ids in firing.items() for b in ids}
    pos = [(int(a), int(b)) for a, b, w in zip(pf.layer, pf.feature, pf.weight) if w > 0 and (int(a), int(b)) in alive]

    def grouped(pairs):
        out: dict[int, list[int]] = {}
        for a, b in pairs:
            out.setdefault(a, []).append(b)
        return {a: sorted(b) for a, b in sorted(out.items())}

    sets: list[dict[str, Any]] = [{"set_id": "baseline", "kind": "baseline", "features": {}}]
    tested = [("probe_top", grouped(pos[: s.ablation.k]))]
    lab = r.labels("tuned")
    if not lab.empty:
        rel = lab[lab.relevant.fillna(False).astype(bool)]
        tested.append(
            ("labelled", grouped((int(a), int(b)) for a, b in zip(rel.layer, rel.feature) if (int(a), int(b)) in alive))
        )
    for i, (name, feats) in enumerate(tested):
        if not feats:
            log.warning("the %s set is empty; skipped", name)
            continue
        sets.append({"set_id": name, "kind": name, "features": feats})
        for j, draw in enumerate(
            ablation.random_sets(firing, feats, s.ablation.random, seed=seed * 1000 + 67 + i, exclude=feats)
        ):
            sets.append({"set_id": f"random_{name}_{j}", "kind": "random", "control_of": name, "features": draw})
    sets.append({"set_id": "all", "kind": "all", "features": firing})
    return sets


def _sample_set(ctx: Context, hooked, sae_map: dict, feats: dict, pre: list[dict], run_seed: int) -> list[list[int]]:
    bos = [hooked.tokenizer.bos_token_id] if hooked.tokenizer.bos_token_id is not None else []
    outs: list[list[int]] = []
    with ablation.ablated(hooked, sae_map, feats):
        for b in range(0, len(pre), BATCH):
            chunk = pre[b : b + BATCH]
            toks = torch.tensor([bos + p["token_ids"] for p in chunk], dtype=torch.long, device=ctx.run.device)
            seed = int(np.random.SeedSequence([run_seed, 61, b]).generate_state(1)[0])
            new = ablation.sample(hooked, toks, max(p["n_new"] for p in chunk), seed)
            outs += [o[: p["n_new"]] for o, p in zip(new, chunk)]
    return outs


def stage_ablation(ctx: Context, s: AblationStageSettings, config_hash: str) -> None:
    w = ctx.writer
    layers = selected_layers(ctx)
    pre = prefixes(ctx, s)
    sets = feature_sets(ctx, s, layers)
    hooked = tuned_policy(ctx).hooked()
    sae_map = own_saes(ctx, "tuned", layers)
    tok = ctx.model.tokenizer
    done = w.done_chunks("ablation", config_hash)
    if not done:
        with w.transaction() as con:
            put_rows(con, "ablation_prefixes", pre)
    log.info("ablation: %d sets x %d completions (%d already stored)", len(sets), len(pre), len(done))
    for ci, fs in enumerate(sets):
        if ci in done:
            continue
        outs = _sample_set(ctx, hooked, sae_map, fs["features"], pre, s.run.seed)
        rows = [
            {
                "set_id": fs["set_id"],
                "prefix_id": p["prefix_id"],
                "token_ids": [int(t) for t in o],
                "text": tok.decode(o),
                "reward": reward.reward(tok.decode(o)),
            }
            for p, o in zip(pre, outs)
        ]
        log.info(
            "ablation set %-22s (%3d features): mean reward %.3f",
            fs["set_id"],
            sum(len(v) for v in fs["features"].values()),
            np.mean([x["reward"] for x in rows]),
        )
        with w.transaction() as con:
            put_rows(con, "ablation_completions", rows)
            RunWriter.add_chunk_marker(con, "ablation", config_hash, ci)
    rows = summarise(ctx, sets, s.run.seed)
    detail = ablation_detail(rows)
    for name, d in detail["sets"].items():
        log.info(
            "ablating %s (%d features): reward %.3f -> %.3f (diff %+.3f [%+.3f, %+.3f]); random sets' mean after "
            "%.3f; p %.3g (rank p %.3g)",
            name,
            d["size"],
            d["reward_before"],
            d["reward_after"],
            d["diff"],
            d["diff_lo"],
            d["diff_hi"],
            d.get("random_after_mean", float("nan")),
            d.get("p", float("nan")),
            d.get("p_rank", float("nan")),
        )
    ctx.commit(lambda con: put_rows(con, "ablation_sets", rows), detail)


def ablation_detail(rows: list[dict]) -> dict:
    """The stage's summary: per tested set, reward before/after, its random controls' mean after and p;
    the probe-top set's figures at the top level (what ``report --json`` prints as ``ablation``)."""
    sets = {}
    for row in rows:
        if row["kind"] in ("baseline", "random"):
            continue
        ctrl = [c for c in rows if c.get("control_of") == row["set_id"]]
        d = {
            "size": row["size"],
            "n": row["n"],
            "reward_before": row["before"],
            "reward_after": row["after"],
            "after_lo": row["after_lo"],
            "after_hi": row["after_hi"],
            "diff": row["diff"],
            "diff_lo": row["diff_lo"],
            "diff_hi": row["diff_hi"],
        }
        if ctrl:
            d.update(
                random_after_mean=float(np.mean([c["after"] for c in ctrl])),
                random_diffs=[c["diff"] for c in ctrl],
                p=row["p"],
                p_rank=row["p_rank"],
                lower_than_all=row["lower_than_all"],
                n_random=len(ctrl),
            )
        sets[row["set_id"]] = d
    top = sets.get("probe_top", {})
    return {
        "reward_before": top.get("reward_before"),
        "reward_after": top.get("reward_after"),
        "random_after_mean": top.get("random_after_mean"),
        "p": top.get("p"),
        "p_rank": top.get("p_rank"),
        "lower_than_all": top.get("lower_than_all"),
        "sets": sets,
    }


def summarise(ctx: Context, sets: list[dict], seed: int) -> list[dict]:
    """One row per set: mean reward before/after with CIs; tested sets also get the comparison with
    their random controls."""
    r = ctx.writer.reader()
    df = r.ablation_rewards()
    table = df.pivot(index="prefix_id", columns="set_id", values="reward")
    before = table["baseline"].to_numpy()
    rows = []
    for fs in sets:
        after = table[fs["set_id"]].to_numpy()
        eff = ablation.paired_effect(before, after)
        row = {
            "set_id": fs["set_id"],
            "kind": fs["kind"],
            "control_of": fs.get("control_of"),
            "size": sum(len(v) for v in fs["features"].values()),
            "layers": [a for a, ids in fs["features"].items() for _ in ids],
            "features": [b for ids in fs["features"].values() for b in ids],
            **eff,
            "p_rank": None,
            "p": None,
            "lower_than_all": None,
        }
        controls = [c["set_id"] for c in sets if c.get("control_of") == fs["set_id"]]
        if controls:
            cmp = ablation.compare_with_controls(
                after - before, np.stack([table[c].to_numpy() - before for c in controls]), seed=seed
            )
            row.update(p_rank=cmp["p_rank"], p=cmp["p"], lower_than_all=cmp["lower_than_all"])
        rows.append(row)
    return rows
