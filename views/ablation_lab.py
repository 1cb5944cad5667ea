"""Ablation lab: the stored feature-set ablation experiment (probe-top, labelled and random sets), and a
live lab that zeroes chosen features of the tuned policy on any text and samples completions with and
without them (same seeds), with the next-token change and the features' activations."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.live import MAX_COMPLETIONS, MAX_FEATURES, LiveEngine, LiveInputError
from lfp_core.safetext import show_controls
from lfp_core.store.summaries import AblationSetSummary, AblationSummary, FeaturesSummary
from views.common import MAX_TEXT_CHARS, bounded_text, feature_url, md_code, md_text, require_run, require_stage
from views.data import RunData

run_dir = require_run()
data = RunData(run_dir)
st.title("Ablation lab")
require_stage(data, FeaturesSummary, "SAE features")


@st.cache_resource(show_spinner="Loading the tuned policy and its SAEs…", max_entries=2)
def engine(run: str, stamp: float) -> LiveEngine:
    return LiveEngine(run)


# --- the stored experiment ------------------------------------------------------------------------------
ab = data.summary(AblationSummary)
if ab is None:
    st.info(
        "The stored ablation experiment is not computed yet: run "
        f"{md_code(f'python -m lfp_core.precompute --out {run_dir}')} (stage `ablation`). The live lab below "
        "works already."
    )
else:
    sets = data.ablation_sets()
    top = ab.sets.get("probe_top") or AblationSetSummary()
    nan = float("nan")

    def num(x: float | None) -> float:
        return nan if x is None else x

    c = st.columns(4)
    c[0].metric(
        "Reward, clean policy",
        f"{ab.reward_before or nan:.3f}",
        help=f"{top.n or 0} completions of held-out review prefixes, every SAE spliced in with its error term",
    )
    c[1].metric(
        f"Probe-top {top.size or 0} zeroed",
        f"{ab.reward_after or nan:.3f}",
        delta=f"{nan if top.diff is None else top.diff:+.3f}",
    )
    c[2].metric(
        "Matched random sets",
        "n/a" if top.random_median is None else f"{top.random_median:+.3f}",
        help=f"median reward change of the {top.n_random or 0} random sets with as many features per layer and "
        f"about the same activation mass, on the first {top.rank_n or 0} prefixes (range "
        f"{num(top.random_lo):+.3f} to {num(top.random_hi):+.3f}); the probe-top set's change there: "
        f"{num(top.rank_diff):+.3f}",
    )
    c[3].metric(
        "Rank p (one-sided)",
        f"{num(ab.p_rank):.3g}",
        help=f"hypothesis: zeroing the probe-top set {md_text(top.hypothesis or 'lower')}s the reward more than a matched "
        f"random set would; p = (1 + #random sets at least as extreme) / (N + 1), N = {top.n_random or 0}, so at "
        f"least {num(top.p_min):.3g}; normal-theory p {num(ab.p):.3g}",
    )
    tests = pd.DataFrame(
        [
            {
                "set": name,
                "hypothesis": f"zeroing {x.hypothesis}s the reward",
                "features": x.size,
                "change": x.diff,
                "95% CI": f"{x.diff_lo:+.3f} to {x.diff_hi:+.3f}",
                "prefixes": x.n,
                "change, test prefixes": x.rank_diff,
                "random median": x.random_median,
                "random range": f"{x.random_lo:+.3f} to {x.random_hi:+.3f}",
                "N random": x.n_random,
                "rank p": x.p_rank,
                "normal-theory p": x.p,
            }
            for name, x in ab.sets.items()
            if x.hypothesis is not None
        ]
    )
    if len(tests):
        st.subheader("Tests against matched random sets")
        st.dataframe(
            tests,
            hide_index=True,
            width="stretch",
            key="al_tests",
            column_config={
                k: st.column_config.NumberColumn(format="%.3f")
                for k in ("change", "change, test prefixes", "random median", "rank p", "normal-theory p")
            },
        )
        st.caption(
            f"Each tested set against {top.n_random or 0} random sets with as many features per layer, drawn "
            "feature by feature from the features nearest in activation mass (density × mean activation), all "
            f"sampled on the same first {top.rank_n or 0} prefixes with the same random numbers; rank p = (1 + "
            "#random sets at least as extreme in the hypothesised direction) / (N + 1), one-sided. `labelled_pos` "
            "and `labelled_neg`: the labeller's reward-related features with positive and negative probe weight. "
            "The change and its CI are over all prefixes."
        )
    elif ab.p_rank is not None:
        st.caption("This run was computed before the matched-controls test: its p-values come from 5 random sets.")
    st.plotly_chart(viz.ablation_effects(sets), width="stretch")
    st.dataframe(
        sets[["set_id", "kind", "size", "n", "before", "after", "diff", "diff_lo", "diff_hi", "p", "p_rank"]],
        hide_index=True,
        width="stretch",
        key="al_sets",
        column_config={
            k: st.column_config.NumberColumn(format="%.3f")
            for k in ("before", "after", "diff", "diff_lo", "diff_hi", "p", "p_rank")
        },
    )
    st.caption(
        "Every set is sampled from the same prefixes with the same random numbers as the clean policy, so "
        "each difference is paired (random sets on the first prefixes only). `all` zeroes every firing feature "
        "of the selected layers: the most any feature set there can move the reward."
    )
    with st.expander("Completions side by side"):
        which = st.selectbox("Set", [s for s in sets.set_id if s != "baseline"], key="al_set")
        comp = data.ablation_completions(["baseline", which], limit=20)
        wide = comp.pivot(index=["prefix_id", "prefix"], columns="set_id", values=["text", "reward"])
        wide.columns = [f"{a} ({b})" for a, b in wide.columns]
        st.dataframe(wide.reset_index().drop(columns="prefix_id"), hide_index=True, width="stretch")

# --- the live lab ----------------------------------------------------------------------------------------
st.header("Live lab")
try:
    eng = engine(run_dir, data.version)
except (RuntimeError, FileNotFoundError, ValueError) as exc:
    st.error(f"The live lab cannot load this run: {md_text(exc)}")
    st.stop()

pf = data.probe_features("tuned", limit=None)
labels = data.labels("tuned")
options: dict[str, tuple[int, int]] = {}


def _name(layer: int, feature: int, label: str | None = None) -> str:
    return f"L{layer} #{feature}" + (f" · {label[:40]}" if label else "")


label_of = (
    {(int(a), int(b)): e for a, b, e in zip(labels.layer, labels.feature, labels.explanation)} if len(labels) else {}
)
pos = pf[(pf.weight > 0) & pf.layer.isin(eng.layers)].head(MAX_FEATURES)
for a, b in zip(pos.layer, pos.feature):
    options[_name(int(a), int(b), label_of.get((int(a), int(b))))] = (int(a), int(b))
for (a, b), e in label_of.items():
    options.setdefault(_name(a, b, e), (a, b))

c = st.columns([2, 1])
search = c[0].text_input("Search features (label or top token)", key="al_search", max_chars=100)
if search.strip():
    found, n = data.feature_table(role="tuned", search=search, limit=30)
    for a, b, e in zip(found.layer, found.feature, found.label):
        options.setdefault(_name(int(a), int(b), e if isinstance(e, str) else None), (int(a), int(b)))
    c[0].caption(f"{n} features match; the first {min(n, 30)} are added to the list below.")
preset = c[1].radio("Start from", ["probe top 8", "labelled reward-related", "nothing"], key="al_preset")
if st.session_state.get("al_preset_used") != preset:
    names = list(options)
    if preset == "probe top 8":
        chosen = [k for k in names if options[k] in {(int(a), int(b)) for a, b in zip(pos.layer, pos.feature)}][:8]
    elif preset == "labelled reward-related":
        rel = labels[labels.relevant.fillna(False).astype(bool)] if len(labels) else labels
        keep = {(int(a), int(b)) for a, b in zip(rel.layer, rel.feature)}
        chosen = [k for k in names if options[k] in keep]
    else:
        chosen = []
    st.session_state["al_features"] = chosen
    st.session_state["al_preset_used"] = preset
picked = st.multiselect(
    f"Features to zero (at most {MAX_FEATURES})", list(options), key="al_features", max_selections=MAX_FEATURES
)

prefixes = data.ablation_prefixes() if ab is not None else pd.DataFrame()
examples = list(prefixes.text.head(20)) if len(prefixes) else []
c = st.columns([3, 1])
pick = c[1].selectbox("Or pick a prompt", ["(type your own)"] + examples, key="al_pick")
default = "" if pick == "(type your own)" else pick
# no max_chars: the browser drops a paste longer than max_chars entirely (the box stays empty, no
# message); a longer text stays in the box and its first MAX_TEXT_CHARS characters are used, with a notice
text = c[0].text_area(
    "Prompt",
    value=default,
    key=f"al_text_{hash(default)}",
    height=100,
    help=f"at most {MAX_TEXT_CHARS:,} characters are used",
)
text = bounded_text(text, what="The prompt", where=c[0])
c = st.columns(3)
n = c[0].slider("Completions", 1, MAX_COMPLETIONS, 8, key="al_n")
new_tokens = c[1].slider("New tokens", 1, 40, 20, key="al_new")
seed = c[2].number_input("Seed", 0, 10**6, 0, key="al_seed")

if st.button("Run", type="primary", key="al_run"):
    feats: dict[int, list[int]] = {}
    for k in picked:
        a, b = options[k]
        feats.setdefault(a, []).append(b)
    try:
        res = eng.run(text, feats, n=int(n), new_tokens=int(new_tokens), seed=int(seed))
    except LiveInputError as exc:
        st.error(md_text(exc))
        st.stop()
    if res.truncated:
        st.warning(
            f"The text is longer than the model's context ({eng.model.cfg.n_ctx} tokens with room for "
            f"{new_tokens} new ones): its first {res.truncated} tokens were dropped."
        )
    c = st.columns(3)
    c[0].metric("Mean reward, clean", f"{res.mean_clean:.3f}")
    c[1].metric(
        f"Mean reward, {len(picked)} features zeroed",
        f"{res.mean_ablated:.3f}",
        delta=f"{res.mean_ablated - res.mean_clean:+.3f}",
    )
    c[2].metric(
        "Completions that changed", f"{sum(a != b for a, b in zip(res.clean, res.ablated))} of {len(res.clean)}"
    )
    st.dataframe(
        show_controls(
            pd.DataFrame(
                {
                    "clean": res.clean,
                    "reward (clean)": res.reward_clean,
                    "ablated": res.ablated,
                    "reward (ablated)": res.reward_ablated,
                }
            )
        ),
        hide_index=True,
        width="stretch",
        key="al_out",
    )
    left, right = st.columns(2)
    left.subheader("Next token")
    left.plotly_chart(viz.next_token_bars(res.next_tokens), width="stretch")
    right.subheader("The chosen features on the prompt")
    shown = sorted(res.activations.items(), key=lambda kv: -max(kv[1], default=0))[:6]
    for (a, b), acts in shown:
        vmax = max(acts, default=0)
        right.markdown(f"[{md_text(_name(a, b))}]({feature_url(run_dir, 'tuned', a, b)}) — max {vmax:.2f}")
        right.html(viz.activation_context_html(res.prompt_tokens, acts, -1, vmax))
    if not shown:
        right.caption("No features chosen: both columns come from the same clean policy.")
