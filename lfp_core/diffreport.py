"""The report's model-diffing section (split from :mod:`lfp_core.report`, which calls these): the null
control, the crosscoder latent classes per pair and layer (the null's beside the fine-tune's), component
patching, the difference lens's steering check and the causal checks. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lfp_core.store import RunReader, done_summary
from lfp_core.store.summaries import (
    CrosscodersSummary,
    DiffCausalSummary,
    LocalisationSummary,
    NullSummary,
    summary_dict,
)

PAIRS = ("tuned", "null")
CLASS_KEYS = ("robust", "tuned_only", "base_only", "shared", "dead", "d_sae")


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v


def diffing_section(r: RunReader, records: list) -> dict | None:
    """``rep["diffing"]``: what the finished diffing stages found, or None when none has finished.

    Keys (each present once its stage is done): ``null`` (recipe, steps, given, not_applicable);
    ``counts`` ``{pair: {layer: {robust, tuned_only, base_only, shared, dead, d_sae}}}`` and ``thresholds``;
    ``patching`` (``gain``, ``gain_defined``, ``sum_fraction``, ``all_fraction``, ``top_component`` with its
    ``frac``/``frac_lo``/``frac_hi``, ``null_gain``); ``lens`` ``{pair: {layer: {diff, lo, hi, p_rank,
    n_random, frac_of_gain}}}``; ``causal`` ``{set_id: {dict_id, pair, layer, intervention, size, diff,
    diff_lo, diff_hi, hypothesis, p_rank, n_random}}``."""
    null = done_summary(records, NullSummary)
    cc = done_summary(records, CrosscodersSummary)
    loc = done_summary(records, LocalisationSummary)
    causal = done_summary(records, DiffCausalSummary)
    if null is None and cc is None and loc is None and causal is None:
        return None
    out: dict[str, Any] = {}
    if null is not None:
        out["null"] = {
            "recipe": null.recipe,
            "steps": null.steps,
            "given": null.given,
            "not_applicable": dict(null.not_applicable),
        }
    if cc is not None:
        out["counts"] = {
            pair: {
                layer: {k: getattr(c, k) for k in CLASS_KEYS}
                for layer, c in sorted(by.items(), key=lambda x: int(x[0]))
            }
            for pair, by in sorted(cc.counts.items(), key=lambda x: PAIRS.index(x[0]) if x[0] in PAIRS else 9)
        }
        out["thresholds"] = dict(cc.thresholds)
    if loc is not None:
        rows = r.diff_patching()
        top = (
            rows[(rows.pair == "tuned") & (rows.component == loc.top_component)] if loc.top_component else rows.iloc[:0]
        )
        t = top.iloc[0] if len(top) else None
        out["patching"] = {
            "n_prefixes": loc.n_prefixes,
            "gain": summary_dict(loc.gain),
            "gain_defined": loc.gain_defined,
            "sum_fraction": summary_dict(loc.sum_fraction),
            "all_fraction": summary_dict(loc.all_fraction),
            "top_component": None
            if t is None
            else {"component": t.component, **{k: _num(t[k]) for k in ("frac", "frac_lo", "frac_hi")}},
            "null_gain": summary_dict(loc.null_gain),
        }
        lens: dict[str, dict[str, dict]] = {}
        for x in r.diff_lens().itertuples():
            lens.setdefault(str(x.pair), {})[str(int(x.layer))] = {
                "diff": _num(x.steer_diff),
                "lo": _num(x.steer_lo),
                "hi": _num(x.steer_hi),
                "p_rank": _num(x.steer_p_rank),
                "n_random": None if _num(x.n_random) is None else int(x.n_random),
                "frac_of_gain": _num(x.frac_of_gain),
            }
        out["lens"] = lens
    if causal is not None:
        keys = ("dict_id", "pair", "layer", "intervention", "selection", "size", "n", "diff", "diff_lo", "diff_hi")
        out["causal"] = {
            set_id: {k: getattr(s, k) for k in (*keys, "hypothesis", "p_rank", "n_random")}
            for set_id, s in causal.sets.items()
        }
    return out


def _f(x: Any, fmt: str = "+.3f") -> str:
    return "n/a" if _num(x) is None else format(float(x), fmt)


def _ci(x: Mapping[str, Any] | None, fmt: str = "+.3f") -> str:
    if not x or _num(x.get("mean")) is None:
        return "undefined"
    return f"{_f(x['mean'], fmt)} (95% CI {_f(x.get('lo'), fmt)} to {_f(x.get('hi'), fmt)})"


def diffing_lines(d: Mapping[str, Any]) -> list[str]:
    """The diffing section as the text report prints it."""
    lines = []
    null = d.get("null")
    if null is not None and null.get("recipe") == "none":
        why = "; ".join(f"{k}: {v}" for k, v in (null.get("not_applicable") or {}).items()) or "no reason recorded"
        lines.append(f"diffing: no null control ({why})")
    elif null is not None:
        how = f"given {null['given']}" if null.get("recipe") == "given" else f"{null.get('steps')} GRPO steps"
        lines.append(f"diffing: null control {null.get('recipe')} ({how})")
    counts = d.get("counts") or {}
    tuned, other = counts.get("tuned", {}), counts.get("null", {})
    for layer in sorted({*tuned, *other}, key=int):
        t, n = tuned.get(layer), other.get(layer)
        parts = []
        for key, name in (("robust", "robust tuned-only"), ("tuned_only", "tuned-only"), ("base_only", "base-only"), ("shared", "shared"), ("dead", "dead")):  # fmt: skip
            parts.append(f"{name} {t[key] if t else 'n/a'}" + (f" (null {n[key]})" if n else ""))
        size = (t or n or {}).get("d_sae")
        lines.append(
            f"crosscoder layer {layer} ({size} latents): "
            + ", ".join(parts)
            + ("" if n else "; no null control" if not other else "; no null crosscoder at this layer")
        )
    p = d.get("patching")
    if p is not None:
        top = p.get("top_component")
        lines.append(
            f"component patching: tuned − base reward gain {_ci(p.get('gain'))} over {p.get('n_prefixes')} prefixes; "
            f"single components' fractions sum to {_ci(p.get('sum_fraction'), '.2f')}; all at once "
            f"{_ci(p.get('all_fraction'), '.2f')}"
            + (
                f"; top component {top['component']} {_f(top['frac'], '.2f')} (95% CI {_f(top['frac_lo'], '.2f')} "
                f"to {_f(top['frac_hi'], '.2f')})"
                if top
                else ""
            )
            + (f"; null control's gain {_ci(p['null_gain'])}" if p.get("null_gain") else "")
        )
    for pair, by in (d.get("lens") or {}).items():
        for layer, x in by.items():
            lines.append(
                f"difference lens layer {layer} ({pair}): steering the base model {_f(x['diff'])} (95% CI "
                f"{_f(x['lo'])} to {_f(x['hi'])}), rank p {_f(x['p_rank'], '.3g')} among {x['n_random']} random "
                f"directions; "
                + (
                    "fraction of the tuned gain undefined"
                    if _num(x["frac_of_gain"]) is None
                    else f"{float(x['frac_of_gain']):.0%} of the tuned gain"
                )
            )
    for set_id, x in (d.get("causal") or {}).items():
        lines.append(
            f"causal check {set_id} ({x['intervention']} {x['size']} latents of {x['dict_id']}, hypothesis "
            f"{x['hypothesis']}): reward change {_f(x['diff'])} (95% CI {_f(x['diff_lo'])} to {_f(x['diff_hi'])}), "
            f"rank p {_f(x['p_rank'], '.3g')} among {x['n_random']} random sets"
        )
    return lines
