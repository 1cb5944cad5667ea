"""The model-diffing stages of a tiny run (``null_rlhf``, ``crosscoders``, ``localisation``, ``diff_causal``),
written through :class:`lfp_core.store.RunWriter` as those stages write them, with no model or training.

The rows are synthetic but internally consistent: each crosscoder latent's class follows the thresholds of
:class:`lfp_core.settings.DiffingSettings` from its planted relative norm and ν ratios, each dictionary's
class counts and the crosscoders summary's ``counts`` are the counts of the rows written, every rank p is
(1 + #{random controls as extreme}) / (1 + N) over the random-control rows written beside it, and the
latents also get ``features`` / ``feature_examples`` rows under their roles (``cc_tuned``, ``dsae_null``, ...)
so the Feature page opens them. The fine-tune's pair plants more robust tuned-only latents than the null's.

    run_dir = diffing_run(tmp_path / "diff")               # a full diffing run with a null control
    run_dir = diffing_run(tmp_path / "nonull", null=False) # null recipe 'none', with its reason
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lfp_core.settings import DiffingSettings
from lfp_core.store import put_rows
from tests.tiny_run import N_HARVEST_ROWS, NEGATIVE, NEUTRAL, POSITIVE, VOCAB, TinyRun

NO_NULL_REASON = "the tuned model is given, so its recipe is unknown: pass --null, a model fine-tuned by it with an uninformative reward"
N_RANDOM = 19
N_PREFIXES = 16
# latents per class of one crosscoder (layer l adds l to the robust count); the rest are shared; ids 9, 19, ... are dead
PLAN = {
    "tuned": {"robust tuned-only": 5, "tuned-only": 4, "base-only": 3},
    "null": {"robust tuned-only": 1, "tuned-only": 2, "base-only": 3},
}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 4)


def _classes(run: TinyRun, pair: str, layer: int) -> list[str | None]:
    """The planted class of each latent (None: dead)."""
    live = [f for f in range(run.d_sae) if f % 10 != 9]
    order = [live[int(i)] for i in run.rng.permutation(len(live))]
    plan = dict(PLAN[pair])
    plan["robust tuned-only"] += layer
    out: list[str | None] = [None] * run.d_sae
    for f in live:
        out[f] = "shared"
    i = 0
    for cls, n in plan.items():
        for f in order[i : i + n]:
            out[f] = cls
        i += n
    return out


def _latent(run: TinyRun, kind: str, pair: str, layer: int, f: int, cls: str | None, s: DiffingSettings) -> dict:
    rng = run.rng
    dead = f % 10 == 9
    row: dict = {
        "dict_id": f"{'cc' if kind == 'crosscoder' else 'dsae'}_{pair}_L{layer}",
        "latent": f,
        "kind": kind,
        "pair": pair,
        "layer": layer,
        "role": f"{'cc' if kind == 'crosscoder' else 'dsae'}_{pair}",
        "density": 0.0 if dead else _u(rng, 0.001, 0.1),
        "density_base_text": 0.0 if dead else _u(rng, 0.0, 0.1),
        "density_other_text": 0.0 if dead else _u(rng, 0.0, 0.1),
        "mean_act": 0.0 if dead else _u(rng, 0.5, 4.0),
        "reward_corr": None if dead else _u(rng, -0.3, 0.6),
        "top_tokens": [] if dead else [" " + VOCAB[(3 * f + layer + k) % len(VOCAB)] for k in range(3)],
    }
    if kind != "crosscoder":
        return row
    cls = "dead" if dead else cls
    rel = {"shared": (0.15, 0.85), "base-only": (0.0, 1 - s.tuned_only - 0.02)}.get(
        str(cls), (s.tuned_only + 0.02, 1.0)
    )
    r = None if dead else _u(rng, *rel)
    nu = (_u(rng, 0.0, s.nu_max - 0.02), _u(rng, 0.0, s.nu_max - 0.02))
    if cls == "tuned-only":  # at least one ratio above the bar: the base model explains part of it
        nu = (_u(rng, s.nu_max + 0.05, 1.2), _u(rng, 0.0, 1.2))
    tuned_only = cls in ("tuned-only", "robust tuned-only")
    row.update(
        {
            "class": cls,
            "rel_norm": r,
            "dec_cos": None if dead else _u(rng, -0.2, 0.9),
            "norm_base": None if r is None else round(1 - r, 4),
            "norm_other": r,
            "nu_eps": nu[0] if tuned_only else None,
            "nu_r": nu[1] if tuned_only else None,
            "beta_eps_base": nu[0] if tuned_only else None,
            "beta_eps_other": 1.0 if tuned_only else None,
            "beta_r_base": nu[1] if tuned_only else None,
            "beta_r_other": 1.0 if tuned_only else None,
        }
    )
    return row


def _features(run: TinyRun, latents: list[dict]) -> tuple[list[dict], list[dict]]:
    """``features`` / ``feature_examples`` rows of the latents, their density and mean activation the latents'."""
    feats, examples = [], []
    for x in latents:
        row, ex = run._feature(x["role"], x["layer"], x["latent"])
        row.update(
            density=x["density"],
            n_fired=round(x["density"] * N_HARVEST_ROWS),
            mean_act=x["mean_act"],
            top_tokens=x["top_tokens"],
        )
        feats.append(row)
        examples += ex
    return feats, examples


