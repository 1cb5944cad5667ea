"""Plotly figures and token-highlight HTML for the dashboard.

Every piece of text that goes into markup passes through :func:`lfp_core.safetext.html_text` here
(:func:`html.escape` after making bidi and control characters visible), so a token such as
``<script>alert(1)</script>`` is shown as text, never executed, and a U+202E in a completion cannot
reverse what follows it. Plotly reads a subset of HTML (``<a href>``, ``<b>``, entities) in every
text it draws, so run text in a figure (tick labels, legend names, hover text) is escaped too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from lfp_core import reward
from lfp_core.safetext import html_text


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
        out.append(html_text(text[pos : w.start]))
        word = html_text(text[w.start : w.end])
        out.append(
            f'<span class="lfp-word" title="{html_text(w.text)}: {w.valence:+.1f}" '
            f'style="background:{_valence_colour(w.valence)};border-radius:3px;padding:0 2px">{word}</span>'
        )
        pos = w.end
    out.append(html_text(text[pos:]))
    return "".join(out)


def completion_html(prompt: str, completion: str, reward_value: float) -> str:
    """One completion: the prompt in grey, the completion highlighted, the reward at the end."""
    return (
        f'<div class="lfp-completion" style="margin:2px 0;font-family:monospace;white-space:pre-wrap">'
        f'<span style="color:#888">{html_text(prompt)}</span>{valence_html(completion)}'
        f' <b style="color:#555">[{reward_value:+.2f}]</b></div>'
    )


def reward_histogram(
    df: pd.DataFrame, column: str = "reward", title: str = "Reward of base-model completions"
) -> go.Figure:
    """Histogram of a reward column."""
    fig = go.Figure(go.Histogram(x=df[column], nbinsx=40, marker_color="#4c78a8"))
    fig.update_layout(
        title=title,
        xaxis_title="VADER reward (sum of valences / 5, clipped ±10)",
        yaxis_title="completions",
        height=320,
        margin=dict(l=40, r=20, t=50, b=40),
    )
    return fig


def rl_curves(steps: pd.DataFrame) -> go.Figure:
    """Per-step mean reward (with ±1 std band of the batch) and KL to the base model."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Mean reward per step", "KL(policy ‖ base) per step"))
    fig.add_trace(
        go.Scatter(
            x=steps.step, y=steps.reward + steps.reward_std, line=dict(width=0), showlegend=False, hoverinfo="skip"
        ),
        1,
        1,
    )
    fig.add_trace(
        go.Scatter(
            x=steps.step,
            y=steps.reward - steps.reward_std,
            fill="tonexty",
            line=dict(width=0),
            fillcolor="rgba(76,120,168,0.2)",
            name="± batch std",
            hoverinfo="skip",
        ),
        1,
        1,
    )
    fig.add_trace(go.Scatter(x=steps.step, y=steps.reward, name="reward", line=dict(color="#4c78a8")), 1, 1)
    fig.add_trace(go.Scatter(x=steps.step, y=steps.kl, name="KL", line=dict(color="#e45756")), 1, 2)
    fig.update_xaxes(title_text="GRPO step")
    fig.update_layout(height=320, margin=dict(l=40, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


def divergence_bars(div: pd.DataFrame) -> go.Figure:
    """Parameter and activation divergence per layer, selected layers outlined and starred."""
    from plotly.subplots import make_subplots

    labels = [f"L{int(r.layer)}{' ★' if r.selected else ''}" for r in div.itertuples()]
    line = dict(color=["#222" if s else "rgba(0,0,0,0)" for s in div.selected], width=2)
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=(
            "Parameter divergence Σ‖θ_base − θ_tuned‖_F",
            "MLP-out 1 − cos (mean over tokens)",
            "MLP-out relative L2",
        ),
    )
    fig.add_trace(go.Bar(x=labels, y=div.param, marker=dict(color="#4c78a8", line=line), name="param"), 1, 1)
    fig.add_trace(go.Bar(x=labels, y=div.act_cos, marker=dict(color="#f58518", line=line), name="1 − cos"), 1, 2)
    fig.add_trace(go.Bar(x=labels, y=div.act_rel_l2, marker=dict(color="#54a24b", line=line), name="rel. L2"), 1, 3)
    fig.update_layout(height=340, showlegend=False, margin=dict(l=40, r=20, t=60, b=40))
    return fig


def paired_html(prompt: str, base: str, base_reward: float, tuned: str, tuned_reward: float) -> str:
    """A held-out prompt with the base and the tuned completion side by side."""
    cell = 'style="padding:4px 8px;vertical-align:top;font-family:monospace;white-space:pre-wrap;width:50%"'
    return (
        f'<tr class="lfp-pair"><td {cell}><span style="color:#888">{html_text(prompt)}</span>{valence_html(base)}'
        f' <b>[{base_reward:+.2f}]</b></td><td {cell}><span style="color:#888">{html_text(prompt)}</span>'
        f"{valence_html(tuned)} <b>[{tuned_reward:+.2f}]</b></td></tr>"
    )


def paired_table(rows: list[str]) -> str:
    head = '<tr><th style="text-align:left">base model</th><th style="text-align:left">tuned policy</th></tr>'
    return f'<table class="lfp-pairs" style="width:100%;border-collapse:collapse">{head}{"".join(rows)}</table>'


def l1_sweep_chart(sweep: pd.DataFrame) -> go.Figure:
    """The paper's sparsity trade-off: reconstruction error (FVU) and L0 against the L1 coefficient."""
    from plotly.subplots import make_subplots

    d = sweep.sort_values("l1_coefficient")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=d.l1_coefficient, y=d.fvu, mode="lines+markers", name="FVU (held out)")
    fig.add_scatter(x=d.l1_coefficient, y=d.l0, mode="lines+markers", name="L0", secondary_y=True)
    fig.update_xaxes(type="log", title="L1 coefficient")
    fig.update_yaxes(title="FVU", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title="L0 (features active per token)", secondary_y=True, rangemode="tozero")
    fig.update_layout(height=340, margin={"t": 30, "b": 40}, legend={"orientation": "h", "y": 1.12})
    return fig


