"""Text from a run, an LLM or the address bar is shown as text (issue 20, "Also found"): a label, a
model name, a run name, a completion, a ``?run=`` value cannot become a link, an image, a Streamlit
directive or markup, and a U+202E cannot reverse what follows it. Odd ``?run=`` values (a NUL byte,
5,000 characters, a path the OS refuses) give a message, not a traceback; a paste longer than the
live lab's limit is kept and cut with a notice.

Every element of a page is checked (tests.app.test_untrusted_text.markdown_strings): the markdown
sources (bodies, labels, help texts, radio options) are rendered with markdown-it (CommonMark, GFM
tables and strikethrough) and must hold no link or image to the payloads' host, and no unescaped
autolink, ``:red[``/``:material/`` directive or raw tag; HTML bodies must hold no live tag of the payloads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt

from lfp_core import viz
from lfp_core.safetext import WORD_JOINER, html_text, md_code, md_text, show_controls, visible_controls
from tests.helpers import open_page
from tests.tiny_run import TinyRun

LABEL = "[click](http://evil.example) **bold** :red[red] ![img](http://evil.example/x.png)"
MODEL = "[Session expired — log in again](http://evil.example) :material/lock: $x^2$"
RLO = "\u202e"
COMPLETION = f" great <script>alert(1)</script> {RLO}[x](http://evil.example) bad"
RUN_PAYLOADS = ["![x](http://evil.example/b.png)", "[Session expired — log in again](http://evil.example)"]

_MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
_MD_HTML = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
MARKDOWN_FIELDS = {"body", "label", "help", "caption", "captions", "placeholder_markdown"}


class PayloadRun(TinyRun):
    """The tiny run with the payloads in its model name, its labels and its first base completion."""

    MODEL_NAME = MODEL

    def _explanation(self, words):
        return LABEL

    def _completion(self, prompt_id, role, words):
        row = super()._completion(prompt_id, role, words)
        if prompt_id == 0 and role == "base":
            row["text"] = COMPLETION
        return row


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory) -> Path:
    # the run's folder name is markdown too (a run's name is its folder's)
    return PayloadRun(tmp_path_factory.mktemp("runs") / "run_[x](y)_**b**").until("labels")


# --- collecting what a page renders ---------------------------------------------------------------------
@dataclass
class Rendered:
    markdown: list[str] = field(default_factory=list)  # sources Streamlit renders as markdown
    html: list[str] = field(default_factory=list)  # st.html bodies and markdown with unsafe_allow_html


def _strings(msg):
    """(field name, string) for every string field of a protobuf message, nested messages included."""
    for fd, value in msg.ListFields():
        single = isinstance(value, str | bytes | int | float) or hasattr(value, "ListFields")
        values = [value] if single else list(value)
        for v in values:
            if isinstance(v, str):
                yield fd.name, v
            elif hasattr(v, "ListFields"):
                yield from _strings(v)


def rendered(at) -> Rendered:
    out = Rendered()

    def walk(node):
        proto = getattr(node, "proto", None)
        kind = getattr(node, "type", "")
        if proto is not None and hasattr(proto, "ListFields") and kind not in ("code", "arrow_data_frame"):
            if kind == "html" or kind == "markdown" and proto.allow_html:
                out.html.append(proto.body)
            else:
                for name, text in _strings(proto):
                    if name in MARKDOWN_FIELDS or (kind == "radio" and name == "options"):
                        out.markdown.append(text)
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return out


# GFM turns bare URLs and e-mail addresses into links after escapes are resolved (on the shown text)
_AUTOLINK = re.compile(r"(?i)(?:https?://|www\.)[-.\w]|[-.\w+]+@[-\w]+\.\w")
_DIRECTIVE = re.compile(
    r"(?<!\\):(?:red|orange|yellow|green|blue|violet|gray|grey|rainbow|primary)(?:-background)?\[|(?<!\\):material/"
)


def assert_inert(r: Rendered) -> None:
    """No element links to or loads from the payloads' host, runs a directive, or holds a live tag."""
    assert r.markdown
    for src in r.markdown:
        html = _MD.render(src)
        assert "evil.example" not in "".join(re.findall(r"<(?:a|img)\b[^>]*>", html)), src
        assert "<img" not in html and "<script" not in html, src
        # outside code spans (literal there): GFM links a bare http://, www. or a@b.c of the shown
        # text, and Streamlit's :red[...] / :material/...: directives are read from the source
        text = unescape(re.sub(r"<[^>]+>", "", re.sub(r"<code>.*?</code>", "", html, flags=re.S)))
        assert not _AUTOLINK.search(text), src
        assert not _DIRECTIVE.search(re.sub(r"(`+).+?\1", "", src)), src
        assert RLO not in src, src
    for body in r.html:
        html = _MD_HTML.render(body)
        assert (
            "<script" not in body
            and "<img" not in body
            and "evil.example" not in "".join(re.findall(r"<a\b[^>]*>", html))
        ), body
        assert RLO not in body


