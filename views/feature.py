"""Feature: one SAE feature as a researcher inspects it — density, activation histogram, top and
interval contexts (tokens shaded by activation), logit effects, decoder neighbours, base vs tuned
firing frequency, probe weight and label. Deep link: ``feature?run=…&role=…&layer=…&feature=…``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import pandas as pd
import streamlit as st

from lfp_core import viz
from views.common import feature_url, md_code, md_text, require_feature_layers, require_run
from views.data import RunData

run_dir = require_run()
data = RunData(run_dir)
st.title("Feature")
layers = require_feature_layers(data)
n_of = {(r.role, int(r.layer)): int(r.n_features) for r in layers.itertuples()}
roles = list(dict.fromkeys(layers.role))
T = TypeVar("T")


def _param(name: str, allowed: Sequence[T], outside: str | None = None) -> tuple[T | None, str | None]:
    """A query parameter checked against ``allowed`` (ints parsed); (value, None), (None, message) or
    (None, None) when absent. ``outside`` replaces the message for a value not in ``allowed``."""
    raw = st.query_params.get(name)
    if raw is None:
        return None, None
    value: object = raw
    if isinstance(allowed[0], int):
        try:
            value = int(raw)
        except ValueError:
            return None, f"The link's `{name}` must be a whole number; it is {md_code(repr(raw[:40]))}."
    if value not in allowed:
        return None, (outside or "The link's `{name}` {value} is not in this run (choose from {allowed})").format(
            name=name, value=md_code(repr(str(value)[:40])), allowed=md_text(", ".join(map(str, allowed[:12])))
        ) + "."
    return next(a for a in allowed if a == value), None  # the allowed item equal to value (a T)


# --- which feature: query params (deep link) -> widget state; widgets -> query params ---------------------
errors = []
q_role, e = _param("role", roles)
errors += [e] if e else []
role = str(q_role or roles[0])
role_layers = sorted(layer for r, layer in n_of if r == role)
q_layer, e = _param("layer", role_layers)
errors += [e] if e else []
layer = int(q_layer) if isinstance(q_layer, int) else role_layers[0]
n_feat = n_of[(role, layer)]
q_feat, e = _param(
    "feature",
    list(range(n_feat)),
    f"Feature {{value}} is out of range: the {md_text(role)} model's layer-{layer} SAE has {n_feat} features "
    f"(0–{n_feat - 1})",
)
errors += [e] if e else []
wanted = (role, layer, q_feat if q_feat is not None else 0)
if st.session_state.get("feat_synced") != wanted:  # a new link: its values win over old widget state
    st.session_state.update(feat_role=wanted[0], feat_layer=str(wanted[1]), feat_id=wanted[2], feat_synced=wanted)


def _sync() -> None:
    r, ly = st.session_state.feat_role, int(st.session_state.feat_layer)
    if (r, ly) not in n_of:  # role changed to one without this layer: its first layer
        ly = min(x for rr, x in n_of if rr == r)
        st.session_state.feat_layer = str(ly)
    f = min(max(int(st.session_state.feat_id), 0), n_of[(r, ly)] - 1)
    st.session_state.feat_id = f
    st.session_state.feat_synced = (r, ly, f)
    st.query_params.update(role=r, layer=str(ly), feature=str(f))


def _step(delta: int) -> None:
    st.session_state.feat_id = int(st.session_state.feat_id) + delta
    _sync()


for msg in errors:
    st.error(msg)
c = st.columns([2, 2, 2, 1, 1])
c[0].radio("Model", roles, horizontal=True, key="feat_role", on_change=_sync, format_func=md_text)
c[1].selectbox(
    "Layer",
    [str(x) for x in sorted(x for r, x in n_of if r == st.session_state.feat_role)],
    key="feat_layer",
    on_change=_sync,
)
role, layer = st.session_state.feat_role, int(st.session_state.feat_layer)
n_feat = n_of[(role, layer)]
c[2].number_input(
    f"Feature (0–{n_feat - 1})", min_value=0, max_value=n_feat - 1, step=1, key="feat_id", on_change=_sync
)
c[3].button("◀ prev", on_click=_step, args=(-1,), disabled=st.session_state.feat_id <= 0, key="feat_prev")
c[4].button("next ▶", on_click=_step, args=(1,), disabled=st.session_state.feat_id >= n_feat - 1, key="feat_next")
fid = int(st.session_state.feat_id)
if errors:
    st.stop()

found = data.feature(role, layer, fid)
if found is None:
    st.error(f"Feature {fid} of the {md_text(role)} model's layer-{layer} SAE is not in this run.")
    st.stop()
    raise AssertionError("unreachable")  # st.stop raises
f: dict = found

# --- headline -------------------------------------------------------------------------------------------
density = f["density"]
kind = "dead" if f["n_fired"] == 0 else "dense" if density > 0.1 else "sparse" if density > 1e-3 else "rare"
st.subheader(f"{md_text(role)} · layer {layer} · feature {fid}")
colour: dict[str, Literal["gray", "orange", "blue", "violet"]] = {
    "dead": "gray",
    "dense": "orange",
    "sparse": "blue",
    "rare": "violet",
}
st.badge(f"{kind}: fires on {density:.3%} of tokens", color=colour[kind])
m = st.columns(5)
m[0].metric("Density", f"{density:.4%}", help=f"{int(f['n_fired']):,} firing tokens")
m[1].metric("Max activation", f"{f['max_act']:.3f}")
m[2].metric("Mean when firing", f"{f['mean_act']:.3f}")
fb, ft = f.get("freq_base_text"), f.get("freq_tuned_text")
if fb is not None and ft is not None and pd.notna(fb) and pd.notna(ft):
    m[3].metric("Fires on base-model text", f"{fb:.2%}")
    m[4].metric(
        "Fires on tuned-policy text",
        f"{ft:.2%}",
        delta=f"{(ft - fb) * 100:+.2f} pts",
        help="Share of completion tokens (base model's vs tuned policy's completions of the same prompts)",
    )

if f.get("labeller") and pd.notna(f.get("labeller")):
    rel = "" if pd.isna(f.get("relevant")) else (" · **related to the reward**" if f["relevant"] else " · not related")
    acc = "" if pd.isna(f.get("detection_acc")) else f" · detection accuracy {f['detection_acc']:.2f}"
    st.markdown(f"**Label** ({md_text(f['labeller'])}): {md_text(f['explanation'])}{rel}{acc}")
else:
    st.caption("No label yet: the labels stage labels features with an LLM or the offline labeller.")
if pd.notna(f.get("probe_weight")):
    st.markdown(
        f"**Probe** (VADER ridge probe on the {md_text(role)} model): weight **{f['probe_weight']:+.4f}**, "
        f"attribution rank **{int(f['probe_rank']) + 1}** by |weight × mean activation| "
        f"= {f['probe_importance']:.4f}."
    )


@st.fragment
def histogram_and_effects() -> None:
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Non-zero activations**")
        st.plotly_chart(
            viz.activation_histogram(list(f["hist_counts"]), f["max_act"]), width="stretch", key="feat_hist"
        )
    with right:
        st.markdown("**Logit effects** (W_dec · W_U)")
        up = pd.DataFrame({"promotes": list(f["top_logit_tokens"]), "logit": list(f["top_logit_values"])})
        down = pd.DataFrame({"suppresses": list(f["bottom_logit_tokens"]), "logit": list(f["bottom_logit_values"])})
        a, b = st.columns(2)
        a.dataframe(up, hide_index=True, width="stretch")
        b.dataframe(down, hide_index=True, width="stretch")


@st.fragment
def contexts() -> None:
    top = data.feature_examples(role, layer, fid, "top")
    st.markdown("**Top-activating contexts** (one per document; hover a token for its activation)")
    if top.empty:
        st.info("This feature never fired on the harvested corpus.")
        return
    st.markdown(
        "".join(
            viz.activation_context_html(list(r.tokens), list(r.acts), int(r.center), f["max_act"])
            for r in top.itertuples()
        ),
        unsafe_allow_html=True,
    )
    iv = data.feature_examples(role, layer, fid, "interval")
    if not iv.empty:
        with st.expander("Samples from equal-width activation intervals"):
            width = f["max_act"] / 10
            for k, g in iv.groupby("interval", sort=False):
                st.caption(f"interval {int(k) + 1}: {int(k) * width:.3f}–{(int(k) + 1) * width:.3f}")
                st.markdown(
                    "".join(
                        viz.activation_context_html(list(r.tokens), list(r.acts), int(r.center), f["max_act"])
                        for r in g.itertuples()
                    ),
                    unsafe_allow_html=True,
                )


histogram_and_effects()
contexts()
nb = list(f["neighbours"])
if nb:
    st.markdown(
        "**Nearest decoder directions** (cosine): "
        + " · ".join(
            f"[{int(n)}]({feature_url(run_dir, role, layer, int(n))}) {cs:.2f}" for n, cs in zip(nb, f["neighbour_cos"])
        )
    )
