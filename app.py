"""LFP Explorer dashboard: ``streamlit run app.py [-- --run RUN_DIR]``.

The entry point only sets up navigation and the shared sidebar (run picker); each page lives in
views/ and reads the selected run through lfp_core.store.
"""

from __future__ import annotations

from lfp_core.runtime import apply_thread_policy

apply_thread_policy()  # before anything imports torch: OpenMP reads its wait policy once (lfp_core/runtime.py)

import argparse  # noqa: E402
import sys  # noqa: E402

import streamlit as st  # noqa: E402

from views.common import sidebar  # noqa: E402

st.set_page_config(page_title="LFP Explorer", page_icon="🔎", layout="wide")

_parser = argparse.ArgumentParser(add_help=False)
_parser.add_argument("--run", default=None)
cli, _ = _parser.parse_known_args(sys.argv[1:])

nav = st.navigation(
    [
        st.Page("views/overview.py", title="Overview", icon="🏠", default=True, url_path="overview"),
        st.Page("views/layers.py", title="Layers & SAEs", icon="🧱", url_path="layers"),
        st.Page("views/diffing.py", title="Model diffing", icon="🧬", url_path="diffing"),
        st.Page("views/browser.py", title="Feature browser", icon="🗂️", url_path="features"),
        st.Page("views/feature.py", title="Feature", icon="🔬", url_path="feature"),
        st.Page("views/token_scores.py", title="Token scores", icon="🎯", url_path="token-scores"),
        st.Page("views/labels.py", title="Labels", icon="🏷️", url_path="labels"),
        st.Page("views/separation.py", title="Separation", icon="↔️", url_path="separation"),
        st.Page("views/ablation_lab.py", title="Ablation lab", icon="✂️", url_path="ablation"),
        st.Page("views/reward_model.py", title="Reward model", icon="⚖️", url_path="reward-model"),
    ]
)
sidebar(default_run=cli.run)
nav.run()
