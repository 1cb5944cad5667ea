"""Plotly figures of the model-diffing page (split from :mod:`lfp_core.viz`, which is near its size limit):
the relative decoder norms of a crosscoder beside the null control's, the latent-scaling ratios of its
tuned-only latents, and the component-patching fractions with their CIs.

As in :mod:`lfp_core.viz`, run text that goes into a figure (legend names, tick labels, hover text) is
escaped with :func:`lfp_core.safetext.html_text`: Plotly reads a subset of HTML in every text it draws.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lfp_core.safetext import html_text

PAIR_NAMES = {"tuned": "fine-tune", "null": "null control"}
PAIR_COLOURS = {"tuned": "rgba(31,119,180,0.65)", "null": "rgba(255,127,14,0.55)"}
CLASS_COLOURS = {
    "robust tuned-only": "rgba(214,39,40,0.9)",
    "tuned-only": "rgba(255,127,14,0.9)",
    "shared": "rgba(127,127,127,0.7)",
    "base-only": "rgba(44,160,44,0.9)",
}


def pair_name(pair: str) -> str:
    """What a ``pair`` compares with the base model, in words (the pair itself when unknown)."""
    return PAIR_NAMES.get(pair, pair)


def rel_norm_histogram(latents: pd.DataFrame, tuned_only: float, bins: int = 25) -> go.Figure:
    """Histogram of the relative decoder norm ‖d_other‖/(‖d_base‖+‖d_other‖) of one layer's crosscoder
    latents, one overlaid trace per pair (the null control's beside the fine-tune's), the class boundaries
    ``1 − tuned_only`` and ``tuned_only`` drawn. Latents without a norm (dead) are left out."""
    fig = go.Figure()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for pair, g in latents.dropna(subset=["rel_norm"]).groupby("pair", sort=False):
        counts, _ = np.histogram(g.rel_norm.astype(float), bins=edges)
        fig.add_bar(
            x=(edges[:-1] + edges[1:]) / 2,
            y=counts,
            width=1.0 / bins,
            name=html_text(f"{pair_name(str(pair))} ({len(g)} latents)"),
            marker_color=PAIR_COLOURS.get(str(pair), "rgba(120,120,120,0.5)"),
            hovertemplate="r %{x:.2f}: %{y} latents<extra></extra>",
        )
    for x in (1 - tuned_only, tuned_only):
        fig.add_vline(x=x, line_dash="dot", line_color="black", line_width=1)
    fig.update_layout(
        height=300,
        barmode="overlay",
        xaxis={"title": "relative decoder norm (0 = base only, 1 = other model only)", "range": [0, 1]},
        yaxis={"title": "latents"},
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.15},
    )
    return fig


def nu_scatter(latents: pd.DataFrame, nu_max: float) -> go.Figure:
    """ν^ε vs ν^r of tuned-only crosscoder latents (latent scaling: how much of the latent the base model's
    error and reconstruction explain), coloured by class, a marker per pair; the robust region
    (both below ``nu_max``) outlined."""
    fig = go.Figure()
    df = latents.dropna(subset=["nu_eps", "nu_r"])
    for (pair, cls), g in df.groupby(["pair", "class"], sort=False):
        fig.add_scatter(
            x=g.nu_eps,
            y=g.nu_r,
            mode="markers",
            name=html_text(f"{cls} ({pair_name(str(pair))})"),
            marker={
                "size": 9,
                "color": CLASS_COLOURS.get(str(cls), "rgba(120,120,120,0.8)"),
                "symbol": "circle" if pair == "tuned" else "x",
            },
            text=[html_text(f"L{a} #{b}") for a, b in zip(g.layer, g.latent)],
            hovertemplate="%{text}<br>ν^ε %{x:.3f}<br>ν^r %{y:.3f}<extra></extra>",
        )
    fig.add_shape(
        type="rect", x0=0, y0=0, x1=nu_max, y1=nu_max, line={"dash": "dot", "color": "black"}, fillcolor="rgba(0,0,0,0)"
    )
    fig.add_vline(x=nu_max, line_dash="dot", line_color="black", line_width=1)
    fig.add_hline(y=nu_max, line_dash="dot", line_color="black", line_width=1)
    fig.update_layout(
        height=380,
        xaxis={"title": "ν^ε (base error explains it)", "rangemode": "tozero"},
        yaxis={"title": "ν^r (base reconstruction explains it)", "rangemode": "tozero"},
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.12},
    )
    return fig


def patching_bars(rows: pd.DataFrame) -> go.Figure:
    """Fraction of the tuned − base reward gain each component carries (its output taken from the base
    model), 95% CI error bars; 'all' is every component patched at once. Rows without a fraction (the
    gain's CI includes 0) are left out."""
    df = rows[rows.kind.isin(["attn", "mlp", "all"])].dropna(subset=["frac"])
    colour = {"attn": "rgba(31,119,180,0.85)", "mlp": "rgba(255,127,14,0.85)", "all": "rgba(90,90,90,0.85)"}
    fig = go.Figure()
    for kind, g in df.groupby("kind", sort=False):
        fig.add_bar(
            x=[html_text(c) for c in g.component],
            y=g.frac,
            name=html_text(kind),
            marker_color=colour.get(str(kind), "rgba(150,150,150,0.8)"),
            error_y={"type": "data", "symmetric": False, "array": g.frac_hi - g.frac, "arrayminus": g.frac - g.frac_lo},
        )
    fig.add_hline(y=0, line_color="black", line_width=1)
    fig.update_layout(
        height=340,
        yaxis={"title": "fraction of the reward gain carried"},
        xaxis={"categoryorder": "array", "categoryarray": [html_text(c) for c in df.component]},
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.12},
    )
    return fig