def probe_scatter(words: pd.DataFrame, taus: dict[str, dict]) -> go.Figure:
    """Per word: VADER valence (x) against the probe's rescaled prediction (y), one colour per split,
    with Kendall τ and p of each split in the legend."""
    fig = go.Figure()
    for split, colour in (("occurrence", "#1f77b4"), ("word", "#ff7f0e")):
        d = words[words.split == split]
        if d.empty:
            continue
        t = taus.get(split, {})
        fig.add_scatter(
            x=d.valence,
            y=d.pred_rescaled,
            mode="markers",
            name=f"{split} split: τ {t.get('tau', float('nan')):.3f}, "
            f"p {t.get('p', float('nan')):.1e}, {t.get('n_words', len(d))} words",
            marker={"color": colour, "size": 6, "opacity": 0.6},
            text=[html_text(str(w)) for w in d.word],
            hovertemplate="%{text}: VADER %{x}, probe %{y:.2f}",
        )
    lim = [-4.2, 4.2]
    fig.add_scatter(
        x=lim, y=lim, mode="lines", line={"dash": "dot", "color": "grey"}, showlegend=False, hoverinfo="skip"
    )
    fig.update_layout(
        height=430,
        xaxis_title="VADER valence",
        yaxis_title="probe prediction (rescaled)",
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.1},
    )
    return fig


