"""Token scores: how well a probe from SAE features recovers VADER's per-word feedback — τ per split
with controls, sign accuracy, error vs frequency, the implicit reward model, the sequence probe beside it,
and a token viewer with each scored word's top contributing features. For a reward that is not a per-word
lexicon: why the token-level parts do not apply, and the sequence probe."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.store.summaries import ActivationsSummary, ProbeRoleSummary, ProbesSummary, Tau
from views.common import md_text, require_run, require_stage
from views.data import RunData
from views.seqprobe import not_applicable_notes, sequence_section

run_dir = require_run()
data = RunData(run_dir)
st.title("Token scores")
pr = require_stage(data, ProbesSummary, "probe")
role = st.radio(
    "Model",
    ["tuned", "base"],
    horizontal=True,
    key="probe_role",
    help="Each model's activations through its own SAEs (never mixed).",
)
d = pr.role(role) or ProbeRoleSummary()
if d.tau_occurrence is None and pr.not_applicable:  # a reward that is not a per-word lexicon: no token probe
    not_applicable_notes(data, ("probes",))
    if not sequence_section(data, pr, role, chart=True):
        st.info("The probe stage recorded no sequence probe for this run either.")
    st.stop()
layer_list = ", ".join(map(str, pr.layers or []))
st.markdown(
    f"Ridge probe from the SAE features of layers {md_text(layer_list)} (concatenated) "
    f"to the VADER valence of **{pr.n_points:,}** lexicon-word positions "
    f"(**{pr.n_words:,}** distinct words), scored at each word's last token."
)
occ_tau, word_tau, base_tau, shuf_tau, irm = d.tau_occurrence, d.tau_word, d.tau_baseline, d.tau_shuffled, d.irm
if occ_tau is None or word_tau is None or base_tau is None or shuf_tau is None or irm is None:
    st.info(f"The probe stage recorded no results for the {role} model.")
    st.stop()
    raise AssertionError("unreachable")  # st.stop raises
c = st.columns(5)
c[0].metric(
    "τ, occurrence split",
    f"{occ_tau['tau']:.3f}",
    help=f"p = {occ_tau['p']:.1e}, {occ_tau['n_words']} test words; a word may also occur in training",
)
by_stem = pr.word_split_by == "stem"
c[1].metric(
    "τ, word split",
    f"{word_tau['tau']:.3f}",
    help=f"p = {word_tau['p']:.1e}, {word_tau['n_words']} test words never seen in training"
    + ("; none shares a stem with a training word" if by_stem else ""),
)
c[2].metric("τ, untrained map", f"{base_tau['tau']:.3f}", help="random linear map (the paper's baseline)")
c[3].metric("τ, shuffled targets", f"{shuf_tau['tau']:.3f}", help="probe fitted to permuted valences")
c[4].metric(
    "IRM vs reward (Pearson)",
    f"{irm['pearson']:.3f}",
    help=f"Spearman {irm['spearman']:.3f} over {irm['n']} held-out tuned completions",
)

split_note = (
    "Word split: about 20% of the distinct words held out, grouped by stem (Snowball English), so no test word "
    "shares a stem with a training word (not 'loved' in test with 'love' in training); the ridge penalty is "
    "chosen by 5-fold CV grouped by stem on the training words. Occurrence split: 80/20 over positions, "
    "penalty by leave-one-out."
    if by_stem
    else "Word split: 20% of the distinct words held out (this run predates the split by stem)."
)
diffs = pr.tau_difference or {}
if diffs:
    split_note += " Tuned − base τ over the same test words (95% bootstrap CI, words resampled): " + "; ".join(
        f"{md_text(s)} split {x['diff']:+.3f} ({x['lo']:+.3f} to {x['hi']:+.3f}, {x['n_words']} words)"
        for s, x in diffs.items()
    )
    split_note += "."
st.caption(split_note)

words = data.probe_words(role)
st.plotly_chart(viz.probe_scatter(words, {"occurrence": dict(occ_tau), "word": dict(word_tau)}), width="stretch")


def _tau(split: str, group: str) -> Tau:
    """τ of a split over all, positive or negative words."""
    t = d.tau(split) or Tau()
    return (t if group == "all" else t.get("pos") if group == "pos" else t.get("neg")) or Tau()


taus = pd.DataFrame(
    [
        {"split": s, "words": g, "τ": _tau(s, g)["tau"], "p": _tau(s, g)["p"], "n": _tau(s, g)["n_words"]}
        for s in ("occurrence", "word")
        for g in ("all", "pos", "neg")
    ]
)
left, right = st.columns(2)
with left:
    st.subheader("Kendall τ by word polarity")
    st.dataframe(taus, hide_index=True, width="stretch")
with right:
    st.subheader("Sign accuracy")
    st.plotly_chart(
        viz.sign_accuracy_bars(
            [
                {"split": s, "polarity": f"{pol} words", "accuracy": d.sign_acc(pol[:3], s)}
                for s in ("occurrence", "word")
                for pol in ("positive", "negative")
            ]
        ),
        width="stretch",
    )
inputs = d.inputs or {}
if inputs:
    st.subheader("Baselines beside the probe")
    harvest = data.summary(ActivationsSummary)
    hook = (harvest.hook if harvest is not None else None) or "hook_mlp_out"
    raw = "raw MLP outputs" if hook == "hook_mlp_out" else f"raw `{hook}` activations"
    names = {
        "sae_selected": f"SAE features, layers {layer_list} (the probe)",
        "token_embedding": "token identity: the token's input embedding",
        "raw_selected": f"{raw}, layers {layer_list}",
        "diff_means_raw": f"difference of means, {raw}, layers {layer_list}",
        "raw_all_layers": f"{raw}, every layer",
    }
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "probe input": names.get(k, k),
                    "dimensions": v["dim"],
                    "τ occurrence": v["occurrence"]["tau"],
                    "τ word": v["word"]["tau"],
                    "p (word)": v["word"]["p"],
                }
                for k, v in inputs.items()
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "The same ridge probe, splits, penalty search and targets on other inputs. Token identity: what the "
        "token alone gives, with no context. SAE vs raw at the same layers: what the sparse basis keeps. "
        "Difference of means: the projection on (mean over positive-valence training words − mean over "
        "negative ones), no ridge. Every layer vs the selected ones: how much of the lexicon's valence is read "
        "from layers RL changed less (word identity is largely decoded in early layers)."
    )
ct = d.contrastive_probe or {}
if ct:
    st.markdown(
        f"**Contrastive probe**: a ridge from F(x) − F(x with a neutral word) at a lexicon word (also after "
        f"swapping in an opposite-valence word) to the word's valence, fitted on {ct['n_train_words']} training "
        f"words and scored on **{ct['n_words']}** held-out words (none shares a stem with a training word): τ "
        f"**{ct['tau']:.3f}** (p {ct['p']:.1e}; positive words {ct['pos']['tau']:.3f}, negative "
        f"{ct['neg']['tau']:.3f}) from {ct['n_sentences']:,} sentence variants. (The paper's score signs "
        "‖F(x) − F(x′)‖ by the true valence, which gives τ ≈ 0.5 for any features; it is not shown.)"
    )
st.caption(
    "Predictions are averaged per word and rescaled as in the paper (10th–90th percentile → the lexicon's "
    "[min, max]) before the sign is read."
)

st.subheader("Error against how often the tuned policy generates the word")
occ = words[words.split == "occurrence"]
e = d.error_vs_tuned_freq_occurrence or {"pearson": float("nan"), "spearman": float("nan"), "n": 0}
st.plotly_chart(viz.error_vs_frequency(occ), width="stretch")
st.caption(f"Spearman ρ(|error|, count) = {e['spearman']:.3f} over {e['n']} test words (occurrence split).")
b, w = st.columns(2)
cols = ["word", "valence", "pred_rescaled", "abs_error", "n_test", "tuned_count"]
b.markdown("**Best recovered words**")
b.dataframe(occ.nsmallest(10, "abs_error")[cols], hide_index=True, width="stretch")
w.markdown("**Worst recovered words**")
w.dataframe(occ.nlargest(10, "abs_error")[cols], hide_index=True, width="stretch")

st.subheader("Implicit reward model: where it disagrees with VADER")
st.caption(
    "Sum of the probe's predictions over a completion's words (out-of-fold at lexicon words) against the raw "
    f"VADER score; all words: Pearson {(d.irm_all_words or {'pearson': float('nan')})['pearson']:.3f}."
)
st.dataframe(pd.DataFrame(d.irm_disagreements or []), hide_index=True, width="stretch")

sequence_section(data, pr, role, chart=False)  # beside the token probe (schema 6 runs)

st.subheader("Token viewer")
docs = data.probe_docs(role)
if docs.empty:
    st.info("No scored documents.")
    st.stop()
labels = {
    int(r.doc_id): f"#{int(r.doc_id)} · {r.source} · {int(r.n_words)} words · {r.text[:60]}…" for r in docs.itertuples()
}
# options are the display strings themselves (AppTest and format_func do not mix)
doc_of = {v: k for k, v in labels.items()}
doc_id = doc_of[st.selectbox("Document", list(doc_of), key="probe_doc")]
doc, toks = data.probe_doc(role, doc_id)
if doc is None:
    st.error(f"document {doc_id} is not in this run")
    st.stop()
by_pos = {int(r.pos): r for r in toks.itertuples()}
strings = data.token_strings(tuple(int(t) for t in doc["token_ids"]))
st.markdown(
    viz.token_scores_html(
        strings,
        [by_pos[i].valence if i in by_pos else None for i in range(len(strings))],
        [by_pos[i].pred if i in by_pos else None for i in range(len(strings))],
    ),
    unsafe_allow_html=True,
)
pos_of = {f"{r.word} (position {p})": p for p, r in by_pos.items()}
pick = pos_of[st.selectbox("Scored word", list(pos_of), key="probe_word")]
row = by_pos[pick]
st.markdown(
    f"**{md_text(row.word)}**: VADER {row.valence:+.2f}, probe {row.pred:+.2f} (out-of-fold). Top contributing features:"
)
st.dataframe(
    pd.DataFrame({"layer": row.top_layers, "feature": row.top_features, "contribution w·f": row.top_contributions}),
    hide_index=True,
    width="stretch",
)
