"""Separation: do SAE features separate positive from negative reviews, chosen from rejected HH
responses, toxic from non-toxic tweets? Logistic probes on mean-pooled features (with raw
activations and the majority class for reference) and a PCA view."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.store.summaries import ProbeRoleSummary, ProbesSummary
from views.common import md_text, require_run, require_stage
from views.data import RunData
from views.seqprobe import not_applicable_notes, sequence_role

run_dir = require_run()
data = RunData(run_dir)
st.title("Separation")
pr = require_stage(data, ProbesSummary, "probes")
rows = []
for role in ("tuned", "base"):
    for task, r in ((pr.role(role) or ProbeRoleSummary()).logistic or {}).items():
        rows.append(
            {
                "model": role,
                "task": task,
                "accuracy (SAE features)": r["acc"],
                "95% CI low": r["ci_low"],
                "95% CI high": r["ci_high"],
                "raw activations": r["raw_acc"],
                "majority class": r["majority_acc"],
                "test texts": r["n_test"],
            }
        )
not_applicable_notes(data, ("probes",))


def sequence_logistic() -> None:
    """The sequence probe's logistic variant (reward above vs below the training median), when the run has it."""
    seq_rows = [
        {
            "model": role,
            **{k: lg.get(k) for k in ("acc", "lo", "hi", "majority_acc", "diff", "diff_lo", "diff_hi", "n")},
        }
        for role in ("tuned", "base")
        if (lg := (sequence_role(pr, role) or {}).get("logistic"))
    ]
    if not seq_rows:
        return
    seq = pr.sequence or {}
    st.subheader(f"Sequence probe, logistic variant: reward ({seq.get('reward')}) above vs below the median")
    st.dataframe(pd.DataFrame(seq_rows), hide_index=True, width="stretch")
    st.caption(
        "Each completion's SAE features averaged over its tokens; an L2 logistic regression (penalty by CV grouped "
        f"by prompt) fitted on the training prompts, scored on {seq.get('n_test')} completions of "
        f"{seq.get('n_test_prompts')} held-out prompts. acc / majority_acc with 95% bootstrap CIs over prompts "
        "(lo, hi; diff = acc − majority_acc, paired CI diff_lo to diff_hi). The ridge version, its controls and "
        "baselines are on the Token scores page."
    )


if not rows:
    sequence_logistic()
    st.info(
        "This run's corpus has no labelled texts (no IMDB reviews: IMDB was not reachable when it was built, "
        "or the run was given its own corpus), so there is nothing to separate."
    )
    st.stop()
st.subheader("Logistic probes (held-out accuracy)")
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption(
    "Each text's SAE features (selected layers, concatenated) are averaged over its tokens; an L2 logistic "
    "regression (penalty by 3-fold CV) is fitted on 70% of the texts and scored on the rest. The 95% CI is "
    "Wilson's. 'raw activations': the same probe on the averaged activations the SAEs read (the MLP "
    "outputs unless the run harvested another hook)."
)
left, right = st.columns(2)
role = left.radio("Model", ["tuned", "base"], horizontal=True, key="sep_role")
probe = pr.role(role) or ProbeRoleSummary()
ratios = probe.pca_var_ratio_by_task or {"imdb": probe.pca_var_ratio or []}
names = {"imdb": "IMDB pos/neg", "hh": "HH chosen/rejected", "toxicity": "toxic/non-toxic"}
task = right.radio(
    "Texts",
    list(ratios),
    format_func=lambda t: md_text(names.get(t, t)),  # option labels are markdown: run text escaped
    horizontal=True,
    key="sep_task",
)
pca = data.probe_pca(role, task)
st.subheader("PCA of the mean-pooled SAE features")
st.plotly_chart(viz.pca_scatter(pca, ratios[task]), width="stretch")
sequence_logistic()  # after the separation probes (schema 6 runs)
