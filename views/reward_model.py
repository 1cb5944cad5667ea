"""Reward model: the preference model trained on the oracle's preferences, its SAE features ranked by
attribution patching and checked by true ablation, where it disagrees with the oracle and which features
drive that, and a box that scores any text under it with features switched off."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.live import LiveInputError, PreferenceScorer
from lfp_core.store.summaries import AttributionSummary, RewardModelSummary
from views.common import MAX_TEXT_CHARS, bounded_text, md_code, md_text, require_run, require_stage
from views.data import RunData

ESTIMATES = ("estimate", "estimate_abs", "estimate_path", "true_effect")
run_dir = require_run()
data = RunData(run_dir)
st.title("Reward model")
d = require_stage(data, RewardModelSummary, "preference model")
acc = d.pair_acc
assert acc is not None and d.pair_acc_train is not None, "the reward_model stage records both pair accuracies"
c = st.columns(4)
c[0].metric(
    "Held-out pair accuracy",
    f"{acc['acc']:.3f}",
    help=f"95% CI {acc['lo']:.3f}–{acc['hi']:.3f} ({md_text(acc.get('method') or 'Wilson over pairs')}); chance 0.5",
)
c[1].metric(
    "Held-out pairs",
    acc["n"],
    help="pairs of base completions of held-out prompts with different VADER rewards"
    + (f", from {acc['n_prompts']} prompts" if acc.get("n_prompts") else ""),
)
c[2].metric("Training pairs", d.n_train, help=f"training pair accuracy {d.pair_acc_train['acc']:.3f}")
sae_info = d.sae_stats
c[3].metric("SAEs on the residual stream", len(sae_info))
st.caption(
    "The base model with a scalar head, trained with trl's RewardTrainer on pairs of base-model completions of "
    "the same prompt, the higher-VADER one preferred (the oracle). "
    + (
        f"Pairs of one prompt share its completions, so the accuracy's 95% CI resamples prompts: {md_text(acc['method'])}."
        if acc.get("n_prompts")
        else "Accuracy CI: Wilson 95% over pairs taken as independent (a run made before prompt-clustered intervals)."
    )
)
if sae_info:
    st.dataframe(
        pd.DataFrame([{"SAE": k, **v} for k, v in sae_info.items()]).rename(
            columns={"pair_acc_spliced": "pair accuracy, SAE spliced (no error term)"}
        ),
        hide_index=True,
        width="stretch",
    )

at = data.summary(AttributionSummary)
if at is None:
    st.info(
        f"Attribution is not computed yet: run {md_code(f'python -m lfp_core.precompute --out {run_dir}')} "
        "(stage `attribution`)."
    )
else:
    st.header("Which features move the reward")
    target = st.radio(
        "Metric",
        ["preference model reward", "policy's expected next-token valence"],
        horizontal=True,
        key="rm_target",
    )
    key = "pm" if target.startswith("preference") else "policy"
    a = at.target(key)
    assert a is not None, f"the attribution stage records the {key} target"
    checks = at.check_rows(key)
    old_metric = {
        "pm": "the preference model's reward",
        "policy": "the policy's probe-predicted reward (a run before schema 5: a linear read-out of the very "
        "features attributed)",
    }
    st.caption(f"Metric: {md_text(a['metric']) if a.get('metric') else old_metric[key]}.")
    if checks:
        st.subheader("Single-feature estimates against true ablation")
        cols = {
            "sample": "features checked",
            "estimator": "estimator",
            "rho": "Spearman ρ",
            "p": "p",
            "n": "features",
            "rho_sign_only": "ρ of a sign-only estimator",
            "sign_agree": "sign agreement",
            "median_rel_err": "median relative error",
            "n_rel": "non-negligible features",
            "recall": "recall of the true top k",
            "k": "k",
            "recall_chance": "recall by chance",
        }
        table = pd.DataFrame(checks).reindex(columns=list(cols))
        # p as text: a float column shows 1e-120 as a row of zeros
        table["p"] = [viz.fmt_p(v) for v in table["p"]]
        table = table.rename(columns=cols)
        st.dataframe(table, hide_index=True, width="stretch", key="rm_checks")
        st.caption(
            f"Truth: the metric's change when one feature alone is zeroed on the completion tokens (every other "
            f"feature and the SAE's error term kept), means over {a['n_texts']} texts. AtP: −Σ activation × "
            f"gradient at the clean point; path: integrated gradients along the path that moves only that "
            f"feature to 0 ({a['steps']} midpoints). Checked on the top {a['top_k']} features by mean |AtP| and "
            f"on a seeded uniform sample of {a['random_k']} features per layer (over the "
            f"{a['n_random_active']} of them that fire on some text: for the others every figure is exactly 0), "
            f"which is where features AtP misses would show: recall is the share of the sample's true top k "
            f"(by |true|) among the estimator's top k. Sign agreement and relative error are over the features "
            f"whose |true| is at least {a['rel_floor_share']:.0%} of the largest in their sample; the sign-only "
            f"ρ is what an estimator that knew only the true signs would score."
        )
    else:
        c = st.columns(2)
        c[0].metric(
            f"Spearman, top {a['top_k']} features (layer-wide IG)",
            f"{a['spearman_top']['rho']:.3f}",
            help=f"a run before schema 5: integrated gradients scaling the whole layer vs true ablation of one "
            f"feature, means over texts; p {a['spearman_top']['p']:.1e}",
        )
        c[1].metric("Texts", a["n_texts"], help=f"layer-wide integrated-gradient steps: {a['steps']}")
    feats = data.attribution(key)
    points = data.attribution_points(key)
    plotted = st.radio("Estimate plotted", ["AtP", "path"], horizontal=True, key="rm_est") if checks else "AtP"
    column = "estimate_path" if plotted == "path" else "estimate"
    st.plotly_chart(viz.attribution_scatter(points, feats, column, plotted), width="stretch")
    shown = (
        st.radio("Features", ["ranked by mean |AtP|", "the random sample"], horizontal=True, key="rm_feats")
        if checks
        else "ranked by mean |AtP|"
    )
    rows = feats[feats.verified.isin(["random", "both"])] if shown == "the random sample" else feats.head(50)
    st.dataframe(
        rows.reindex(columns=["rank", "layer", "feature", *ESTIMATES, "verified", "n_active", "top_tokens"]).rename(
            columns={
                "estimate": "mean AtP",
                "estimate_abs": "mean |AtP|",
                "estimate_path": "mean path estimate",
                "true_effect": "mean true change",
                "verified": "checked as",
                "n_active": "texts it fires on",
                "top_tokens": "fires most on",
            }
        ),
        hide_index=True,
        width="stretch",
        key="rm_rank",
    )
    st.caption(
        "Estimated change of the metric if the feature is zeroed on the completion tokens, ranked by mean |AtP| "
        "over the texts; the checked ones (top and random sample) also zeroed for real."
    )

    st.header("Where the preference model disagrees with the oracle")
    dis = at.disagreement or {}
    pairs = data.rm_pairs("eval")
    wrong = pairs[pairs.chosen_pm < pairs.rejected_pm]
    st.metric("Held-out pairs it gets wrong", f"{len(wrong)} of {len(pairs)}")
    if len(wrong):
        st.dataframe(
            wrong[
                ["prompt", "chosen", "chosen_oracle", "chosen_pm", "rejected", "rejected_oracle", "rejected_pm"]
            ].head(100),
            hide_index=True,
            width="stretch",
            key="rm_wrong",
        )
        drivers = data.attribution("pm_disagree").head(15)
        st.subheader("Features behind the disagreements")
        st.dataframe(
            drivers[["layer", "feature", "estimate", "contrast", "top_tokens"]].rename(
                columns={
                    "estimate": "margin change if zeroed (disagreeing pairs)",
                    "contrast": "same on agreeing pairs",
                    "top_tokens": "fires most on",
                }
            ),
            hide_index=True,
            width="stretch",
            key="rm_drivers",
        )
        n_att = dis.get("n_attributed", len(wrong))
        if n_att < len(wrong):
            st.caption(
                f"Attributed over the {n_att} disagreeing pairs with the largest oracle gaps (and as many agreeing ones)."
            )
        st.caption(
            "Margin = reward(oracle-preferred) − reward(other). A feature whose removal would raise the margin on "
            "the pairs the model gets wrong, but not on those it gets right, pushes the model away from the oracle."
        )


@st.cache_resource(show_spinner="Loading the preference model…", max_entries=2)
def preference_scorer(run: str, stamp: float) -> PreferenceScorer:
    return PreferenceScorer(run)


st.header("Score a text")
try:
    scorer = preference_scorer(run_dir, data.version)
except (
    RuntimeError,
    FileNotFoundError,
    ValueError,
) as exc:  # ValueError: any BadInputError (e.g. an SAE that does not fit)
    st.error(f"Cannot load the preference model: {md_text(exc)}")
    st.stop()
text = st.text_area(  # no max_chars: a longer paste would be dropped without a word (views.common.bounded_text)
    "Text (prompt and completion)",
    key="rm_text",
    value="This movie was wonderful, I loved every minute of it.",
    help=f"at most {MAX_TEXT_CHARS:,} characters are used",
)
text = bounded_text(text)
top = data.attribution("pm") if at is not None else pd.DataFrame()
opts = {f"L{a} #{b}": (int(a), int(b)) for a, b in zip(top.layer.head(40), top.feature.head(40))} if len(top) else {}
picked = st.multiselect("Features to switch off", list(opts), key="rm_features")
if st.button("Score", key="rm_score"):
    off: dict[int, list[int]] = {}
    for k in picked:
        off.setdefault(opts[k][0], []).append(opts[k][1])
    try:
        res = scorer.score(text, off)
    except LiveInputError as exc:
        st.error(md_text(exc))
        st.stop()
    if res["truncated"]:
        st.warning(f"The text is longer than the model's context: its first {res['truncated']} tokens were dropped.")
    c = st.columns(3)
    c[0].metric("Reward", f"{res['clean']:.3f}")
    c[1].metric(
        f"With {len(picked)} features off", f"{res['ablated']:.3f}", delta=f"{res['ablated'] - res['clean']:+.3f}"
    )
    c[2].metric("VADER oracle", f"{res['oracle']:.3f}")
