"""Ablation stage: zero feature sets of the tuned policy's SAEs (error term kept), sample completions of
held-out review prefixes with the same seeds as the clean policy, and test each set's effect on the run's
reward (VADER by default; :mod:`lfp_core.rewards`, scoring prefix + completion) against random control sets.

Sets: ``baseline`` (nothing zeroed: every SAE spliced in with its error term, which reproduces the
clean policy); the tested sets, each with the direction zeroing it should move the reward (its
hypothesis): ``probe_top`` (the ablation_k firing features with the largest positive probe importance —
what the probe reads as positive feedback; hypothesis "lower"), ``labelled_pos`` and ``labelled_neg`` (the
features the labeller called reward-related, split by the sign of their probe weight — the direction of
valence the probe reads from them, as the labels themselves carry no sign — with hypotheses "lower" and
"raise"; a relevant feature without a probe weight joins neither); ``ablation_random`` random sets per
tested set; and ``all`` (every firing feature of every selected layer: the most any feature set at these
layers can do). One chunk per set: a killed run resumes at the first set not stored.

The test. Null hypothesis: the tested set moves the reward as a random set of the same size and activation
mass would. Each random set has as many features per layer as its tested set, drawn feature by feature
from the features nearest in activation mass (density × mean activation when firing: what the probe
importance |w · mean act| favours; :func:`lfp_core.ablation.random_sets`). The p-value is the exact rank p of
the tested set's mean reward change among its N controls', one-sided in the hypothesised direction:
(1 + #{controls at least as extreme}) / (N + 1), so N >= 20 (``ablation.random``) lets it reach p < 0.05.
For the heaviest features the stratum is one-sided, so their controls run a little lighter (quick run: the
probe-top set's median mass 0.108, its controls' 0.088, the layers' firing features' 0.028); the stored
``density``/``mass`` of every set show the match.

The cost, and why the comparison stays fair. A set costs one completion per prefix. Sampling every random
set on all ``ablation.n`` prefixes would cost 3 × 20 sets × n (4.6× the old stage). Instead every set —
baseline, tested and random — is sampled on the first ``ablation.rank_n`` prefixes with the same per-prefix
seeds, in identical batches (the batches split at ``rank_n``), and the rank test compares the sets' mean
change on exactly those prefixes: the statistic is computed identically for the tested set and its
controls. The tested sets and the baseline are sampled on all ``n`` prefixes as well, for the CIs of their
effect (paired t over prefixes). On the demo run of the previous version a set's per-prefix change had SD
≈ 0.85, and the 5 random sets' means spread by about their own standard error (0.037 at 512 prefixes):
the controls differ mostly by prefix noise, so ``rank_n`` trades the test's power for time, never its
validity. The stage records ``random_se`` (a control's standard error on the rank prefixes) beside
``random_sd`` (the controls' spread) so a reader sees which dominates. Demo (n 512, rank_n 256, 16 and
~15 labelled features): baseline + 3 tested + all on 512 prefixes and 60 random sets on 256 is 17,920
completions, 2.5× the old 7,168 (the old stage took 160 s on the demo machine: about 400 s expected).
Measured on the quick preset (64 prefixes, so rank_n 64; probe_top 8 features, labelled_neg 1, no positive
labelled feature): 2,816 completions against the old 896, 128 s against 41 s on the same 2-core machine
under the same load (3.1×, in proportion to the completions).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

from lfp_core import ablation, corpora
from lfp_core import texts as given_texts
from lfp_core.errors import BadInputError
from lfp_core.models import continuation_decoder
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import own_saes, run_reward, selected_layers, tuned_policy
from lfp_core.settings import AblationStageSettings
from lfp_core.store import RunWriter, put_rows

log = logging.getLogger(__name__)
BATCH = 128
TESTED = ("probe_top", "labelled_pos", "labelled_neg")


def prefixes(ctx: Context, s: AblationStageSettings) -> list[dict]:
    """``ablation.n`` prefixes of ``ablation.prefix_tokens`` tokens from IMDB test reviews, or from the
    given corpus (``corpus.source``: its documents of at least that many tokens), model-sampled when
    neither is there; each with its completion length drawn as in the RL."""
    m, seed = ctx.model, s.run.seed
    n, k = s.ablation.n, s.ablation.prefix_tokens
    if s.corpus.source is not None:  # before the IMDB fallback: a missing given file is an error, not a fallback
        rows = given_texts.prefix_rows(m.tokenizer, given_texts.read_texts(s.corpus.source, "corpus"), n, k, seed + 53)
        if not rows:
            raise BadInputError(
                f"--corpus {s.corpus.source} has no document of {k} tokens for the ablation prefixes; "
                "lower ablation_prefix_tokens"
            )
        return _prefix_records(m, s, rows)
    try:
        reviews, _ = corpora.imdb_reviews(s.run.data_dir, ("test",))
        rows = corpora.imdb_prompts(m.tokenizer, reviews["test"], n, k, k, seed + 53, split="ablation")
    except FileNotFoundError as exc:
        log.warning("IMDB not reachable (%s): sampling the ablation prefixes from the base model", exc)
        rows = corpora.model_prompts(m, n, k, k, seed + 53, s.generation.batch_size, split="ablation")
    return _prefix_records(m, s, rows)


def _prefix_records(m, s: AblationStageSettings, rows: list[dict]) -> list[dict]:
    """The ablation_prefixes rows of prefix token ids, with completion lengths drawn as in the RL."""
    seed = s.run.seed
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


def _grouped(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for a, b in pairs:
        out.setdefault(int(a), []).append(int(b))
    return {a: sorted(b) for a, b in sorted(out.items())}


def tested_sets(
    probe: pd.DataFrame, labels: pd.DataFrame, alive: set[tuple[int, int]], k: int
) -> list[tuple[str, dict[int, list[int]], str]]:
    """The tested sets as (name, {layer: ids}, hypothesis), from the probe's features (by rank, with
    ``weight``) and the labels (``relevant``, ``probe_weight``), restricted to ``alive`` (layer, feature)
    pairs: ``probe_top`` (the first ``k`` with a positive weight; zeroing them should lower the reward),
    ``labelled_pos`` (reward-related by the labeller, positive probe weight: lower) and ``labelled_neg``
    (negative probe weight: raise). Empty sets are left out (logged)."""
    pos = [
        (int(a), int(b))
        for a, b, w in zip(probe.layer, probe.feature, probe.weight)
        if w > 0 and (int(a), int(b)) in alive
    ]
    out = [("probe_top", _grouped(pos[:k]), "lower")]
    if not labels.empty:
        rel = labels[labels.relevant.fillna(False).astype(bool)]
        w = pd.to_numeric(rel.probe_weight, errors="coerce")
        keys = [(int(a), int(b)) for a, b in zip(rel.layer, rel.feature)]
        unsigned = int((w.isna() | (w == 0)).sum())
        if unsigned:
            log.info("%d reward-related features have no probe weight (or 0): in neither labelled set", unsigned)
        for name, sign, hyp in (("labelled_pos", 1, "lower"), ("labelled_neg", -1, "raise")):
            out.append((name, _grouped(x for x, v in zip(keys, w) if v * sign > 0 and x in alive), hyp))
    kept = []
    for name, feats, hyp in out:
        if feats:
            kept.append((name, feats, hyp))
        else:
            log.warning("the %s set is empty; skipped", name)
    return kept


def _medians(feats: dict[int, list[int]], stat: dict[int, dict[int, tuple[float, float]]]) -> dict[str, float]:
    vals = [stat[a][b] for a, ids in feats.items() for b in ids if b in stat.get(a, {})]
    if not vals:
        return {"density": float("nan"), "mass": float("nan")}
    d, m = np.array(vals).T
    return {"density": float(np.median(d)), "mass": float(np.median(m))}


def feature_sets(ctx: Context, s: AblationStageSettings, layers: list[int]) -> list[dict]:
    """Every set the stage ablates, in a fixed order (its position is its chunk index); ``full``: sampled
    on all prefixes (else on the first ``rank_n`` only)."""
    r, seed = ctx.writer.reader(), s.run.seed
    stat: dict[int, dict[int, tuple[float, float]]] = {}  # {layer: {feature: (density, mass)}} of firing ones
    for layer in layers:
        f = r.features("tuned", layer)
        f = f[f.n_fired > 0]
        stat[layer] = {int(b): (float(d), float(d) * float(m)) for b, d, m in zip(f.feature, f.density, f.mean_act)}
    firing = {layer: sorted(v) for layer, v in stat.items() if v}
    mass = {layer: {b: v[1] for b, v in fs.items()} for layer, fs in stat.items() if fs}
    alive = {(a, b) for a, ids in firing.items() for b in ids}
    tested = tested_sets(r.probe_features("tuned", limit=None), r.labels("tuned"), alive, s.ablation.k)
    sets: list[dict[str, Any]] = [{"set_id": "baseline", "kind": "baseline", "features": {}, "full": True}]
    for i, (name, feats, hyp) in enumerate(tested):
        sets.append(
            {"set_id": name, "kind": name, "features": feats, "hypothesis": hyp, "full": True, **_medians(feats, stat)}
        )
        draws = ablation.random_sets(mass, feats, s.ablation.random, seed=seed * 1000 + 67 + i, exclude=feats)
        for j, draw in enumerate(draws):
            sets.append(
                {
                    "set_id": f"random_{name}_{j}",
                    "kind": "random",
                    "control_of": name,
                    "hypothesis": hyp,
                    "features": draw,
                    "full": False,
                    **_medians(draw, stat),
                }
            )
    sets.append({"set_id": "all", "kind": "all", "features": firing, "full": True, **_medians(firing, stat)})
    return sets


def batches(n: int, rank_n: int) -> list[tuple[int, int]]:
    """(start, stop) of the sampling batches: the first ``rank_n`` prefixes in batches of their own, so every
    set samples those rows in identical batches whether it covers all ``n`` prefixes or ``rank_n``."""
    cut = min(rank_n, n)
    return [(b, min(b + BATCH, cut)) for b in range(0, cut, BATCH)] + [
        (b, min(b + BATCH, n)) for b in range(cut, n, BATCH)
    ]


def prefix_seed(run_seed: int, prefix_id: int) -> int:
    """The sampling seed of one prefix (the same under every set: the coupled comparison)."""
    return int(np.random.SeedSequence([run_seed, 61, int(prefix_id)]).generate_state(1)[0])


def _sample_set(
    ctx: Context, hooked, sae_map: dict, feats: dict, pre: list[dict], run_seed: int, rank_n: int
) -> list[list[int]]:
    bos = [hooked.tokenizer.bos_token_id] if hooked.tokenizer.bos_token_id is not None else []
    outs: list[list[int]] = []
    with ablation.ablated(hooked, sae_map, feats):
        for b, e in batches(len(pre), rank_n):
            chunk = pre[b:e]
            toks = torch.tensor([bos + p["token_ids"] for p in chunk], dtype=torch.long, device=ctx.run.device)
            seeds = [prefix_seed(run_seed, p["prefix_id"]) for p in chunk]
            new = ablation.sample(hooked, toks, max(p["n_new"] for p in chunk), seeds)
            outs += [o[: p["n_new"]] for o, p in zip(new, chunk)]
    return outs


def stage_ablation(ctx: Context, s: AblationStageSettings, config_hash: str) -> None:
    w = ctx.writer
    layers = selected_layers(ctx)
    pre = prefixes(ctx, s)
    rank_n = min(s.ablation.rank_n, len(pre))
    sets = feature_sets(ctx, s, layers)
    hooked = tuned_policy(ctx).hooked()
    sae_map = own_saes(ctx, "tuned", layers)
    decode = continuation_decoder(ctx.model.tokenizer)  # a completion's text as it reads after its prefix
    rw = run_reward(ctx, s.reward.spec)
    done = w.done_chunks("ablation", config_hash)
    # the prefixes belong to the first chunk committed (or to the final commit when there is none), so a
    # run killed before that commit stores none of them and its resume writes them exactly once
    prefixes_stored = bool(done)
    n_done = sum(len(pre) if fs["full"] else rank_n for ci, fs in enumerate(sets) if ci not in done)
    log.info(
        "ablation: %d sets (%d random, on the first %d prefixes) x up to %d completions; %d to sample, %d sets "
        "already stored",
        len(sets),
        sum(fs["kind"] == "random" for fs in sets),
        rank_n,
        len(pre),
        n_done,
        len(done),
    )
    for ci, fs in enumerate(sets):
        if ci in done:
            continue
        use = pre if fs["full"] else pre[:rank_n]
        outs = _sample_set(ctx, hooked, sae_map, fs["features"], use, s.run.seed, rank_n)
        texts = [decode(o) for o in outs]
        scores = rw.score([p["text"] for p in use], texts)
        rows = [
            {
                "set_id": fs["set_id"],
                "prefix_id": p["prefix_id"],
                "token_ids": [int(t) for t in o],
                "text": text,
                "reward": float(score),
            }
            for p, o, text, score in zip(use, outs, texts, scores)
        ]
        log.info(
            "ablation set %-24s (%4d features): mean reward %.3f over %d prefixes",
            fs["set_id"],
            sum(len(v) for v in fs["features"].values()),
            np.mean([x["reward"] for x in rows]),
            len(rows),
        )
        with w.transaction() as con:
            if not prefixes_stored:
                put_rows(con, "ablation_prefixes", pre)
            put_rows(con, "ablation_completions", rows)
            RunWriter.add_chunk_marker(con, "ablation", config_hash, ci)
        prefixes_stored = True
    rows = summarise(ctx, sets, rank_n)
    detail = ablation_detail(rows, rank_n, s.ablation.random)
    for name, d in detail["sets"].items():
        if d.get("n_random") is None:
            continue
        log.info(
            "ablating %s (%d features; hypothesis: %s the reward): reward %.3f -> %.3f (diff %+.3f [%+.3f, %+.3f]); "
            "on the first %d prefixes %+.3f vs %d matched random sets median %+.3f (range %+.3f to %+.3f; their SE "
            "%.3f, spread %.3f); rank p %.3g (at least %.3g), normal-theory p %.3g",
            name,
            d["size"],
            d["hypothesis"],
            d["reward_before"],
            d["reward_after"],
            d["diff"],
            d["diff_lo"],
            d["diff_hi"],
            rank_n,
            d["rank_diff"],
            d["n_random"],
            d["random_median"],
            d["random_lo"],
            d["random_hi"],
            d["random_se"],
            d["random_sd"],
            d["p_rank"],
            d["p_min"],
            d["p"],
        )
    stored = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]

    def final(con) -> None:
        if not prefixes_stored:  # no set was sampled (none to test)
            put_rows(con, "ablation_prefixes", pre)
        put_rows(con, "ablation_sets", stored)

    ctx.commit(final, detail)


def ablation_detail(rows: list[dict], rank_n: int | None = None, n_random: int | None = None) -> dict:
    """The stage's summary: per tested set, reward before/after with CIs and its test against its random
    controls; the probe-top set's figures at the top level (what ``report --json`` prints as ``ablation``)."""
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
            "density": row["density"],
            "mass": row["mass"],
        }
        if ctrl:
            cmp = row["_cmp"]
            d.update(
                hypothesis=row["hypothesis"],
                rank_n=row["rank_n"],
                rank_diff=row["rank_diff"],
                random_after_mean=float(np.mean([c["after"] for c in ctrl])),
                random_diffs=cmp["random_diffs"],
                random_median=cmp["random_median"],
                random_lo=cmp["random_lo"],
                random_hi=cmp["random_hi"],
                random_se=cmp["random_se"],
                random_sd=cmp["random_sd"],
                p=row["p"],
                p_rank=row["p_rank"],
                p_min=ablation.min_p(len(ctrl)),
                lower_than_all=row["lower_than_all"],
                beyond_all=cmp["beyond_all"],
                n_random=len(ctrl),
                random_density=float(np.nanmedian([c["density"] for c in ctrl])),
                random_mass=float(np.nanmedian([c["mass"] for c in ctrl])),
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
        "n_random": n_random,
        "rank_n": rank_n,
        "n_completions": int(sum(row["n"] for row in rows)),
        "sets": sets,
    }