def _counts(latents: list[dict], d_sae: int) -> dict:
    n = {
        c: sum(x.get("class") == c for x in latents)
        for c in ("shared", "base-only", "tuned-only", "robust tuned-only", "dead")
    }
    return {
        "shared": n["shared"],
        "base_only": n["base-only"],
        "tuned_only": n["tuned-only"],
        "robust": n["robust tuned-only"],
        "dead": n["dead"],
        "d_sae": d_sae,
    }


def _random_controls(run: TinyRun, set_row: dict, centre: float) -> tuple[list[dict], dict]:
    """N matched random sets around ``centre``; the tested row's rank p (one-sided, its hypothesis) and spread."""
    diffs = [round(float(d), 4) for d in run.rng.normal(centre, 0.05, N_RANDOM)]
    rows = [
        {
            **set_row,
            "set_id": f"{set_row['set_id']}_random{i}",
            "kind": "random",
            "control_of": set_row["set_id"],
            "selection": "random (matched density)",
            "diff": d,
            "diff_lo": d - 0.1,
            "diff_hi": d + 0.1,
            "hypothesis": None,
        }
        for i, d in enumerate(diffs)
    ]
    down = set_row["hypothesis"] == "decrease"
    extreme = sum((d <= set_row["diff"]) if down else (d >= set_row["diff"]) for d in diffs)
    stats = {
        "p_rank": (1 + extreme) / (1 + N_RANDOM),
        "n_random": N_RANDOM,
        "random_median": float(np.median(diffs)),
        "random_lo": min(diffs),
        "random_hi": max(diffs),
    }
    return rows, stats


def diffing(run: TinyRun, null: bool = True, token: str | None = None) -> TinyRun:
    """Write the four diffing stages into ``run`` (built up to its features). ``null=False``: null recipe
    'none' (and no null pair); ``token``: a top token of the first robust latent and a promoted lens token."""
    s = DiffingSettings()
    pairs = ["tuned", "null"] if null else ["tuned"]
    with run.writer.transaction() as con:
        detail = (
            {
                "recipe": "shuffled",
                "policy_dir": "artifacts/null_policy",
                "steps": 6,
                "first_reward": 0.0,
                "last10_reward": 0.05,
            }
            if null
            else {"recipe": "none", "not_applicable": {"null control": NO_NULL_REASON}}
        )
        run._done(con, "null_rlhf", detail)

    dicts, latents, counts = [], [], {}
    for pair in pairs:
        for layer in run.selected:
            classes = _classes(run, pair, layer)
            for kind in ("crosscoder", "diff_sae"):
                rows = [_latent(run, kind, pair, layer, f, classes[f], s) for f in range(run.d_sae)]
                if token is not None and kind == "crosscoder" and pair == "tuned" and layer == run.selected[0]:
                    first = next(x for x in rows if x["class"] == "robust tuned-only")
                    first["top_tokens"] = [token, *first["top_tokens"][1:]]
                c = _counts(rows, run.d_sae)
                dicts.append(
                    {
                        "dict_id": rows[0]["dict_id"],
                        "kind": kind,
                        "pair": pair,
                        "layer": layer,
                        "role": rows[0]["role"],
                        "hook_name": f"blocks.{layer}.hook_mlp_out",
                        "arch": "batchtopk" if kind == "crosscoder" else "topk",
                        "d_sae": run.d_sae,
                        "k": 4,
                        "seed": 0,
                        "train_tokens": 40_000,
                        "l0": 4.0,
                        "dead_frac": c["dead"] / run.d_sae,
                        "fvu_base": _u(run.rng, 0.05, 0.2),
                        "fvu_other": _u(run.rng, 0.05, 0.2),
                        **(
                            {
                                "n_shared": c["shared"],
                                "n_base_only": c["base_only"],
                                "n_tuned_only": c["tuned_only"],
                                "n_robust": c["robust"],
                                "n_dead": c["dead"],
                            }
                            if kind == "crosscoder"
                            else {}
                        ),
                    }
                )
                if kind == "crosscoder":
                    counts.setdefault(pair, {})[str(layer)] = c
                latents += rows
    feats, examples = _features(run, latents)
    with run.writer.transaction() as con:
        put_rows(con, "diff_dictionaries", dicts)
        put_rows(con, "diff_latents", latents)
        put_rows(con, "features", feats)
        put_rows(con, "feature_examples", examples)
        run._done(
            con,
            "crosscoders",
            {
                "layers": list(run.selected),
                "hook": "hook_mlp_out",
                "pairs": pairs,
                "dictionaries": [d["dict_id"] for d in dicts],
                "counts": counts,
                "thresholds": {"tuned_only": s.tuned_only, "nu_max": s.nu_max},
                "null_recipe": "shuffled" if null else "none",
            },
        )
    _localisation(run, pairs, token)
    _causal(run, pairs, latents)
    return run


