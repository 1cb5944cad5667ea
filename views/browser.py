"""Feature browser: every feature of the run in one sortable, filterable table — density, max
activation, base-vs-tuned frequency shift, probe weight and attribution rank, label — with text search
over labels and top tokens and a link per row to the feature page."""

from __future__ import annotations

import streamlit as st

from lfp_core.store import FEATURE_SORTS
from views.common import feature_url, require_feature_layers, require_run
from views.data import RunData

run_dir = require_run()
data = RunData(run_dir)
st.title("Feature browser")
layers = require_feature_layers(data)
total = int(layers.n_features.sum())
SORT_LABELS = {
    "probe_rank": "probe attribution rank",
    "probe_weight": "|probe weight|",
    "density": "density",
    "max_act": "max activation",
    "freq_shift": "|tuned − base frequency|",
    "feature": "feature id",
    "layer": "layer",
}
assert set(SORT_LABELS) == set(FEATURE_SORTS)
by_label = {v: k for k, v in SORT_LABELS.items()}

c = st.columns([1.2, 1, 2.5, 1.3])
role = c[0].selectbox("Model", ["all"] + list(dict.fromkeys(layers.role)), key="fb_role")
layer = c[1].selectbox("Layer", ["all"] + [str(x) for x in sorted(set(layers.layer))], key="fb_layer")
search = c[2].text_input(
    "Search labels and top tokens", key="fb_search", max_chars=200, placeholder="e.g. great, awful, negation"
)
min_density = c[3].number_input(
    "Min density", min_value=0.0, max_value=1.0, value=0.0, step=0.0001, format="%.4f", key="fb_min_density"
)
DESCENDING_FIRST = ("probe_weight", "density", "max_act", "freq_shift")  # largest first is what one wants


def _natural_direction() -> None:
    st.session_state.fb_desc = by_label[st.session_state.fb_sort] in DESCENDING_FIRST


c = st.columns([2, 1, 1, 1])
sort = by_label[c[0].selectbox("Sort by", list(by_label), key="fb_sort", on_change=_natural_direction)]
descending = c[1].toggle("Descending", value=sort in DESCENDING_FIRST, key="fb_desc")
relevant_only = c[2].toggle(
    "Reward-related only",
    key="fb_relevant",
    help="Features the labeller classified as related to the task's reward (labels stage).",
)
per_page = int(c[3].selectbox("Rows", ["50", "100", "250"], key="fb_rows"))

page = int(st.session_state.get("fb_page", 1))
df, n = data.feature_table(
    role=None if role == "all" else role,
    layer=None if layer == "all" else int(layer),
    search=search,
    min_density=float(min_density),
    relevant_only=relevant_only,
    sort=sort,
    descending=descending,
    limit=per_page,
    offset=(page - 1) * per_page,
)
pages = max(1, -(-n // per_page))
if page > pages:  # the filters shrank the result: back to the first page
    st.session_state.fb_page = page = 1
    df, n = data.feature_table(
        role=None if role == "all" else role,
        layer=None if layer == "all" else int(layer),
        search=search,
        min_density=float(min_density),
        relevant_only=relevant_only,
        sort=sort,
        descending=descending,
        limit=per_page,
        offset=0,
    )
st.caption(f"**{n:,}** of {total:,} features match · page {page} of {pages}")
if df.empty:
    st.info(
        "No feature matches these filters."
        + (" No feature has a label yet: run the labels stage." if relevant_only else "")
    )
else:
    df = df.assign(
        open=[feature_url(run_dir, r.role, r.layer, r.feature) for r in df.itertuples()],
        top_tokens=[" · ".join(t) if t is not None else "" for t in df.top_tokens],
        probe_rank=df.probe_rank + 1,
    )
    st.dataframe(
        df[
            [
                "open",
                "role",
                "layer",
                "feature",
                "density",
                "max_act",
                "freq_shift",
                "probe_weight",
                "probe_rank",
                "label",
                "top_tokens",
            ]
        ],
        hide_index=True,
        width="stretch",
        height=min(len(df), 20) * 35 + 38,
        key="fb_table",
        column_config={
            "open": st.column_config.LinkColumn("page", display_text="open", width="small"),
            "density": st.column_config.NumberColumn(format="%.4f"),
            "max_act": st.column_config.NumberColumn("max act", format="%.3f"),
            "freq_shift": st.column_config.NumberColumn(
                "tuned − base freq", format="%+.4f", help="firing rate on tuned-policy minus base-model completions"
            ),
            "probe_weight": st.column_config.NumberColumn("probe weight", format="%+.4f"),
            "probe_rank": st.column_config.NumberColumn("probe rank", help="1 = largest |weight × mean activation|"),
            "top_tokens": st.column_config.TextColumn("top tokens", width="large"),
        },
    )
st.number_input("Page", min_value=1, max_value=pages, step=1, key="fb_page")
