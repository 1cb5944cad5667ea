"""Shared page pieces (not a page): what does not apply to a run and why (from every finished stage's
``not_applicable``), and the sequence probe's figures with their controls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.report import not_applicable
from lfp_core.seqreport import INPUT_NAMES
from lfp_core.store.stats import SequenceRole
from lfp_core.store.summaries import ProbesSummary
from views.common import md_code, md_text
from views.data import RunData

PART_NAMES = {
    "token_probe": "The per-token probe",
    "implicit_reward": "The implicit reward model",
    "contrastive_probe": "The contrastive probe",
    "token_attributions": "Per-token attributions",
}


def not_applicable_notes(data: RunData, stages: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """One note per part of a finished stage (of ``stages``; all when None) that does not apply to this run,
    with the stage's own reason; returns what was shown ({stage: {part: why}})."""
    wanted = None if stages is None else set(stages)
    shown = {k: v for k, v in not_applicable(data.stages()).items() if wanted is None or k in wanted}
    for stage, parts in shown.items():
        for part, why in parts.items():
            name = PART_NAMES.get(part, part.replace("_", " ").capitalize())
            st.info(f"**{md_text(name)}** ({md_code(stage)} stage) does not apply to this run: {md_text(why)}.")
    return shown


def _ci(x: Mapping[str, Any]) -> str:
    return f"{x.get('lo', float('nan')):.3f} to {x.get('hi', float('nan')):.3f}"


def sequence_role(pr: ProbesSummary, role: str) -> SequenceRole | None:
    """The sequence probe on ``role``'s (tuned or base) features, or None for a run without it."""
    seq = pr.sequence or {}
    return seq.get("tuned") if role == "tuned" else seq.get("base")


def sequence_table(x: SequenceRole) -> pd.DataFrame:
    """The probe, its controls and its baselines for one model, one row each, with ρ's CI over prompts and
    (baselines) the SAE probe's ρ minus theirs with its paired CI."""
    rows: list[tuple[str, Mapping[str, Any], Mapping[str, Any] | None]] = [
        ("SAE features (the probe)", x["probe"], None),
        ("shuffled targets (control)", x["shuffled"], None),
        ("untrained random map (control)", x["untrained"], None),
    ]
    rows += [(INPUT_NAMES.get(k, k), v, v.get("vs_probe")) for k, v in (x.get("inputs") or {}).items()]
    return pd.DataFrame(
        [
            {
                "input": name,
                "dims": s.get("dim"),
                "Spearman ρ": s.get("rho"),
                "95% CI low": s.get("lo"),
                "95% CI high": s.get("hi"),
                "Kendall τ": s.get("tau"),
                "R²": s.get("r2"),
                "SAE − it": None if vs is None else vs.get("diff"),
                "SAE − it, CI": None if vs is None else _ci(vs),
            }
            for name, s, vs in rows
        ]
    )


def sequence_section(data: RunData, pr: ProbesSummary, role: str, chart: bool) -> bool:
    """The sequence probe on ``role``'s features: headline metrics beside the controls, the table of
    baselines, the logistic variant, tuned − base, and (``chart``, or when the reader asks) held-out
    predictions against rewards. Returns False (drawing nothing) for a run without the sequence probe."""
    seq = pr.sequence or {}
    x = sequence_role(pr, role)
    if not x:
        return False
    st.subheader("Sequence probe: pooled SAE features → each completion's reward")
    st.markdown(
        f"Ridge from the {role} model's SAE features (layers {', '.join(map(str, seq.get('layers', [])))}; "
        f"{md_text(seq.get('pooling'))}) to the reward **{md_text(seq.get('reward'))}** of **{seq.get('n_completions')}** completions "
        f"(both policies) of {seq.get('n_prompts')} prompts. Held out {seq.get('split')}: **{seq.get('n_test')}** "
        f"completions of {seq.get('n_test_prompts')} prompts; penalty by {seq.get('penalty_cv')}."
    )
    p, sh, un = x["probe"], x["shuffled"], x["untrained"]
    c = st.columns(4)
    c[0].metric("ρ, sequence probe (held out)", f"{p['rho']:.3f}", help=f"95% CI over prompts {_ci(p)}")
    c[1].metric("ρ, sequence probe, shuffled targets", f"{sh['rho']:.3f}", help=f"95% CI {_ci(sh)}")
    c[2].metric("ρ, sequence probe, untrained map", f"{un['rho']:.3f}", help=f"95% CI {_ci(un)}")
    c[3].metric("R², sequence probe (held out)", "n/a" if p.get("r2") is None else f"{p['r2']:.3f}")
    st.dataframe(sequence_table(x), hide_index=True, width="stretch")
    notes = [
        "CIs: percentile bootstrap over held-out prompts (a prompt's completions are resampled together); "
        "p-values of ρ and τ treat completions as independent, the CI does not. 'SAE − it': the probe's ρ minus "
        "the baseline's on the same completions, paired CI."
    ]
    lg = x.get("logistic") or {}
    if lg:
        notes.append(
            f"Logistic variant (reward above the training median {lg['threshold']:.3f}): accuracy {lg['acc']:.3f} "
            f"(CI {_ci(lg)}) vs the majority class {lg['majority_acc']:.3f}; difference {lg['diff']:+.3f} "
            f"(CI {lg['diff_lo']:+.3f} to {lg['diff_hi']:+.3f})."
        )
    pol = x.get("by_policy") or {}
    if pol:
        notes.append(
            "Within one policy's completions: "
            + "; ".join(f"{k} ρ {v['rho']:.3f} (CI {_ci(v)}, {v['n']} completions)" for k, v in pol.items())
            + " (the 'which policy wrote it' baseline above says how much of ρ that alone gives)."
        )
    d = seq.get("difference") or {}
    if d:
        notes.append(
            f"Tuned − base model features, same held-out completions: ρ {d['diff']:+.3f} (paired CI "
            f"{d['lo']:+.3f} to {d['hi']:+.3f})."
        )
    st.caption(" ".join(notes))
    if chart or st.toggle("Show the held-out predictions", key=f"seq_scatter_{role}"):
        st.plotly_chart(viz.sequence_scatter(data.probe_sequences(role), p), width="stretch")
    return True
