"""Layers: where RL changed the model — per-layer divergence, with the layers chosen for SAEs."""

from __future__ import annotations

import streamlit as st

from lfp_core import viz
from views.common import read, require_run

run_dir = require_run()
st.title("Layers")
div = read(run_dir, "layer_divergence")
if div.empty:
    st.info(f"No divergence yet: the divergence stage has not run. Compute it with "
            f"`python -m lfp_core.precompute --out {run_dir}` (finished stages are kept).")
    st.stop()
detail = {s.name: s for s in read(run_dir, "stages")}["divergence"].detail
selected = [int(x) for x in div[div.selected].layer]
st.markdown(f"Selected layers (★): **{', '.join(map(str, selected))}**, the top {len(selected)} by "
            f"**{'parameter' if detail.get('measure') == 'param' else 'MLP-output (1 − cos)'}** divergence. Later "
            "stages train SAEs on these layers' MLP outputs.")
st.plotly_chart(viz.divergence_bars(div), width="stretch")
st.caption("Parameter divergence: the paper's Σ over the layer's tensors of the Frobenius norm of the weight "
           "change (float32). Activation divergence: base vs tuned `hook_mlp_out` on the same held-out "
           "sequences, BOS excluded.")
st.dataframe(div.rename(columns={"act_cos": "1 − cos", "act_rel_l2": "relative L2"}), hide_index=True,
             width="stretch")
