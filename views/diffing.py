"""Model diffing: what fine-tuning changed, each figure of the fine-tune beside the null control's (the same
recipe with an uninformative reward). Crosscoder latent classes per layer, relative decoder norms, latent
scaling of the tuned-only latents, a latent table linking to each latent's Feature page, component patching,
the activation-difference lens with its steering check, and the causal checks against random latents."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st

from lfp_core import diffviz, viz
from lfp_core.diffviz import pair_name
from lfp_core.settings import DiffingSettings
from lfp_core.store.summaries import (
    CrosscodersSummary,
    DiffCausalSummary,
    Interval,
    LocalisationSummary,
    NullSummary,
    StageSummary,
)
from views.common import feature_url, md_code, md_text, require_run
from views.data import RunData

run_dir = require_run()
data = RunData(run_dir)
st.title("Model diffing")
st.caption(
    "What fine-tuning changed, where, and whether it matters for the reward. Each figure of the fine-tune "
    "(base vs tuned) stands beside the null control's (base vs a model fine-tuned by the same recipe with "
    "an uninformative reward): a change the null shows as much is the recipe's, not the reward's."
)
CLASSES = ["robust tuned-only", "tuned-only", "base-only", "shared", "dead"]


def _missing(kind: type[StageSummary], what: str) -> None:
    """Say which stage computes ``what`` and how (the page goes on with its other sections)."""
    st.info(
        f"No {what} yet: the `{kind.STAGE}` stage has not finished. Compute it (finished stages are kept) with "
        f"{md_code(f'python -m lfp_core.precompute --out {run_dir} --until {kind.STAGE}')}."
    )


def _num(x: Any) -> float | None:
    """A stored number, or None for NULL / NaN."""
    if x is None or x is pd.NA:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _ci(mean: Any, lo: Any, hi: Any, fmt: str = "+.3f") -> str:
    """``mean (95% CI lo to hi)``; 'undefined' without a mean."""
    m, a, b = _num(mean), _num(lo), _num(hi)
    if m is None:
        return "undefined"
    return f"{m:{fmt}}" + ("" if a is None or b is None else f" (95% CI {a:{fmt}} to {b:{fmt}})")


def _interval(x: Interval | None, fmt: str = "+.3f") -> str:
    return "not recorded" if x is None else _ci(x.mean, x.lo, x.hi, fmt)


def _tokens(tokens: Any) -> str:
    return ", ".join(md_code(t) for t in list(tokens if tokens is not None else [])) or "none"


null = data.summary(NullSummary)
cc = data.summary(CrosscodersSummary)
loc = data.summary(LocalisationSummary)
causal = data.summary(DiffCausalSummary)
has_null = null is not None and null.recipe not in (None, "none")
NO_NULL = "this run has no null control (see above)"

# --- the null control -------------------------------------------------------------------------------
st.header("The null control")
if null is None:
    _missing(NullSummary, "null control")
elif null.recipe == "none":
    why = "; ".join(f"{md_text(k)}: {md_text(v)}" for k, v in null.not_applicable.items()) or "no reason recorded"
    st.info(
        f"This run has no null control ({why}). Without it, nothing below can be compared with what a "
        "fine-tune by the same recipe with an uninformative reward changes."
    )
else:
    trained = f"{null.steps} steps; mean reward it saw: first step {_ci(null.first_reward, None, None, '.3f')}, last 10 steps {_ci(null.last10_reward, None, None, '.3f')}"
    st.markdown(
        {
            "shuffled": "Null recipe **shuffled**: the rlhf stage's GRPO recipe (same steps, prompts and seed) "
            f"with each step's rewards shuffled across its completions ({trained}).",
            "constant": "Null recipe **constant**: the rlhf stage's GRPO recipe with a constant reward (every "
            f"advantage is 0, so only the KL term moves the policy: it stays near the base model; {trained}).",
            "given": f"Null recipe **given**: {md_code(null.given or '')}, a model fine-tuned by the same recipe "
            "with an uninformative reward (not trained here).",
        }.get(str(null.recipe), f"Null recipe {md_code(null.recipe)}.")
    )

# --- (a) headline: latent classes per layer -----------------------------------------------------------
st.header("Robust tuned-only latents")
dicts = data.diff_dictionaries() if cc is not None else pd.DataFrame()
cc_dicts = dicts[dicts.kind == "crosscoder"] if not dicts.empty else dicts
defaults = DiffingSettings()
thr = cc.thresholds if cc is not None else {}
tuned_only, nu_max = thr.get("tuned_only", defaults.tuned_only), thr.get("nu_max", defaults.nu_max)
if cc is None:
    _missing(CrosscodersSummary, "crosscoders")
elif cc_dicts.empty:
    st.info("The crosscoders stage finished but stored no crosscoder.")
else:
    lines = []
    for layer, g in cc_dicts.groupby("layer"):
        by = {r.pair: r for r in g.itertuples()}
        t, n = by.get("tuned"), by.get("null")
        head = (
            f"- **Layer {int(layer)}**: **{t.n_robust}** robust tuned-only latents of {t.d_sae} for the fine-tune"
            if t is not None
            else f"- **Layer {int(layer)}**: no fine-tune crosscoder"
        )
        tail = (
            f", **{n.n_robust}** of {n.d_sae} for the null control"
            if n is not None
            else (", no null crosscoder at this layer" if has_null else "; no null control to compare with")
        )
        lines.append(head + tail)
    st.markdown("\n".join(lines))
    table = cc_dicts.assign(pair=cc_dicts.pair.map(pair_name))[
        [
            "layer",
            "pair",
            "n_robust",
            "n_tuned_only",
            "n_base_only",
            "n_shared",
            "n_dead",
            "d_sae",
            "fvu_base",
            "fvu_other",
        ]
    ]
    st.dataframe(
        table.rename(
            columns={
                "pair": "compared with base",
                "n_robust": "robust tuned-only",
                "n_tuned_only": "tuned-only (not robust)",
                "n_base_only": "base-only",
                "n_shared": "shared",
                "n_dead": "dead",
                "d_sae": "latents",
                "fvu_base": "FVU base",
                "fvu_other": "FVU other",
            }
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        f"Classes (exclusive): relative decoder norm r = ‖d_other‖/(‖d_base‖+‖d_other‖) > {tuned_only:g} is "
        f"tuned-only, < {1 - tuned_only:g} base-only, else shared; a tuned-only latent with both latent-scaling "
        f"ratios ν^ε and ν^r below {nu_max:g} is robust tuned-only (the base model's activations explain little "
        "of it); dead latents never fire on held-out tokens. FVU: held-out fraction of variance unexplained per "
        "model." + ("" if thr else " (The stage recorded no thresholds: the defaults are shown.)")
    )

# --- (b) relative decoder norms, (c) latent scaling ------------------------------------------------------
latents = data.diff_latents() if cc is not None else pd.DataFrame()
cc_lat = latents[latents.kind == "crosscoder"] if not latents.empty else latents
if not cc_lat.empty:
    st.subheader("Relative decoder norms")
    layers = sorted(int(x) for x in cc_lat.layer.unique())
    cols = st.columns(min(2, len(layers)))
    for i, layer in enumerate(layers):
        with cols[i % len(cols)]:
            st.markdown(f"**Layer {layer}**")
            fig = diffviz.rel_norm_histogram(cc_lat[cc_lat.layer == layer], tuned_only)
            st.plotly_chart(fig, width="stretch", key=f"dd_hist_{layer}")
    st.caption(
        "Crosscoder latents by relative decoder norm, the null control's overlaid on the fine-tune's; dotted: "
        "the class boundaries. " + ("" if has_null else f"No null overlay: {NO_NULL}.")
    )
    st.subheader("Latent scaling of the tuned-only latents")
    tuned_lat = cc_lat[cc_lat["class"].isin(["tuned-only", "robust tuned-only"])]
    if tuned_lat.dropna(subset=["nu_eps", "nu_r"]).empty:
        st.info("No tuned-only latent has latent-scaling ratios (ν^ε, ν^r) stored.")
    else:
        st.plotly_chart(diffviz.nu_scatter(tuned_lat, nu_max), width="stretch", key="dd_nu")
        st.caption(
            "ν^ε: the base model's share of the latent through its reconstruction error, ν^r: through its "
            f"reconstruction (latent scaling, Minder et al. 2025). Robust tuned-only: both below {nu_max:g} "
            "(dotted box). Circles: fine-tune; crosses: null control."
            + ("" if has_null else f" No null latents: {NO_NULL}.")
        )

# --- (d) the latent table ------------------------------------------------------------------------------
if not dicts.empty:
    st.subheader("Latents")
    kinds = {"crosscoder": "crosscoder", "diff_sae": "difference SAE"}
    c1, c2, c3, c4 = st.columns(4)
    kind = c1.radio(
        "Dictionary",
        [k for k in kinds if k in set(dicts.kind)],
        format_func=lambda k: kinds[k],
        key="dd_kind",
        horizontal=True,
    )
    of_kind = dicts[dicts.kind == kind]
    pair = c2.selectbox("Compared with base", list(dict.fromkeys(of_kind.pair)), format_func=pair_name, key="dd_pair")
    layer = c3.selectbox("Layer", sorted(int(x) for x in of_kind[of_kind.pair == pair].layer), key="dd_layer")
    cls = (
        c4.selectbox("Class", ["all", *CLASSES], key="dd_class")
        if kind == "crosscoder"
        else c4.selectbox("Class", ["all"], key="dd_class_dsae", help="difference-SAE latents have no class")
    )
    d = of_kind[(of_kind.pair == pair) & (of_kind.layer == layer)].iloc[0]
    st.markdown(
        f"{md_code(d.dict_id)}: {md_text(d.arch)}, {d.d_sae} latents, L0 {_ci(d.l0, None, None, '.1f')}, dead "
        f"{_ci(d.dead_frac, None, None, '.1%')}; held-out FVU base {_ci(d.fvu_base, None, None, '.3f')}, "
        f"{md_text(pair_name(pair))} {_ci(d.fvu_other, None, None, '.3f')}."
    )
    rows = data.diff_latents(str(d.dict_id), None if cls == "all" else cls)
    causal_rows = data.diff_causal() if causal is not None else pd.DataFrame()
    singles = (
        causal_rows[
            (causal_rows.kind == "single") & (causal_rows.dict_id == d.dict_id) & (causal_rows.intervention == "ablate")
        ]
        if not causal_rows.empty
        else causal_rows
    )
    effect = {int(list(s.latents)[0]): s for s in singles.itertuples() if s.latents is not None and len(s.latents)}
    role = d.role if isinstance(d.role, str) and d.role else f"{'cc' if kind == 'crosscoder' else 'dsae'}_{pair}"
    fl = data.feature_layers()
    linked = ((fl.role == role) & (fl.layer == layer)).any()
    if rows.empty:
        st.info("No latent of this dictionary matches the filter.")
    else:
        shown = rows.assign(
            page=[feature_url(run_dir, role, layer, int(f)) if linked else None for f in rows.latent],
            top_tokens=[" · ".join(t) if t is not None else "" for t in rows.top_tokens],
            single_diff=[_num(effect[int(f)].diff) if int(f) in effect else None for f in rows.latent],
            single_lo=[_num(effect[int(f)].diff_lo) if int(f) in effect else None for f in rows.latent],
            single_hi=[_num(effect[int(f)].diff_hi) if int(f) in effect else None for f in rows.latent],
        )
        cols = ["page", "latent", "class", "rel_norm", "dec_cos", "nu_eps", "nu_r", "density"]
        cols += ["density_base_text", "density_other_text", "mean_act", "reward_corr", "top_tokens"]
        cols += ["single_diff", "single_lo", "single_hi"]
        if kind != "crosscoder":
            cols = [c for c in cols if c not in ("class", "rel_norm", "dec_cos", "nu_eps", "nu_r")]
        f4 = st.column_config.NumberColumn
        st.dataframe(
            shown[cols],
            hide_index=True,
            width="stretch",
            key="dd_table",
            column_config={
                "page": st.column_config.LinkColumn("page", display_text="open", width="small"),
                "rel_norm": f4("rel. norm", format="%.3f"),
                "dec_cos": f4("decoder cos", format="%.3f"),
                "nu_eps": f4("ν^ε", format="%.3f"),
                "nu_r": f4("ν^r", format="%.3f"),
                "density": f4(format="%.4f"),
                "density_base_text": f4("density, base text", format="%.4f"),
                "density_other_text": f4("density, other's text", format="%.4f"),
                "mean_act": f4("mean act", format="%.3f"),
                "reward_corr": f4("reward corr", format="%+.3f"),
                "top_tokens": st.column_config.TextColumn("top tokens", width="large"),
                "single_diff": f4("ablated alone: Δ reward", format="%+.3f"),
                "single_lo": f4("CI lo", format="%+.3f"),
                "single_hi": f4("CI hi", format="%+.3f"),
            },
        )
        st.caption(
            f"{len(rows)} latents. Densities: share of held-out tokens it fires on (all text, the base model's "
            "completions, the other model's). Reward corr: correlation of its activation with the reward signal. "
            "Ablated alone: the mean reward change with this one latent removed from the tuned model (the "
            "`diff_causal` stage's single-latent checks; blank where it was not tested)."
            + ("" if linked else " No Feature page: the run stored no feature rows for this dictionary.")
        )

# --- (e) component patching ----------------------------------------------------------------------------
st.header("Where the change lives: component patching")
if loc is None:
    _missing(LocalisationSummary, "component patching or difference lens")
else:
    patch = data.diff_patching()
    for p in ["tuned", "null"]:
        rows = patch[patch.pair == p]
        if p == "null" and not has_null:
            st.caption(f"No null control patching: {NO_NULL}.")
            continue
        if rows.empty:
            st.info(f"No patching rows for the {pair_name(p)}.")
            continue
        gain = loc.gain if p == "tuned" else loc.null_gain
        singles = rows[rows.kind.isin(["attn", "mlp"])]
        defined = singles.frac.notna().any()
        st.subheader(pair_name(p).capitalize())
        text = f"Reward gain over the base model: **{_interval(gain)}**" + (
            f" over {gain.n} prefixes" if gain is not None and gain.n else ""
        )
        if not defined:
            text += ". Its CI includes 0, so the fraction each component carries is undefined."
        elif p == "tuned":
            named = singles[singles.component == loc.top_component]  # the stage's top component, else the largest
            t = named.iloc[0] if len(named) else singles.loc[singles.frac.idxmax()]
            text += (
                f". The single components' fractions sum to **{_interval(loc.sum_fraction, '.2f')}**; every "
                f"component patched at once carries **{_interval(loc.all_fraction, '.2f')}**"
            )
            text += (
                f"; the top component, {md_code(t.component)}, carries **{_ci(t.frac, t.frac_lo, t.frac_hi, '.2f')}**."
            )
        st.markdown(text)
        if defined:
            st.plotly_chart(diffviz.patching_bars(rows), width="stretch", key=f"dd_patch_{p}")
    st.caption(
        "The tuned policy samples each held-out prefix with one component's output (an attention or MLP "
        "block) taken from the base model; its fraction = (tuned reward − patched reward) / (tuned − base "
        "reward), with a bootstrap CI over prefixes. Fractions need not add to 1: components interact."
    )

# --- (f) the activation-difference lens -------------------------------------------------------------------
st.header("Activation-difference lens")
if loc is None:
    _missing(LocalisationSummary, "difference lens")
else:
    lens = data.diff_lens()
    if lens.empty:
        st.info("The localisation stage stored no difference lens.")
    for x in lens.itertuples():
        frac = _num(x.frac_of_gain)
        st.markdown(
            f"**Layer {x.layer}, {md_text(pair_name(x.pair))}** (mean difference over {x.n_tokens} tokens, norm "
            f"{_ci(x.norm, None, None, '.3f')}). Promoted: {_tokens(x.promoted)}. Suppressed: "
            f"{_tokens(x.suppressed)}.  \nSteering the base model by it: reward change "
            f"**{_ci(x.steer_diff, x.steer_lo, x.steer_hi)}** over {x.steer_n} prefixes; rank p "
            f"**{viz.fmt_p(_num(x.steer_p_rank)) or 'n/a'}** among {x.n_random} random directions of the same norm "
            f"(median {_ci(x.random_median, None, None)}, range {_ci(x.random_lo, None, None)} to "
            f"{_ci(x.random_hi, None, None)}); "
            + ("fraction of the tuned gain undefined." if frac is None else f"**{frac:.0%}** of the tuned gain.")
        )
    st.caption(
        "The mean activation difference (other − base) over the first tokens of held-out documents, read "
        "through the unembedding (promoted / suppressed tokens) and added to the base model while it samples."
        + ("" if has_null else f" No null lens: {NO_NULL}.")
    )

# --- (g) causal checks -----------------------------------------------------------------------------------
st.header("Causal checks")
if causal is None:
    _missing(DiffCausalSummary, "causal checks")
else:
    dc = data.diff_causal()
    tested = dc[dc.kind == "tested"]
    if tested.empty:
        st.info("The diff_causal stage stored no tested set.")
    else:
        n_ctrl = dc[dc.kind == "random"].groupby("control_of").size()
        st.dataframe(
            tested.assign(
                pair=tested.pair.map(pair_name),
                p_rank=[viz.fmt_p(_num(p)) for p in tested.p_rank],
                controls_stored=[int(n_ctrl.get(s, 0)) for s in tested.set_id],
            )[
                ["set_id", "dict_id", "pair", "layer", "intervention", "selection", "size", "n", "diff", "diff_lo"]
                + ["diff_hi", "hypothesis", "p_rank", "n_random", "controls_stored", "random_median", "random_lo"]
                + ["random_hi"]
            ],
            hide_index=True,
            width="stretch",
            column_config={
                "diff": st.column_config.NumberColumn("Δ reward", format="%+.3f"),
                "diff_lo": st.column_config.NumberColumn("CI lo", format="%+.3f"),
                "diff_hi": st.column_config.NumberColumn("CI hi", format="%+.3f"),
                "p_rank": st.column_config.TextColumn("rank p"),
                "random_median": st.column_config.NumberColumn("random median", format="%+.3f"),
                "random_lo": st.column_config.NumberColumn("random min", format="%+.3f"),
                "random_hi": st.column_config.NumberColumn("random max", format="%+.3f"),
            },
        )
        st.caption(
            "ablate: the latents removed from the tuned model (their decoder contribution subtracted); steer: "
            "their decoder directions added to the base model. Δ reward: mean change over held-out prefixes, "
            "95% bootstrap CI over prefixes. Rank p: (1 + #{random sets at least as extreme in the hypothesised "
            "direction}) / (1 + N) over N random latent sets matched in size and density."
            + ("" if has_null else f" No null sets: {NO_NULL}.")
        )
