"""The report's sequence-probe section and its list of what does not apply to a run (split from
:mod:`lfp_core.report`, which calls these). Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INPUT_NAMES = {
    "raw_selected": "raw activations the SAEs read, mean-pooled",
    "token_embedding": "input embeddings of the completion's tokens, mean-pooled",
    "length": "completion length (tokens)",
    "policy": "which policy wrote it (base or tuned)",
}


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def _score(x: Mapping[str, Any]) -> str:
    """ρ with its bootstrap CI over prompts, then τ and R²."""
    return (
        f"Spearman ρ {_f(x.get('rho'))} ({x.get('level', 0.95):.0%} CI over {x.get('n_prompts')} held-out prompts "
        f"{_f(x.get('lo'))} to {_f(x.get('hi'))}; p {_f(x.get('p'), '.1e')} treating completions as independent), "
        f"Kendall τ {_f(x.get('tau'))}" + (f", R² {_f(x['r2'])}" if x.get("r2") is not None else "")
    )


def sequence_lines(seq: Mapping[str, Any]) -> list[str]:
    """The sequence probe's figures, each beside its controls, as the text report prints them."""
    lines = [
        f"sequence probe (reward {seq.get('reward')}): ridge from SAE features ({seq.get('pooling')}) to each "
        f"completion's reward; {seq.get('n_completions')} completions of {seq.get('n_prompts')} prompts, held out "
        f"{seq.get('split')} ({seq.get('n_test')} completions of {seq.get('n_test_prompts')} prompts), penalty by "
        f"{seq.get('penalty_cv')}"
    ]
    for role in ("tuned", "base"):
        x = seq.get(role)
        if not x:
            continue
        p = x["probe"]
        lines.append(f"  {role}-model features ({p.get('dim')} dims): held-out {_score(p)}")
        lines.append(
            f"    controls: shuffled targets ρ {_f(x['shuffled']['rho'])} (CI {_f(x['shuffled']['lo'])} to "
            f"{_f(x['shuffled']['hi'])}); untrained random map ρ {_f(x['untrained']['rho'])} (CI "
            f"{_f(x['untrained']['lo'])} to {_f(x['untrained']['hi'])})"
        )
        for name, b in (x.get("inputs") or {}).items():
            v = b.get("vs_probe") or {}
            lines.append(
                f"    baseline, {INPUT_NAMES.get(name, name)} → the same ridge ({b.get('dim')} dims): ρ {_f(b['rho'])} "
                f"(CI {_f(b['lo'])} to {_f(b['hi'])}); SAE probe − it {_f(v.get('diff'), '+.3f')} (paired CI "
                f"{_f(v.get('lo'), '+.3f')} to {_f(v.get('hi'), '+.3f')})"
            )
        lg = x.get("logistic")
        if lg:
            lines.append(
                f"    logistic (reward above the training median {_f(lg['threshold'])}): accuracy {_f(lg['acc'])} "
                f"(CI {_f(lg['lo'])} to {_f(lg['hi'])}) vs majority class {_f(lg['majority_acc'])}; difference "
                f"{_f(lg['diff'], '+.3f')} (paired CI {_f(lg['diff_lo'], '+.3f')} to {_f(lg['diff_hi'], '+.3f')})"
            )
        pol = x.get("by_policy") or {}
        if pol:
            lines.append(
                "    within one policy's completions: "
                + "; ".join(
                    f"{k} ρ {_f(v['rho'])} (CI {_f(v['lo'])} to {_f(v['hi'])}, n {v['n']})" for k, v in pol.items()
                )
            )
    d = seq.get("difference")
    if d:
        lines.append(
            f"sequence probe, tuned − base model features over the same held-out completions: ρ "
            f"{_f(d['diff'], '+.3f')} ({d.get('level', 0.95):.0%} paired bootstrap CI over prompts "
            f"{_f(d['lo'], '+.3f')} to {_f(d['hi'], '+.3f')})"
        )
    return lines
