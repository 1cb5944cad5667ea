"""Shared dashboard pieces: the run picker, the selected run, and the checks pages make before they
draw (a stage not finished, no features). Pages read the run through :class:`views.data.RunData`
(typed, cached per run version).

Text that comes from a run, an LLM or the address bar goes into markdown only through
:func:`md_text` (or :func:`md_code` inside a code span), never as markdown of its own: see
:mod:`lfp_core.safetext`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from lfp_core.config import runs_dir
from lfp_core.safetext import md_code, md_text, visible_controls
from lfp_core.settings import run_settings_of
from lfp_core.store import StoreError, list_runs
from lfp_core.store.summaries import FeaturesSummary, StageSummary
from views.data import RunData, stamp

RUN_KEY = "lfp_run_dir"
PROBLEM_KEY = "lfp_run_problem"  # why a ?run= value was not used; shown until a run is picked in the sidebar
MAX_RUN_CHARS = 1024  # a run name or path in a link or the sidebar box; longer is refused with a message
MAX_TEXT_CHARS = 4000  # the live boxes (ablation lab, reward model): a longer text is cut, with a notice
S = TypeVar("S", bound=StageSummary)


@st.cache_data(show_spinner=False, max_entries=16)
def _report(run_dir: str, stamp: float) -> str:
    from lfp_core.report import build_report, format_report

    return format_report(build_report(run_dir))


def report_text(run_dir: str) -> str:
    """The run's headline figures as ``python -m lfp_core.report RUN`` prints them (cached)."""
    try:
        return visible_controls(_report(run_dir, stamp(run_dir)))
    except StoreError as exc:
        st.error(md_text(exc))
        st.stop()


def selected_run() -> str | None:
    """The run chosen in the sidebar (None when there is none)."""
    return st.session_state.get(RUN_KEY)


def require_run() -> str:
    """The selected run, or an explanatory message and a stop when there is none."""
    run = selected_run()
    if run is None:
        st.info(
            f"No run selected. No runs were found under {md_code(runs_dir())}. Compute the demo run with "
            "`./lfp demo`, or any run with `python -m lfp_core.precompute --preset quick --out data/runs/quick`, "
            "or type a run directory in the sidebar."
        )
        st.stop()
    return run


def bounded_text(text: str, limit: int = MAX_TEXT_CHARS, what: str = "The text", where: Any = st) -> str:
    """``text`` cut to its first ``limit`` characters, with a warning (in ``where``, a container) saying
    so when it was longer.

    The live boxes set no ``max_chars``: Streamlit's text area ignores a paste longer than that
    entirely (the box stays as it was, with no message), so the text is kept and cut here instead."""
    if len(text) <= limit:
        return text
    where.warning(
        f"{what} has {len(text):,} characters; only its first {limit:,} are used (the rest stays in the box "
        "but is ignored)."
    )
    return text[:limit]


def run_value_problem(value: str, where: str) -> str | None:
    """Why ``value`` (a ``?run=`` parameter or the sidebar box, named by ``where``) cannot name a run
    directory, as one markdown line; None when it can (whether a run is there is the store's to say)."""
    bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        return (
            f"{where} holds a control character (U+{ord(bad):04X}), so it names no run directory; "
            "pick a run in the sidebar."
        )
    if len(value) > MAX_RUN_CHARS:
        return (
            f"{where} is {len(value):,} characters long; a run name or path has at most {MAX_RUN_CHARS:,}. "
            "Pick a run in the sidebar."
        )
    try:
        p = Path(value)
        p.exists()
        (runs_dir() / value).exists()
        p.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. a path component over the file system's limit
        return f"{where} {md_code(value[:80])} cannot name a run directory ({md_text(exc.__class__.__name__)}: " + (
            md_text(getattr(exc, "strerror", None) or exc) + "); pick a run in the sidebar."
        )
    return None


def sidebar(default_run: str | None = None) -> None:
    """Draw the run picker and the selected run's model and task; store the choice in session state.

    A ``?run=`` value or a typed path that cannot name a run directory (a control character, too
    long, a path the OS refuses) is not used: a message on the page says why."""
    runs = {p.name: str(p) for p in list_runs(runs_dir())}
    qp = st.query_params.get("run")
    if qp and (why := run_value_problem(qp, "The link's `run`")):
        st.session_state[PROBLEM_KEY] = why  # the address bar is rewritten below: the message stays
        qp = None
    wanted = qp or st.session_state.get(RUN_KEY) or default_run
    if wanted and run_value_problem(wanted, ""):
        wanted = None
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
            "Run",
            names,
            index=index if names else None,
            key="lfp_run_select",
            placeholder="no runs under data/runs",
            format_func=visible_controls,
            on_change=_picked,
        )
        typed = st.text_input(
            "…or a run directory",
            value="",
            key="lfp_run_path",
            placeholder="/path/to/data/runs/NAME",
            on_change=_picked,
        ).strip()
        typed_problem = typed and run_value_problem(typed, "The run directory typed in the sidebar")
        if typed_problem:
            typed = ""
        run_dir = typed or (runs[choice] if choice else None)
        st.session_state[RUN_KEY] = run_dir
        if run_dir and st.query_params.get("run") != run_param(run_dir):
            st.query_params["run"] = run_param(run_dir)  # the address bar names the run shown (shareable)
        if run_dir:
            try:
                data = RunData(run_dir, stop_on_error=False)
                info = data.run_info()
                model = data.model_info("base")
            except StoreError as exc:
                st.caption(f"⚠️ {md_text(exc)}")
            else:
                rs = run_settings_of(info.get("config"))
                st.caption(
                    f"**Model:** {md_text(model['name'] if model else rs.model)}  \n"
                    f"**Task:** {md_text(rs.task)}  \n**Preset:** {md_text(info.get('preset', '?'))}"
                )
    for why in (st.session_state.get(PROBLEM_KEY), typed_problem):
        if why:
            st.error(why)


def _picked() -> None:
    """A run was chosen in the sidebar: a refused link's message has done its work."""
    st.session_state.pop(PROBLEM_KEY, None)


def require_stage(data: RunData, kind: type[S], what: str) -> S:
    """The summary of the finished stage ``kind`` describes (e.g. ``ProbesSummary``), or a message saying
    how to compute it and a stop.

    ``what`` is the page's noun for the missing results, e.g. "SAEs" -> "No SAEs yet: ...".
    """
    summary = data.summary(kind)
    if summary is None:
        st.info(
            f"No {what} yet: the `{kind.STAGE}` stage has not finished. Compute it (finished stages are kept) "
            f"with {md_code(f'python -m lfp_core.precompute --out {data.run_dir}')}."
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