# --- the helpers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        LABEL,
        MODEL,
        COMPLETION,
        "# title\n1. item\n---\n| a | b |\n|---|---|\n<b>x</b> &amp; @user www.x.org ~~s~~ \\",
        "mail me: someone@evil.example, or https://evil.example/x or WWW.evil.example",
    ],
)
def test_md_text_renders_as_exactly_its_text(text):
    html = _MD.render(md_text(text))
    assert not re.search(r"<(?!/?p>)", html.replace("&lt;", "")), html  # nothing but one paragraph
    text_shown = html.removeprefix("<p>").removesuffix("</p>\n").replace("&lt;", "<").replace("&gt;", ">")
    text_shown = text_shown.replace("&quot;", '"').replace("&amp;", "&")
    # the text, with a WORD JOINER breaking each would-be autolink (a paragraph drops leading spaces)
    assert text_shown.replace(WORD_JOINER, "") == visible_controls(text).strip()
    assert not _AUTOLINK.search(text_shown)


def test_md_code_cannot_be_closed_by_backticks_in_it():
    for text in ["a `b` c", "``x``", "`", "/runs/[x](http://evil.example)"]:
        html = _MD.render("see " + md_code(text))
        assert html.count("<code>") == 1 and "<a" not in html, html


def test_bidi_controls_are_made_visible_everywhere():
    assert visible_controls(f"a{RLO}b\u2066c\u200fd\x00e\tf\ng") == "a⟨U+202E⟩b⟨U+2066⟩c⟨U+200F⟩d⟨U+0000⟩e\tf\ng"
    assert html_text(f"<{RLO}>") == "&lt;⟨U+202E⟩&gt;"
    df = pd.DataFrame({"text": ["ok", f"x{RLO}y"], "tokens": [[" a"], np.array([RLO], dtype=object)], "n": [1, 2]})
    out = show_controls(df)
    assert list(out.text) == ["ok", "x⟨U+202E⟩y"] and list(out.tokens[1]) == ["⟨U+202E⟩"]
    assert out.n.tolist() == [1, 2] and df.text[1] == f"x{RLO}y"  # the original is left alone
    clean = pd.DataFrame({"text": ["ok"]})
    assert show_controls(clean) is clean and show_controls({"a": [1, "b"]}) == {"a": [1, "b"]}


def test_token_html_is_escaped_and_stays_one_html_block():
    """Token HTML goes through markdown (unsafe_allow_html) as one HTML block: a blank line in a token
    would end it and let the rest be read as markdown, so line breaks become ⏎."""
    tokens = ["<img src=x onerror=alert(1)>", "\n\n[x](http://evil.example) **b**", f"\r{RLO}"]
    for out in (
        viz.activation_context_html(tokens, [1.0, 0.5, 0.0], 0, 1.0),
        viz.token_scores_html(tokens, [None, 1.0, None], [None, 0.5, None]),
    ):
        assert "\n" not in out and "\r" not in out and "<img" not in out and RLO not in out
        assert "<a" not in _MD_HTML.render(out) and "⟨U+202E⟩" in out


def test_plotly_text_from_the_run_is_escaped():
    fig = viz.next_token_bars([{"token": '<a href="http://evil.example">x</a>', "change": 0.1}])
    assert "<a" not in fig.data[0].y[0] and "&lt;a" in fig.data[0].y[0]


# --- the pages on a run holding the payloads ------------------------------------------------------------
def test_feature_page_shows_an_llm_label_as_text(monkeypatch, payload_run):
    from lfp_core.store import RunReader

    lab = RunReader(payload_run).labels("tuned").iloc[0]
    at = open_page(
        monkeypatch, payload_run.parent, "views/feature.py", run=payload_run, role="tuned", layer=int(lab.layer),
        feature=int(lab.feature),
    )  # fmt: skip
    assert not at.exception
    r = rendered(at)
    assert_inert(r)
    assert any(md_text(LABEL) in m for m in r.markdown)  # the explanation is there, as its text
    assert any(md_text(MODEL) in m for m in r.markdown)  # the sidebar's model line


@pytest.mark.parametrize(
    "page", ["views/overview.py", "views/labels.py", "views/browser.py", "views/layers.py", "views/diffing.py"]
)
def test_pages_show_run_text_as_text(monkeypatch, payload_run, page):
    at = open_page(monkeypatch, payload_run.parent, page, run=payload_run)
    assert not at.exception
    assert_inert(rendered(at))


