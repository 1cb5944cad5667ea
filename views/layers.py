"""Layers & SAEs: where RL changed the model (per-layer divergence, the layers chosen), and the SAEs
trained there: quality metrics, the L1 sweep, dictionary similarity and MFR vs independent training."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lfp_core import viz
from lfp_core.report import basis_reading
from lfp_core.store.summaries import ActivationsSummary, DivergenceSummary, SAEsSummary
from views.common import md_code, md_text, require_run, require_stage
from views.data import RunData

run_dir = require_run()
data = RunData(run_dir)
st.title("Layers & SAEs")
div = data.layer_divergence()
if div.empty:
    st.info(
        f"No divergence yet: the divergence stage has not run. Compute it with "
        f"{md_code(f'python -m lfp_core.precompute --out {run_dir}')} (finished stages are kept)."
    )
    st.stop()
measure = (data.summary(DivergenceSummary) or DivergenceSummary()).measure
selected = [int(x) for x in div[div.selected].layer]
harvest = data.summary(ActivationsSummary)
hook = (harvest.hook if harvest is not None else None) or "hook_mlp_out"
what = "MLP outputs" if hook == "hook_mlp_out" else f"`{hook}` activations"
st.markdown(
    f"Selected layers (★): **{', '.join(map(str, selected))}**, the top {len(selected)} by "
    f"**{'parameter' if measure == 'param' else 'MLP-output (1 − cos)'}** divergence. Later "
    f"stages study these layers' {what}."
)
if harvest is not None and harvest.layers_from not in (None, "divergence"):
    st.info(
        f"This run was given SAEs, so the later stages study **their** layers, "
        f"**{', '.join(map(str, harvest.layers or []))}**, not the divergence choice above: {md_text(harvest.layers_from)}."
    )
st.plotly_chart(viz.divergence_bars(div), width="stretch")
st.caption(
    "Parameter divergence: the paper's Σ over the layer's tensors of the Frobenius norm of the weight "
    "change (float32). Activation divergence: base vs tuned `hook_mlp_out` on the same held-out "
    "sequences, BOS excluded."
)
st.dataframe(div.rename(columns={"act_cos": "1 − cos", "act_rel_l2": "relative L2"}), hide_index=True, width="stretch")

# --- SAEs on the selected layers -------------------------------------------------------------------
st.header("SAEs")
sae_stage = require_stage(data, SAEsSummary, "SAEs")
table = data.saes()
cols = [
    "sae_id",
    "role",
    "layer",
    "arch",
    "d_sae",
    "l0",
    "fvu",
    "ce_loss_recovered",
    "dead_frac",
    "cos_sim",
    "l2_ratio",
    "mse",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "k",
    "l1_coefficient",
    "seconds",
]
labels = {
    "fvu": "FVU",
    "mse": "MSE",
    "l0": "L0",
    "dead_frac": "dead",
    "cos_sim": "cos(x, x̂)",
    "l2_ratio": "‖x̂‖/‖x‖",
    "ce_clean": "CE clean",
    "ce_spliced": "CE spliced",
    "ce_zero": "CE zero-abl.",
    "ce_loss_recovered": "loss recovered",
    "l1_coefficient": "L1",
}
if harvest is not None:
    d = harvest
    given = sae_stage.given
    trained = [r for r in ("tuned", "base") if r not in given]
    how = (
        f"Trained with sae-lens on {md_code(hook)} activations of **{d.n_train_rows or 0:,}** tokens"
        if not given
        else "; ".join(
            f"the {r} model's SAEs were **given** ({md_code(src)}), not trained here" for r, src in given.items()
        )
        + (
            f"; the {' and '.join(trained)} model's trained with sae-lens on {md_code(hook)} activations of "
            f"**{d.n_train_rows or 0:,}** tokens"
            if trained
            else f", and read {md_code(hook)}"
        )
    )
    st.markdown(
        f"{how}; metrics on **{d.n_eval_rows or 0:,}** held-out tokens (whole documents held out). "
        f"Corpus: {d.n_docs or 0:,} documents ({md_text(d.source)}) plus base and tuned completions."
    )
if sae_stage.not_applicable:
    st.info(
        "Not computed for this run, because SAEs were given:\n"
        + "\n".join(f"- **{md_text(what)}**: {md_text(why)}" for what, why in sae_stage.not_applicable.items())
    )
main = table[table.kind.isin(["main", "reseed", "variant"])]
st.subheader("Quality")
st.dataframe(
    main[cols].rename(columns=labels),
    hide_index=True,
    width="stretch",
    column_config={"loss recovered": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)},
)
st.caption(
    "FVU = Σ‖x − x̂‖² / Σ‖x − mean‖² with the mean taken per dimension. Dead = share of features that never "
    "fire on any harvested token. Loss recovered = (CE zero-ablated − CE spliced) / (CE zero-ablated − CE "
    "clean), next-token cross-entropy on held-out documents with the SAE's reconstruction (or zeros) in "
    f"place of the layer's {what} (zeroing a residual-stream hook removes the whole stream, a harsher "
    "baseline than zeroing an MLP output, so loss recovered is comparable only between SAEs of one hook). Main SAEs of both models feed the feature pages; reseed SAEs are "
    "the same model, layer and settings from another seed (the MMCS reference below); variants are the "
    "paper's L1 ReLU (1× and 2× d_model) and tied-decoder SAEs of the tuned model."
)
bars = sae_stage.bars
missed = [
    md_text(f"{k}: {', '.join(b for b, ok in v.items() if not ok)}") for k, v in bars.items() if not all(v.values())
]
if missed:
    st.warning("Main SAEs below the quality bars (FVU ≤ 0.2, loss recovered ≥ 80%, dead ≤ 20%): " + "; ".join(missed))

sweep = table[table.kind == "sweep"]
if not sweep.empty:
    st.subheader(f"L1 sweep (ReLU SAE, 1×, tuned model, layer {int(sweep.layer.iloc[0])})")
    st.plotly_chart(viz.l1_sweep_chart(sweep), width="stretch")
    st.caption(
        "A higher coefficient buys sparsity (lower L0) with reconstruction. More points: "
        + md_code(f"python -m lfp_core.precompute --out {run_dir} --set sae_sweep_l1=0.1,0.25,0.5,1,2,4,8")
        + "."
    )

COMPARISONS = {
    "base_vs_tuned": "base vs tuned",
    "base_vs_base_reseed": "base vs base′ (same model, another seed)",
    "tuned_vs_tuned_reseed": "tuned vs tuned′ (same model, another seed)",
    "relu_1x_vs_2x": "ReLU 1× vs 2× (tuned)",
    "mfr": "MFR members",
    "independent": "independent TopK SAEs (the MFR baseline)",
}
pairs = data.sae_pairs()
if not pairs.empty:
    st.subheader("Dictionary similarity (MMCS)")
    if sae_stage.basis:
        st.markdown("**Did RL change the basis?** Base vs tuned beside the same-model, different-seed references")

        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "layer": b["layer"],
                        COMPARISONS["base_vs_tuned"]: b["base_vs_tuned"],
                        COMPARISONS["base_vs_base_reseed"]: b["base_vs_base_reseed"],
                        COMPARISONS["tuned_vs_tuned_reseed"]: b["tuned_vs_tuned_reseed"],
                        "reading": basis_reading(b),
                    }
                    for b in sae_stage.basis
                ]
            ),
            hide_index=True,
            width="stretch",
        )
        st.caption(
            "MMCS (Hungarian) between the base and tuned main SAEs of a layer, and between each model's main "
            "SAE and a second SAE of the same model, layer and settings trained from another seed (base′, "
            "tuned′). Two SAEs of one model never agree perfectly, so base vs tuned can say that RL changed "
            "the basis only if it is below these references. Each reference is one pair of seeds, a single "
            "draw of the seed-to-seed spread, not an interval, so a margin below them is a hint, not a finding. Every SAE starts from its own seed."
        )
    elif any("other-seed reference" in k for k in sae_stage.not_applicable):
        st.info(
            "No other-seed references for this run's given SAEs, so base vs tuned MMCS cannot be read against "
            "chance (see what was not computed, above)."
        )
    else:
        st.info(
            "This run's SAE stage has no other-seed reference SAEs, so base vs tuned cannot be read against "
            "chance (and its SAEs may share their initialisation). Recompute it: "
            f"{md_code(f'python -m lfp_core.precompute --out {run_dir}')}."
        )
    st.dataframe(
        pairs.assign(comparison=pairs.comparison.map(lambda c: COMPARISONS.get(c, c))).rename(
            columns={"mmcs_hungarian": "MMCS (Hungarian)", "mmcs_max": "MMCS (max)"}
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "Mean max cosine similarity between two SAEs' decoder directions. Hungarian: features paired one to "
        "one (each feature of the smaller dictionary with a distinct feature of the other); max: each feature's "
        "best match, no pairing. ReLU 1× vs 2×: features shared across dictionary sizes."
    )

mfr = sae_stage.mfr
if "mfr" in mfr and "independent" in mfr:
    st.subheader("Mutual Feature Regularization vs independent SAEs")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "training": k,
                    "SAEs": v["n"],
                    "L0": v["l0"],
                    "FVU": v["fvu"],
                    "loss recovered": v["ce_loss_recovered"],
                    "MMCS between them": v["mmcs"],
                }
                for k, v in mfr.items()
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "TopK SAEs with the same k (so equal L0), trained jointly with a penalty on low MMCS between their "
        "dictionaries (MFR) or independently with different seeds. MFR's claim: features that several SAEs "
        "agree on are more likely real."
    )
