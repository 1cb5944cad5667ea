"""Shared dashboard pieces: the run picker, the selected run, and the checks pages make before they
draw (a stage not finished, no features). Pages read the run through :class:`views.data.RunData`
(typed, cached per run version).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pandas as pd
import streamlit as st

from lfp_core.config import runs_dir
from lfp_core.settings import run_settings_of
from lfp_core.store import StoreError, list_runs
from lfp_core.store.summaries import FeaturesSummary, StageSummary
from views.data import RunData, stamp

RUN_KEY = "lfp_run_dir"
S = TypeVar("S", bound=StageSummary)


@st.cache_data(show_spinner=False, max_entries=16)
def _report(run_dir: str, stamp: float) -> str:
    from lfp_core.report import build_report, format_report

    return format_report(build_report(run_dir))


def report_text(run_dir: str) -> str:
    """The run's headline figures as ``python -m lfp_core.report RUN`` prints them (cached)."""
    try:
        return _report(run_dir, stamp(run_dir))
    except StoreError as exc:
        st.error(str(exc))
        st.stop()


def selected_run() -> str | None:
    """The run chosen in the sidebar (None when there is none)."""
    return st.session_state.get(RUN_KEY)


def require_run() -> str:
    """The selected run, or an explanatory message and a stop when there is none."""
    run = selected_run()
    if run is None:
        st.info(
            f"No run selected. No runs were found under `{runs_dir()}`. Compute the demo run with "
            "`./lfp demo`, or any run with `python -m lfp_core.precompute --preset quick --out data/runs/quick`, "
            "or type a run directory in the sidebar."
        )
        st.stop()
    return run


def sidebar(default_run: str | None = None) -> None:
    """Draw the run picker and the selected run's model and task; store the choice in session state."""
    runs = {p.name: str(p) for p in list_runs(runs_dir())}
    qp = st.query_params.get("run")
    wanted = qp or st.session_state.get(RUN_KEY) or default_run
    with st.sidebar:
        st.markdown("### LFP Explorer")
        names = list(runs)
        if wanted and wanted not in runs.values() and wanted not in runs:
            p = Path(wanted)
            if not p.is_absolute() and not p.exists() and (runs_dir() / wanted).exists():
                p = runs_dir() / wanted
            runs[str(wanted)] = str(p)
            names.append(str(wanted))
        index = 0
        if wanted:
            for i, n in enumerate(names):
                if n == wanted or runs[n] == wanted or Path(runs[n]).resolve() == Path(wanted).resolve():
                    index = i
                    break
        choice = st.selectbox(
            "Run", names, index=index if names else None, key="lfp_run_select", placeholder="no runs under data/runs"
        )
        typed = st.text_input(
            "…or a run directory", value="", key="lfp_run_path", placeholder="/path/to/data/runs/NAME"
        )
        run_dir = typed.strip() or (runs[choice] if choice else None)
        st.session_state[RUN_KEY] = run_dir
        if run_dir and st.query_params.get("run") != run_param(run_dir):
            st.query_params["run"] = run_param(run_dir)  # the address bar names the run shown (shareable)
        if run_dir:
            try:
                data = RunData(run_dir, stop_on_error=False)
                info = data.run_info()
                model = data.model_info("base")
            except StoreError as exc:
                st.caption(f"⚠️ {exc}")
            else:
                rs = run_settings_of(info.get("config"))
                st.caption(
                    f"**Model:** {model['name'] if model else rs.model}  \n"
                    f"**Task:** {rs.task}  \n**Preset:** {info.get('preset', '?')}"
                )


def require_stage(data: RunData, kind: type[S], what: str) -> S:
    """The summary of the finished stage ``kind`` describes (e.g. ``ProbesSummary``), or a message saying
    how to compute it and a stop.

    ``what`` is the page's noun for the missing results, e.g. "SAEs" -> "No SAEs yet: ...".
    """
    summary = data.summary(kind)
    if summary is None:
        st.info(
            f"No {what} yet: the `{kind.STAGE}` stage has not finished. Compute it (finished stages are kept) "
            f"with `python -m lfp_core.precompute --out {data.run_dir}`."
        )
        st.stop()
        raise AssertionError("unreachable")  # st.stop raises
    return summary


def require_feature_layers(data: RunData) -> pd.DataFrame:
    """(role, layer, n_features) of the analysed SAEs, or a message (stage missing / nothing stored) and a stop."""
    require_stage(data, FeaturesSummary, "feature statistics")
    layers = data.feature_layers()
    if layers.empty:
        st.info("The features stage finished but stored no features (no SAEs on the selected layers).")
        st.stop()
    return layers


def run_param(run_dir: str) -> str:
    """How a link names the run: its folder name when it lives under data/runs, else its path."""
    p = Path(run_dir)
    try:
        if p.resolve().parent == runs_dir().resolve():
            return p.name
    except OSError:
        pass
    return str(run_dir)


def feature_url(run_dir: str, role: str, layer: int, feature: int) -> str:
    """A relative deep link to a feature page (works under any base path)."""
    from urllib.parse import urlencode

    return "feature?" + urlencode(
        {"run": run_param(run_dir), "role": role, "layer": int(layer), "feature": int(feature)}
    )