def sequence_scatter(rows: pd.DataFrame, score: Mapping[str, Any]) -> go.Figure:
    """Per held-out completion: its reward (x) against the sequence probe's prediction (y), one colour per
    policy that wrote it, with ρ and its bootstrap CI over prompts in the title."""
    fig = go.Figure()
    for policy, colour in (("base", "#7f7f7f"), ("tuned", "#1f77b4")):
        d = rows[rows.policy == policy]
        if d.empty:
            continue
        fig.add_scatter(
            x=d.reward,
            y=d.pred,
            mode="markers",
            name=f"{policy} policy's completions ({len(d)})",
            marker={"color": colour, "size": 6, "opacity": 0.6},
            text=[f"prompt {int(p)} · sample {int(k)}" for p, k in zip(d.prompt_id, d.sample_idx)],
            hovertemplate="%{text}: reward %{x:.3f}, probe %{y:.3f}",
        )
    fig.update_layout(
        height=400,
        title=f"held-out: Spearman ρ {score.get('rho', float('nan')):.3f} (95% CI over prompts "
        f"{score.get('lo', float('nan')):.3f} to {score.get('hi', float('nan')):.3f})",
        xaxis_title="reward",
        yaxis_title="sequence probe prediction",
        margin={"t": 40},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def sign_accuracy_bars(rows: list[dict]) -> go.Figure:
    """rows: {split, polarity, accuracy}."""
    d = pd.DataFrame(rows)
    fig = go.Figure()
    for pol, colour in (("positive words", "rgba(34,139,34,0.8)"), ("negative words", "rgba(200,30,30,0.8)")):
        s = d[d.polarity == pol]
        fig.add_bar(x=s.split, y=s.accuracy, name=pol, marker_color=colour, text=[f"{v:.2f}" for v in s.accuracy])
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    fig.update_layout(height=320, barmode="group", yaxis={"range": [0, 1], "title": "sign accuracy"}, margin={"t": 30})
    return fig


def error_vs_frequency(words: pd.DataFrame) -> go.Figure:
    d = words[words.tuned_count > 0]
    fig = go.Figure(
        go.Scatter(
            x=d.tuned_count,
            y=d.abs_error,
            mode="markers",
            marker={"size": 6, "opacity": 0.6},
            text=[html_text(str(w)) for w in d.word],
            hovertemplate="%{text}: generated %{x} times, |error| %{y:.2f}",
        )
    )
    fig.update_layout(
        height=320,
        xaxis={"type": "log", "title": "times the tuned policy generated the word"},
        yaxis_title="|rescaled prediction − VADER|",
        margin={"t": 30},
    )
    return fig


def pca_scatter(df: pd.DataFrame, ratio: list[float]) -> go.Figure:
    fig = go.Figure()
    palette = ["rgba(34,139,34,0.6)", "rgba(200,30,30,0.6)"]
    for label, colour in zip(sorted(df.label.unique(), reverse=True), palette):
        d = df[df.label == label]
        fig.add_scatter(x=d.pc1, y=d.pc2, mode="markers", name=html_text(label), marker={"color": colour, "size": 5})
    fig.update_layout(
        height=420,
        margin={"t": 30},
        xaxis_title=f"PC1 ({ratio[0]:.1%} of variance)" if ratio else "PC1",
        yaxis_title=f"PC2 ({ratio[1]:.1%} of variance)" if len(ratio) > 1 else "PC2",
    )
    return fig


def token_scores_html(tokens: list[str], true: list[float | None], pred: list[float | None]) -> str:
    """Tokens (escaped) on two rows of colour: the probe's predicted valence and VADER's, at the
    positions the probe scores (a word's last token); the values are in the hover title."""
    cells = []
    for tok, t, p in zip(tokens, true, pred):
        text = _token_text(tok)
        if p is None or t is None:
            cells.append(f"<span class='lfp-tok'>{text}</span>")
            continue
        title = html_text(f"probe {p:+.2f} · VADER {t:+.2f}")
        cells.append(
            f"<span class='lfp-tok' title='{title}' style='background:{_valence_colour(p)};"
            f"border-bottom:4px solid {_valence_colour(t)}'>{text}</span>"
        )
    return (
        "<div class='lfp-tokens' style='line-height:2.1;font-family:monospace'>" + "".join(cells) + "</div>"
        "<div style='font-size:0.8em;color:grey'>fill: probe prediction · underline: VADER valence</div>"
    )


def _token_text(tok: str) -> str:
    """A token as escaped HTML that keeps its spaces and shows a line break as ⏎.

    The token HTML is drawn through markdown (``unsafe_allow_html``) as one HTML block, which a blank
    line would end (the rest would be read as markdown), so no line break may reach it."""
    text = html_text(tok).replace("\r\n", "⏎").replace("\r", "⏎").replace("\n", "⏎")
    return text.replace(" ", "&nbsp;") or "&nbsp;"


def activation_context_html(tokens: list[str], acts: list[float], center: int, vmax: float) -> str:
    """One example context: each (escaped) token shaded by the feature's activation on it (value on
    hover), the example's own token outlined."""
    cells = []
    scale = vmax if vmax and vmax > 0 else max([a for a in acts if a] + [1.0])
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = min(1.0, max(0.0, float(a)) / scale) * 0.85
        outline = "outline:2px solid #333;" if i == center else ""
        cells.append(
            f"<span class='lfp-act' title='{float(a):.3f}' style='background:rgba(245,133,24,{alpha:.2f});"
            f"{outline}border-radius:2px'>{_token_text(tok)}</span>"
        )
    return (
        "<div class='lfp-context' style='font-family:monospace;line-height:1.9;margin:2px 0'>"
        + "".join(cells)
        + "</div>"
    )


def activation_histogram(counts: list[int], max_act: float) -> go.Figure:
    """Histogram of a feature's non-zero activations (equal bins over [0, max])."""
    n = len(counts)
    width = max_act / n if n and max_act > 0 else 1.0
    fig = go.Figure(
        go.Bar(
            x=[(i + 0.5) * width for i in range(n)],
            y=list(counts),
            width=width * 0.95,
            marker_color="#f58518",
            hovertemplate="%{x:.3f}: %{y} tokens<extra></extra>",
        )
    )
    fig.update_layout(
        height=260,
        margin={"t": 20, "b": 40, "l": 40, "r": 10},
        xaxis_title="activation (non-zero)",
        yaxis_title="tokens",
    )
    if sum(counts) > 0:
        fig.update_yaxes(type="log", dtick=1)  # ticks at 1, 10, 100, … (activation counts are heavy-tailed)
    return fig


def label_frequency_bars(freq: pd.DataFrame) -> go.Figure:
    """Per feature set: firing rate on high- vs low-reward completions (the paper's frequency table)."""
    fig = go.Figure()
    sets = [html_text(s) for s in freq["set"]]
    fig.add_bar(x=sets, y=freq.freq_high, name="high-reward completions", marker_color="rgba(34,139,34,0.8)")
    fig.add_bar(x=sets, y=freq.freq_low, name="low-reward completions", marker_color="rgba(200,30,30,0.8)")
    fig.update_layout(
        height=320,
        barmode="group",
        yaxis={"title": "share of completions it fires on"},
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.12},
    )
    return fig


