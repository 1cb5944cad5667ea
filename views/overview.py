"""Overview: the run's config, stage status, headline figures and base-model completions."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.seqreport import not_applicable
from lfp_core.settings import run_settings_of
from lfp_core.stages import describe_stages
from lfp_core.store.summaries import RLEvalSummary
from views.common import report_text, require_run
from views.data import RunData
from views.seqprobe import not_applicable_notes

run_dir = require_run()
data = RunData(run_dir)
info = data.run_info()
model = data.model_info("base")
stages = data.stages()

st.title(f"Run · {info.get('name', run_dir)}")
model_line = f"model **{model['name']}** ({model['architecture']}) · " if model else ""
st.caption(f"{model_line}preset **{info.get('preset')}** · created {info.get('created_at')} · `{run_dir}`")

c1, c2, c3, c4 = st.columns(4)
if model:
    c1.metric("Parameters", f"{model['n_params'] / 1e6:.2f} M")
    c2.metric("Layers × d_model", f"{model['n_layers']} × {model['d_model']}")
    c3.metric("Vocabulary", f"{model['vocab_size']:,}")
summary = data.reward_summary("base")
if summary:
    c4.metric("Base reward (mean ± s.e.)", f"{summary['mean']:+.3f} ± {summary['se']:.3f}", help=f"n = {summary['n']}")

st.subheader("Stages")
recorded = {s.name: s for s in stages}
rows = []
for name, what in describe_stages(run_settings_of(info.get("config")).task).items():
    s = recorded.get(name)
    rows.append(
        {
            "stage": name,
            "status": s.status if s else "pending",
            "what it does": what,
            "seconds": round(s.seconds, 1) if s and s.seconds else None,
            "error": (s.error or "") if s else "",
        }
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
missing = [str(r["stage"]) for r in rows if r["status"] != "done"]
if missing:
    st.warning(
        f"Stages not finished: {', '.join(missing)}. Compute them (finished stages are kept) with\n\n"
        f"`python -m lfp_core.precompute --preset {info.get('preset', 'demo')} --out {run_dir}`"
    )

if not_applicable(stages):
    st.subheader("What does not apply to this run")
    not_applicable_notes(data)

st.subheader("Headline figures")
st.code(report_text(run_dir), language=None)
st.caption(f"The same text as `python -m lfp_core.report {run_dir}` (`--json` for a machine-readable version).")

with st.expander("Run config"):
    st.code(json.dumps(info.get("config", {}), indent=2), language="json")


def hh_sections() -> None:
    """HH task: the DPO curve and the implicit-reward evaluation on held-out and training pairs."""
    st.subheader("DPO on HH-RLHF preference pairs")
    steps = data.rl_steps()
    d = data.summary(RLEvalSummary)
    if steps.empty:
        st.info("The policy has not been DPO-tuned yet: the rlhf stage has not run.")
        return
    if d is not None and d.eval_margin is not None:
        e1, e2, e3 = st.columns(3)
        e1.metric("Held-out implicit-reward accuracy", f"{d.eval_accuracy:.3f}", help=f"n = {d.n_eval} pairs")
        e2.metric("Held-out margin (chosen − rejected)", f"{d.eval_margin['mean']:+.4f} ± {d.eval_margin['se']:.4f}")
        e3.metric("Training-pair accuracy", f"{d.train_accuracy:.3f}", help=f"n = {d.n_train} pairs")
    st.line_chart(steps.set_index("step")[["loss", "reward"]].rename(columns={"reward": "batch margin"}))
    pairs = data.pairs("eval")
    st.caption('Held-out pairs (first 5); the prompt ends at the last "Assistant:" turn.')
    st.dataframe(pairs.head(5)[["subset", "prompt", "chosen", "rejected"]], hide_index=True, width="stretch")


def vader_sections() -> None:
    """VADER task: base completions, the RL curves, held-out gain, paired completions, word shifts."""
    st.subheader("Base-model completions")
    comps = data.completions("base")
    if comps.empty:
        st.info("No completions yet: the base_samples stage has not run.")
    else:
        st.plotly_chart(viz.reward_histogram(comps), width="stretch")
        order = st.radio("Order", ["highest reward", "lowest reward", "prompt order"], horizontal=True, key="ov_order")
        sort = {
            "highest reward": ("reward", False),
            "lowest reward": ("reward", True),
            "prompt order": ("prompt_id", True),
        }[order]
        shown = comps.sort_values(sort[0], ascending=sort[1]).head(30)
        st.caption(
            "Prompt in grey, completion with VADER-lexicon words coloured by valence (hover for the value), "
            "reward in brackets."
        )
        st.html("".join(viz.completion_html(r.prompt, r.completion, r.reward) for r in shown.itertuples()))
        with st.expander("All completions as a table"):
            st.dataframe(
                comps[["prompt_id", "sample_idx", "prompt", "completion", "n_new", "reward", "raw_score"]],
                hide_index=True,
                width="stretch",
            )

    st.subheader("RL fine-tuning (GRPO against the VADER reward)")
    steps = data.rl_steps()
    d = data.summary(RLEvalSummary)
    if steps.empty:
        st.info("The policy has not been fine-tuned yet: the rlhf stage has not run.")
    else:
        if d is not None and d.difference is not None and d.reward_tuned is not None:
            diff, tuned = d.difference, d.reward_tuned
            e1, e2, e3, e4 = st.columns(4)
            e1.metric(
                "Tuned reward (held-out)",
                f"{tuned['mean']:+.3f} ± {tuned['se']:.3f}",
                delta=f"{diff['mean']:+.3f} vs base",
                help=f"n = {tuned['n']} paired completions",
            )
            e2.metric(
                "Gain over base",
                f"{diff['mean']:+.3f}",
                help=f"{diff['n_se']:.1f} standard errors; p = {diff['p_value']:.2g} "
                f"({diff.get('method') or 'paired t-test'})",
            )
            e3.metric("KL(tuned ‖ base) per token", f"{d.kl_per_token:.4f}")
            e4.metric(
                "Distinct-2 tuned / base",
                f"{d.distinct2_tuned:.3f} / {d.distinct2_base:.3f}",
                help="unique word bigrams / all bigrams; a collapse to repetition shows here",
            )
            st.caption(
                f"Gain 95% CI [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}], {diff['n_se']:.1f} standard errors, "
                f"p = {diff['p_value']:.2g} ({diff.get('method') or 'paired t-test'}), over {tuned['n']} held-out "
                "completions (same prompts, lengths and seeds for both policies"
                + (
                    "; completions of one prompt are resampled together)."
                    if "bootstrap" in diff.get("method", "")
                    else ")."
                )
            )
        st.plotly_chart(viz.rl_curves(steps), width="stretch")
        pairs = data.paired_completions(limit=200)
        if not pairs.empty:
            left, right = st.columns([3, 2])
            with left:
                st.markdown("**Same held-out prompt, same seed: base vs tuned**")
                shown = pairs.assign(gain=pairs.tuned_reward - pairs.base_reward).sort_values("gain", ascending=False)
                st.html(
                    viz.paired_table(
                        [
                            viz.paired_html(r.prompt, r.base, r.base_reward, r.tuned, r.tuned_reward)
                            for r in shown.head(8).itertuples()
                        ]
                    )
                )
            with right:
                shifts = data.word_shifts()
                st.markdown("**Words RL made more / less frequent**")
                if st.toggle("VADER-lexicon words only", key="ov_lexicon_only"):
                    shifts = shifts[shifts.valence != 0]
                for direction in ("raised", "lowered"):
                    part = shifts[shifts.direction == direction][["word", "base_count", "tuned_count", "valence"]]
                    st.caption(direction)
                    st.dataframe(part.head(10), hide_index=True, width="stretch")


if run_settings_of(info.get("config")).task == "hh":
    hh_sections()
else:
    vader_sections()