def _localisation(run: TinyRun, pairs: list[str], token: str | None) -> None:
    rng = run.rng
    patching, lens = [], []
    gains = {"tuned": (1.0, 0.8, 1.2), "null": (0.05, -0.1, 0.2)}
    components = [f"L{layer}.{k}" for layer in range(run.n_layers) for k in ("attn", "mlp")]
    fracs: dict[str, float] = {}
    for pair in pairs:
        g, g_lo, g_hi = gains[pair]
        base, clean = 0.2, 0.2 + g
        defined = g_lo > 0
        patching += [
            {"pair": pair, "component": "clean", "kind": "clean", "n": N_PREFIXES, "reward": clean, "reward_lo": clean - 0.1, "reward_hi": clean + 0.1},
            {"pair": pair, "component": "base", "kind": "base", "n": N_PREFIXES, "reward": base, "reward_lo": base - 0.1, "reward_hi": base + 0.1},
        ]  # fmt: skip
        for comp in [*components, "all"]:
            frac = _u(rng, 0.0, 0.4) if comp != "all" else 0.95
            if pair == "tuned" and comp != "all":
                fracs[comp] = frac
            reward = round(clean - frac * g, 4)
            patching.append(
                {
                    "pair": pair,
                    "component": comp,
                    "layer": None if comp == "all" else int(comp[1 : comp.index(".")]),
                    "kind": "all" if comp == "all" else comp.split(".")[1],
                    "n": N_PREFIXES,
                    "reward": reward,
                    "reward_lo": reward - 0.1,
                    "reward_hi": reward + 0.1,
                    "frac": frac if defined else None,
                    "frac_lo": frac - 0.1 if defined else None,
                    "frac_hi": frac + 0.1 if defined else None,
                }
            )
        for layer in run.selected:
            promoted = [" " + w for w in (POSITIVE if pair == "tuned" else NEUTRAL)[:5]]
            if token is not None and pair == "tuned" and layer == run.selected[0]:
                promoted[0] = token
            diff = 0.4 if pair == "tuned" else 0.01
            lens.append(
                {
                    "pair": pair,
                    "layer": layer,
                    "hook_name": f"blocks.{layer}.hook_mlp_out",
                    "n_tokens": 1280,
                    "norm": _u(rng, 0.5, 2.0),
                    "promoted": promoted,
                    "promoted_logits": [round(2.0 - 0.2 * k, 3) for k in range(5)],
                    "suppressed": [" " + w for w in NEGATIVE[:5]],
                    "suppressed_logits": [round(-2.0 + 0.2 * k, 3) for k in range(5)],
                    "steer_n": N_PREFIXES,
                    "steer_diff": diff,
                    "steer_lo": diff - 0.15,
                    "steer_hi": diff + 0.15,
                    "steer_p_rank": 1 / 20 if pair == "tuned" else 9 / 20,
                    "n_random": N_RANDOM,
                    "random_median": 0.0,
                    "random_lo": -0.1,
                    "random_hi": 0.12,
                    "frac_of_gain": round(diff / g, 4) if pair == "tuned" else None,
                }
            )
    top = max(fracs, key=lambda c: fracs[c])
    total = round(sum(fracs.values()), 4)
    g, g_lo, g_hi = gains["tuned"]
    n = gains["null"]
    detail = {
        "n_prefixes": N_PREFIXES,
        "components": components,
        "gain": {"mean": g, "lo": g_lo, "hi": g_hi, "n": N_PREFIXES, "method": "bootstrap over prefixes"},
        "gain_defined": True,
        "sum_fraction": {"mean": total, "lo": total - 0.2, "hi": total + 0.2, "n": N_PREFIXES},
        "all_fraction": {"mean": 0.95, "lo": 0.85, "hi": 1.05, "n": N_PREFIXES},
        "top_component": top,
        "lens_layers": list(run.selected),
        "lens_hook": "hook_mlp_out",
        "lens_tokens": 5,
    }
    if "null" in pairs:
        detail["null_gain"] = {
            "mean": n[0],
            "lo": n[1],
            "hi": n[2],
            "n": N_PREFIXES,
            "method": "bootstrap over prefixes",
        }
    with run.writer.transaction() as con:
        put_rows(con, "diff_patching", patching)
        put_rows(con, "diff_lens", lens)
        run._done(con, "localisation", detail)