def ablation_effects(sets: pd.DataFrame) -> go.Figure:
    """Reward change (after − before, 95% CI) of each ablated feature set; random controls in grey."""
    df = sets[sets.kind != "baseline"]
    colour = {
        "probe_top": "rgba(31,119,180,0.9)",
        "labelled": "rgba(148,103,189,0.9)",  # runs of schema 4
        "labelled_pos": "rgba(44,160,44,0.9)",
        "labelled_neg": "rgba(214,39,40,0.9)",
        "all": "rgba(90,90,90,0.9)",
    }
    fig = go.Figure()
    for kind, g in df.groupby("kind", sort=False):
        fig.add_bar(
            x=[html_text(x) for x in g.set_id],
            y=g["diff"],
            name=html_text(kind),
            marker_color=colour.get(kind, "rgba(180,180,180,0.8)"),
            error_y={
                "type": "data",
                "symmetric": False,
                "array": g.diff_hi - g["diff"],
                "arrayminus": g["diff"] - g.diff_lo,
            },
        )
    fig.add_hline(y=0, line_color="black", line_width=1)
    fig.update_layout(
        height=340,
        yaxis={"title": "mean reward change (ablated − clean)"},
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.12},
    )
    return fig


def attribution_scatter(
    points: pd.DataFrame, features: pd.DataFrame, estimate: str = "estimate", label: str = "AtP"
) -> go.Figure:
    """An attribution estimate (column ``estimate`` of both frames, called ``label``) vs the true ablation
    effect: one faint point per (text, feature), one large point per feature (means over texts; the
    verified random sample in orange, the top features by the estimate in blue), and the line y = x."""
    fig = go.Figure()
    points = points.dropna(subset=[estimate, "true_effect"]) if estimate in points else points.iloc[:0]
    if not points.empty:
        fig.add_scatter(
            x=points[estimate],
            y=points.true_effect,
            mode="markers",
            name="(text, feature)",
            marker={"size": 4, "color": "rgba(120,120,120,0.35)"},
            hoverinfo="skip",
        )
    f = features.dropna(subset=[estimate, "true_effect"]) if estimate in features else features.iloc[:0]
    kinds = f["verified"] if "verified" in f else pd.Series(None, index=f.index, dtype=object)
    for sel, name, colour in (
        (kinds.isin(["top", "both"]), "feature: top by |AtP| (mean over texts)", "rgba(31,119,180,0.9)"),
        (kinds.eq("random"), "feature: random sample (mean over texts)", "rgba(255,127,14,0.9)"),
        (kinds.isna(), "feature (mean over texts)", "rgba(31,119,180,0.9)"),  # runs before schema 5
    ):
        g = f[sel]
        if g.empty:
            continue
        fig.add_scatter(
            x=g[estimate],
            y=g.true_effect,
            mode="markers",
            name=name,
            marker={"size": 9, "color": colour},
            text=[f"L{a} #{b}" for a, b in zip(g.layer, g.feature)],
            hovertemplate="%{text}<br>estimate %{x:.4f}<br>true %{y:.4f}<extra></extra>",
        )
    vals = [0.0, *points.get(estimate, []), *points.get("true_effect", []), *f[estimate], *f.true_effect]
    lo, hi = (min(vals), max(vals)) if len(f) else (-1, 1)
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "black"})
    fig.update_layout(
        height=380,
        xaxis={"title": f"estimated change if zeroed ({label})"},
        yaxis={"title": "true change when zeroed"},
        margin={"t": 30},
        legend={"orientation": "h", "y": 1.1},
    )
    return fig


def next_token_bars(rows: list[dict]) -> go.Figure:
    """Change of next-token probabilities under an ablation (the tokens that moved most)."""
    df = pd.DataFrame(rows)
    fig = go.Figure()
    if not df.empty:
        fig.add_bar(
            y=[html_text(repr(t)) for t in df.token],
            x=df.change,
            orientation="h",
            marker_color=["rgba(34,139,34,0.8)" if c > 0 else "rgba(200,30,30,0.8)" for c in df.change],
            hovertemplate="%{y}: %{x:+.4f}<extra></extra>",
        )
    fig.update_layout(
        height=max(220, 22 * len(df)),
        xaxis={"title": "p(ablated) − p(clean)"},
        yaxis={"autorange": "reversed"},
        margin={"t": 20, "l": 120},
    )
    return fig


def fmt_p(p: float | None) -> str:
    """A p-value as text for tables: blank when missing, '< 1e-300' when it underflows, else 2 digits."""
    if p is None or p != p:  # None or NaN
        return ""
    if p == 0:
        return "< 1e-300"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"
