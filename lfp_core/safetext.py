"""Text from a run, an LLM or a URL, made safe to show: as markdown text, as a code span, as HTML.

What a run holds is not the dashboard's own text: a model or run name, a completion, a token, a
feature label an LLM wrote, an error message quoting a path, a query parameter. Shown through
markdown it could become a link, an image fetched from another host, Streamlit's ``:red[...]`` or
``:material/...:`` directives, KaTeX, a heading or a table; shown through HTML, markup. And a Unicode
bidirectional control (U+202E RIGHT-TO-LEFT OVERRIDE, ...) reverses the text after it up to the end
of its paragraph or table row.

* :func:`visible_controls` replaces every bidi control (and every C0 control character except tab,
  newline and carriage return) by a visible marker, ``⟨U+202E⟩``.
* :func:`md_text` backslash-escapes every ASCII punctuation character (CommonMark lets any of them
  be escaped, and every markdown, GFM, KaTeX and Streamlit construct starts with one: ``\\ ` * _ { }
  [ ] ( ) # + - . ! | < > ~ : $ & @ =`` ...), so the text renders as itself and nothing else; raw
  HTML needs ``<``, entities ``&``, Streamlit's directives ``:``. GFM's bare-URL autolinks
  (``http://…``, ``www.…``, ``name@host.tld``) are found in the text *after* escapes are resolved,
  so escaping cannot stop them: a WORD JOINER (U+2060, invisible) goes after ``:`` in ``://``, after
  ``www`` and after ``@``, which no autolink pattern matches across.
* :func:`md_code` makes an inline code span whose fence no backtick in the text can close.
* :func:`html_text` is :func:`html.escape` after :func:`visible_controls`.

Importable without Streamlit (lfp_core.viz uses it for its HTML).
"""

from __future__ import annotations

import dataclasses
import html
import re
import string
from typing import Any

import numpy as np
import pandas as pd

# Unicode's explicit bidirectional formatting characters (UAX #9) and the implicit marks.
BIDI_CONTROLS = frozenset(
    [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)  # ALM, LRM, RLM, LRE RLE PDF LRO RLO, LRI RLI FSI PDI
_C0 = frozenset([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # tab, newline, CR stay
_MARK = {cp: f"⟨U+{cp:04X}⟩" for cp in BIDI_CONTROLS | _C0}
_HIDDEN = re.compile("[" + "".join(re.escape(chr(cp)) for cp in sorted(_MARK)) + "]")
_MD_ESCAPE = {ord(c): "\\" + c for c in string.punctuation}
WORD_JOINER = "\u2060"
_AUTOLINK_START = re.compile(r"(?i)(?<=:)(?=//)|(?<=www)(?=\.)|(?<=@)")


def visible_controls(text: str) -> str:
    """``text`` with each bidi control and C0 control character (tab, newline, CR excepted) replaced
    by a visible marker such as ``⟨U+202E⟩``, so it can neither reverse nor hide what follows."""
    return _HIDDEN.sub(lambda m: _MARK[ord(m.group())], text)


def md_text(value: object) -> str:
    """``value`` as markdown source that renders as exactly its text (controls made visible):
    every ASCII punctuation character backslash-escaped, so no link, image, emphasis, heading,
    list, table, raw HTML, entity, math or Streamlit directive can start in it, and an invisible
    WORD JOINER breaks each bare URL or e-mail address that GFM would turn into a link."""
    return _AUTOLINK_START.sub(WORD_JOINER, visible_controls(str(value))).translate(_MD_ESCAPE)


def md_code(value: object) -> str:
    """``value`` as one inline code span (controls made visible, newlines as spaces): the fence is
    one backtick longer than the longest run of backticks inside, so the text cannot end it."""
    text = visible_controls(str(value)).replace("\r", " ").replace("\n", " ")
    longest = max((len(m) for m in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html_text(value: object) -> str:
    """``value`` as HTML text: controls made visible, then :func:`html.escape` (quotes included)."""
    return html.escape(visible_controls(str(value)))


def show_controls(obj: Any) -> Any:
    """``obj`` with :func:`visible_controls` applied to every string inside it: strings, lists,
    tuples, dicts, numpy object arrays, the object and string columns of data frames (cells holding
    lists of tokens included) and dataclass fields. Anything else, and anything without such a
    character, comes back as it was (the same object)."""
    if isinstance(obj, str):
        return visible_controls(obj)
    if isinstance(obj, pd.DataFrame):
        changed = {}
        for c in obj.columns:
            col = obj[c]
            if col.dtype == object or pd.api.types.is_string_dtype(col):
                shown = _column(col)
                if shown is not col:
                    changed[c] = shown
        return obj.assign(**changed) if changed else obj
    if isinstance(obj, pd.Series):
        return _column(obj)
    if isinstance(obj, dict):
        out = {k: show_controls(v) for k, v in obj.items()}
        return out if any(out[k] is not obj[k] for k in obj) else obj
    if isinstance(obj, list | tuple):
        items = [show_controls(v) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(items) if type(obj) in (list, tuple) else obj
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        items = [show_controls(v) for v in obj.ravel()]
        if all(a is b for a, b in zip(items, obj.ravel())):
            return obj
        out = np.empty(obj.shape, dtype=object)
        out.ravel()[:] = items
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if f.init:
                v = getattr(obj, f.name)
                w = show_controls(v)
                if w is not v:
                    changes[f.name] = w
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


def _column(s: pd.Series) -> pd.Series:
    values = list(s)
    shown = [show_controls(v) for v in values]
    if all(a is b for a, b in zip(shown, values)):
        return s
    return pd.Series(shown, index=s.index, name=s.name, dtype=s.dtype if s.dtype != object else object)
