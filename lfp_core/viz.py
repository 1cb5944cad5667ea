"""Plotly figures and token-highlight HTML for the dashboard.

Every piece of text that goes into markup passes through :func:`html.escape` here, so a token
such as ``<script>alert(1)</script>`` is shown as text, never executed.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from lfp_core import reward


def _valence_colour(v: float, vmax: float = 4.0) -> str:
    """Green for positive, red for negative valence; alpha grows with |v|."""
    a = min(1.0, abs(v) / vmax) * 0.75 + 0.1
    return f"rgba(34,139,34,{a:.2f})" if v > 0 else f"rgba(200,30,30,{a:.2f})"


def valence_html(text: str) -> str:
    """The text as escaped HTML with each VADER-lexicon word highlighted by its valence.

    The value is in the ``title`` attribute, so hovering a word shows it.
    """
    out: list[str] = []
    pos = 0
    for w in reward.segment(text):
        if not w.in_lexicon:
            continue
        out.append(html.escape(text[pos : w.start]))
        word = html.escape(text[w.start : w.end])
        out.append(
            f'<span class="lfp-word" title="{html.escape(w.text)}: {w.valence:+.1f}" '
            f'style="background:{_valence_colour(w.valence)};border-radius:3px;padding:0 2px">{word}</span>'
        )
        pos = w.end
    out.append(html.escape(text[pos:]))
    return "".join(out)


def completion_html(prompt: str, completion: str, reward_value: float) -> str:
    """One completion: the prompt in grey, the completion highlighted, the reward at the end."""
    return (
        f'<div class="lfp-completion" style="margin:2px 0;font-family:monospace;white-space:pre-wrap">'
        f'<span style="color:#888">{html.escape(prompt)}</span>{valence_html(completion)}'
        f' <b style="color:#555">[{reward_value:+.2f}]</b></div>'
    )


def reward_histogram(df: pd.DataFrame, column: str = "reward", title: str = "Reward of base-model completions") -> go.Figure:
    """Histogram of a reward column."""
    fig = go.Figure(go.Histogram(x=df[column], nbinsx=40, marker_color="#4c78a8"))
    fig.update_layout(title=title, xaxis_title="VADER reward (sum of valences / 5, clipped ±10)",
                      yaxis_title="completions", height=320, margin=dict(l=40, r=20, t=50, b=40))
    return fig
