"""Labels: what each labelled feature responds to (LLM or offline labeller), whether the labeller calls it
reward-related, how well its explanation predicts held-out activations, and whether the labeller's
reward-related features are the probe's (frequency table and overlap)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.store.summaries import LabelsSummary
from views.common import feature_url, md_text, require_run, require_stage
from views.data import RunData

run_dir = require_run()
data = RunData(run_dir)
st.title("Labels")
d = require_stage(data, LabelsSummary, "feature labels")
labels = data.labels("tuned")
who = d.labeller or "?"
if who.startswith("offline"):
    st.info(
        f"Labeller: **{md_text(who)}**. These labels are computed without any LLM: the explanation lists the tokens the "
        "feature fires on most in its top examples; relevance is the rank correlation of its activation with "
        "|VADER valence| on held-out windows. "
        "Run `python -m lfp_core.precompute --out RUN --labeller openai` with OPENAI_API_KEY set for LLM labels."
    )
else:
    st.caption(f"Labeller: **{md_text(who)}** (answers cached in the run; a re-run sends no repeated requests).")
c = st.columns(4)
c[0].metric("Labelled features", d.n_labelled or 0, help=f"{d.n_skipped_no_examples or 0} skipped: no examples")
c[1].metric("Reward-related", d.n_relevant or 0)
acc = d.detection_acc_mean
c[2].metric(
    "Detection accuracy (mean)",
    "n/a" if acc is None else f"{acc:.3f}",
    help="held-out activating vs non-activating excerpts; 0.5 = chance"
    + (
        f"; {d.n_not_detection_scored} features not scored (no held-out activating window)"
        if d.n_not_detection_scored
        else ""
    ),
)
ov = d.overlap
c[3].metric(
    "Overlap with probe top",
    f"{ov.get('n', 0)} of {ov.get('n_flagged', 0)}",
    help=f"expected by chance {ov.get('expected') or 0:.1f}; hypergeometric p = {ov.get('p') or float('nan'):.1e}",
)
if d.n_score_docs is not None:
    held = (
        f"windows from the {d.n_score_docs} documents of the activation corpus that hold none of the probe's "
        f"points ({d.n_probe_docs} do), never from a document among the feature's own top examples"
    )
else:
    held = (
        "windows that may share documents with the explainer's examples and with the probe's text (a run made "
        "before held-out scoring)"
    )
relevance = (
    "the Spearman correlation of the feature's activation with the |VADER valence| of each token's word over "
    f"the activating {held}"
    if who.startswith("offline")
    else "the LLM's yes/no on whether the explanation (written from the top examples) concerns the reward's topic"
)
overlap = (
    "Both the labeller's relevance and the probe's ranking read word valence (on disjoint text), so a large overlap "
    "shows two readings of valence agree: consistency, not independent validation."
    if who.startswith("offline")
    else "The LLM judges explanations; the probe reads word valence: agreement is across two different readings."
)
st.markdown(
    "**What each figure tests.** *Explanation*: written from the feature's top examples only (the explain set). "
    f"*Reward-related*: {relevance}. *Detection accuracy*: whether the explanation picks the excerpts where the "
    f"feature fires among excerpts where it never fires, on {held}. *Overlap with probe top*: how many reward-related "
    f"features are among the probe's top-ranked, against random draws from the labelled set. {overlap}"
)

st.subheader("Do the labeller's reward-related features fire on high-reward text?")
freq = pd.DataFrame(d.frequency)
if not freq.empty:
    st.plotly_chart(viz.label_frequency_bars(freq), width="stretch")
    st.dataframe(
        freq.rename(
            columns={
                "freq_high": "fires on high-reward",
                "freq_low": "fires on low-reward",
                "p": "Wilcoxon p",
                "n_high": "high-reward completions",
                "n_low": "low-reward completions",
            }
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "Share of the tuned policy's held-out completions (top vs bottom quartile by VADER reward) on which a "
        "feature fires at least once, averaged over the features of each set; p from a paired Wilcoxon test "
        f"over the set's features. Overlap: {ov.get('n', 0)} of the {ov.get('n_flagged', 0)} reward-related "
        f"features are among the {ov.get('n_probe_top', 0)} probe-top ones of the {ov.get('n_labelled', 0)} "
        f"labelled (p = {ov.get('p') or float('nan'):.1e})."
    )

st.subheader("Explanations")
c = st.columns([1, 2])
which = c[0].radio("Show", ["all", "reward-related", "not related"], horizontal=True, key="lb_filter")
needle = c[1].text_input("Search explanations", key="lb_search", max_chars=200).strip().lower()
shown = labels
if which != "all":
    rel = shown.relevant.fillna(False).astype(bool)
    shown = shown[rel if which == "reward-related" else (shown.relevant.notna() & ~rel)]
if needle:
    shown = shown[shown.explanation.fillna("").str.lower().str.contains(needle, regex=False)]
if shown.empty:
    st.info("No label matches.")
else:
    st.dataframe(
        shown.assign(
            page=[feature_url(run_dir, "tuned", a, b) for a, b in zip(shown.layer, shown.feature)],
            probe_rank=shown.probe_rank + 1,
        )[
            [
                "page",
                "layer",
                "feature",
                "selection",
                "explanation",
                "relevant",
                "detection_acc",
                "detection_f1",
                "probe_rank",
                "density",
            ]
        ],
        hide_index=True,
        width="stretch",
        key="lb_table",
        column_config={
            "page": st.column_config.LinkColumn("page", display_text="open", width="small"),
            "detection_acc": st.column_config.NumberColumn("detection acc", format="%.2f"),
            "detection_f1": st.column_config.NumberColumn("F1", format="%.2f"),
            "density": st.column_config.NumberColumn(format="%.4f"),
        },
    )