def test_overview_completion_with_script_and_rlo(monkeypatch, payload_run):
    at = open_page(monkeypatch, payload_run.parent, "views/overview.py", run=payload_run)
    r = rendered(at)
    assert at.title[0].value == f"Run · {md_text(payload_run.name)}"
    row = next(h for h in r.html if "lfp-completion" in h and "alert(1)" in h)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in row and "⟨U+202E⟩[x](http://evil.example)" in row
    # the reward stays outside the completion's text, after the visible marker, not reversed into it
    assert re.search(r"⟨U\+202E⟩.*\[[+-]\d", row)
    tables = [d.value for d in at.dataframe if "completion" in d.value.columns]
    assert any(c.startswith(" great <script>") and "⟨U+202E⟩" in c for t in tables for c in t.completion)
    assert all(RLO not in c for t in tables for c in t.completion)


@pytest.mark.parametrize("value", RUN_PAYLOADS)
def test_a_run_parameter_is_shown_as_text(monkeypatch, payload_run, value):
    at = open_page(monkeypatch, payload_run.parent, "views/overview.py", run=value)
    assert not at.exception
    r = rendered(at)
    assert_inert(r)
    assert any("does not exist" in m for m in r.markdown)
    shown = [m for m in r.markdown if "evil" in m]
    assert shown and all("\\]\\(http\\:" in m for m in shown)  # visible as text, escaped


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a\x00b", "control character (U+0000)"),
        ("x" * 5000, "5,000 characters long"),
        ("y" * 300, "cannot name a run directory"),  # one path component over the file system's 255
        ("../" * 10 + "etc", "holds no run"),
        ("%00", "does not exist"),
        (" ", None),
    ],
)
def test_odd_run_parameters_give_a_message_not_a_traceback(monkeypatch, payload_run, value, says):
    at = open_page(monkeypatch, payload_run.parent, "views/overview.py", run=value)
    assert not at.exception
    r = rendered(at)
    assert_inert(r)
    if says:
        assert any(says in m for m in r.markdown), r.markdown


# --- the live lab keeps a long paste ---------------------------------------------------------------------
class _FakeEngine:
    """Stands in for the live engine (the tiny run has no policy to load); records the text it gets."""

    seen: list[str] = []

    def __init__(self, run):
        self.layers = [1, 2]
        self.model = type("M", (), {"cfg": type("C", (), {"n_ctx": 64})()})()

    def run(self, text, feats, n, new_tokens, seed):
        _FakeEngine.seen.append(text)
        return type(
            "R",
            (),
            dict(
                truncated=0, mean_clean=0.0, mean_ablated=0.0, clean=["a"], ablated=["b"], reward_clean=[0.0],
                reward_ablated=[0.0], next_tokens=[], activations={}, prompt_tokens=[],
            ),
        )()  # fmt: skip


def test_live_lab_keeps_a_long_paste_and_says_it_is_cut(monkeypatch, payload_run):
    import lfp_core.live
    from views.common import MAX_TEXT_CHARS

    monkeypatch.setattr(lfp_core.live, "LiveEngine", _FakeEngine)
    at = open_page(monkeypatch, payload_run.parent, "views/ablation_lab.py", run=payload_run)
    assert not at.exception
    box = next(t for t in at.text_area if t.label == "Prompt")
    long = "The film was great. " * 300  # 6,000 characters
    box.set_value(long).run()
    assert not at.exception
    box = next(t for t in at.text_area if t.label == "Prompt")
    assert box.value == long  # the box keeps the text
    assert any(
        f"has {len(long):,} characters; only its first {MAX_TEXT_CHARS:,} are used" in w.value for w in at.warning
    )
    at.button(key="al_run").click().run()
    assert not at.exception and _FakeEngine.seen[-1] == long[:MAX_TEXT_CHARS]


def test_a_stored_number_field_holding_text_is_dropped_when_read():
    """The pages put summary numbers into markdown unescaped (``{n} features``); a run whose number
    field holds text reads as missing there, never as markdown."""
    from lfp_core.store.summaries import parse_summary

    s = parse_summary("labels", {"n_labelled": "[x](http://evil.example)", "labeller": "offline"}, strict=False)
    assert s.n_labelled is None and s.labeller == "offline"
    assert parse_summary("labels", {"n_labelled": 3}, strict=False).n_labelled == 3


@pytest.mark.parametrize(
    "params",
    [
        {"role": "[Session expired — log in again](http://evil.example)"},
        {"layer": "![x](http://evil.example/b.png)"},
        {"feature": ":red[x] `y` <img src=x>"},
        {"feature": "1\x00"},
        {"layer": "9" * 5000},
        {"role": "tuned", "layer": "1", "feature": "9" * 400},
    ],
)
def test_odd_feature_link_parameters_are_a_message_shown_as_text(monkeypatch, payload_run, params):
    at = open_page(monkeypatch, payload_run.parent, "views/feature.py", run=payload_run, **params)
    assert not at.exception and at.error
    assert_inert(rendered(at))