def _causal(run: TinyRun, pairs: list[str], latents: list[dict]) -> None:
    rows, sets = [], {}
    for pair in pairs:
        for layer in run.selected:
            dict_id = f"cc_{pair}_L{layer}"
            robust = [x["latent"] for x in latents if x["dict_id"] == dict_id and x.get("class") == "robust tuned-only"]
            for intervention, hyp, centre, diff in (("ablate", "decrease", 0.0, -0.5), ("steer", "increase", 0.0, 0.3)):
                if pair == "null":
                    diff = round(diff / 10, 4)
                tested = {
                    "set_id": f"{pair}_L{layer}_robust_{intervention}",
                    "dict_id": dict_id,
                    "pair": pair,
                    "layer": layer,
                    "kind": "tested",
                    "intervention": intervention,
                    "selection": "robust tuned-only",
                    "latents": robust,
                    "size": len(robust),
                    "n": N_PREFIXES,
                    "diff": diff,
                    "diff_lo": round(diff - 0.15, 4),
                    "diff_hi": round(diff + 0.15, 4),
                    "hypothesis": hyp,
                }
                controls, stats = _random_controls(run, tested, centre)
                tested.update(stats)
                rows += [tested, *controls]
                sets[tested["set_id"]] = {k: tested[k] for k in ("dict_id", "pair", "layer", "intervention", "selection", "size", "n", "diff", "diff_lo", "diff_hi", "hypothesis", *stats)}  # fmt: skip
            for f in robust:
                d = round(float(run.rng.normal(-0.1, 0.05)), 4)
                rows.append(
                    {
                        "set_id": f"{pair}_L{layer}_single{f}",
                        "dict_id": dict_id,
                        "pair": pair,
                        "layer": layer,
                        "kind": "single",
                        "intervention": "ablate",
                        "selection": "robust tuned-only",
                        "latents": [f],
                        "size": 1,
                        "n": N_PREFIXES,
                        "diff": d,
                        "diff_lo": round(d - 0.08, 4),
                        "diff_hi": round(d + 0.08, 4),
                        "hypothesis": "decrease",
                    }
                )
    with run.writer.transaction() as con:
        put_rows(con, "diff_causal", rows)
        run._done(con, "diff_causal", {"n_prefixes": N_PREFIXES, "n_random": N_RANDOM, "sets": sets})


def diffing_run(run_dir: str | Path, null: bool = True, token: str | None = None, **kwargs) -> Path:
    """A tiny run built up to its features, then its four diffing stages (:func:`diffing`); its directory."""
    run = TinyRun(run_dir, **kwargs)
    run.until("features")
    return diffing(run, null=null, token=token).run_dir