def summarise(ctx: Context, sets: list[dict], rank_n: int) -> list[dict]:
    """One row per set: mean reward before/after with CIs over the prefixes it was sampled on; tested sets
    also get the test against their random controls on the first ``rank_n`` prefixes (the ``_cmp`` key
    holds the whole comparison for the summary; it is not stored in the table)."""
    r = ctx.writer.reader()
    df = r.ablation_rewards()
    table = df.pivot(index="prefix_id", columns="set_id", values="reward").sort_index()
    before = table["baseline"].to_numpy()

    def diffs(set_id: str, upto: int) -> np.ndarray:
        return table[set_id].to_numpy()[:upto] - before[:upto]

    rows = []
    for fs in sets:
        upto = len(before) if fs["full"] else rank_n
        eff = ablation.paired_effect(before[:upto], table[fs["set_id"]].to_numpy()[:upto])
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
            "hypothesis": fs.get("hypothesis"),
            "rank_n": rank_n if fs["kind"] != "baseline" else None,
            "rank_diff": float(diffs(fs["set_id"], rank_n).mean()),
            "n_random": None,
            "random_median": None,
            "random_lo": None,
            "random_hi": None,
            "density": fs.get("density"),
            "mass": fs.get("mass"),
        }
        controls = [c["set_id"] for c in sets if c.get("control_of") == fs["set_id"]]
        if controls:
            cmp = ablation.compare_with_controls(
                diffs(fs["set_id"], rank_n), np.stack([diffs(c, rank_n) for c in controls]), fs["hypothesis"]
            )
            row.update(
                p_rank=cmp["p_rank"],
                p=cmp["p"],
                lower_than_all=cmp["lower_than_all"],
                n_random=cmp["n_random"],
                random_median=cmp["random_median"],
                random_lo=cmp["random_lo"],
                random_hi=cmp["random_hi"],
                _cmp=cmp,
            )
        rows.append(row)
    return rows
