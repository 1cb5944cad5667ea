"""The paper's VADER reward, per-word valences, and the token-to-word alignment.

Reward (Marks et al. 2024, VADER task): the sum of the VADER lexicon valences of the words of a
completion, divided by 5, clipped to [-10, 10]. Only the lexicon is used, not VADER's
sentence-level rules (negation, boosters, capitals): the feedback pattern is a known per-word
table, which is what lets later stages measure how accurately the model learned it.

Word segmentation (documented because every later stage depends on it):

1. Split the text on whitespace into chunks, keeping character offsets.
2. If a chunk, lower-cased, is itself a lexicon entry (emoticons such as ``:)``, contractions
   such as ``can't``) it is one word.
3. Otherwise strip leading and trailing punctuation (``string.punctuation``) and lower-case;
   what remains (possibly with inner apostrophes or hyphens) is the word. Empty chunks drop.

The lexicon's multi-word entries (e.g. ``fed up``) are not matched, as in the paper's
word-level reward. The lexicon comes from the vaderSentiment wheel, read through nltk; nothing
is downloaded.
"""

from __future__ import annotations

import functools
import os
import re
import string
from dataclasses import dataclass

REWARD_SCALE = 5.0
REWARD_CLIP = 10.0
_CHUNK = re.compile(r"\S+")
_PUNCT = string.punctuation


@dataclass(frozen=True)
class Word:
    """A word of a text: its lower-cased form, character span and lexicon valence (0 if absent)."""

    text: str
    start: int
    end: int
    valence: float
    in_lexicon: bool


@functools.lru_cache(maxsize=1)
def lexicon() -> dict[str, float]:
    """The VADER lexicon (word -> mean valence in [-4, 4]), from the vaderSentiment wheel via nltk.

    nltk 3.10 opens data files only under its data path, so the wheel's package directory
    (which holds ``vader_lexicon.txt``) is added to that path.
    """
    import nltk.data
    import vaderSentiment
    from nltk.sentiment.vader import SentimentIntensityAnalyzer

    wheel_dir = os.path.dirname(vaderSentiment.__file__)
    if not os.path.exists(os.path.join(wheel_dir, "vader_lexicon.txt")):
        raise FileNotFoundError(f"vader_lexicon.txt not found in the vaderSentiment package at {wheel_dir}")
    if wheel_dir not in nltk.data.path:
        nltk.data.path.append(wheel_dir)
    return dict(SentimentIntensityAnalyzer(lexicon_file="vader_lexicon.txt").lexicon)


def segment(text: str) -> list[Word]:
    """Split text into words (see the module docstring) with their valences."""
    lex = lexicon()
    words: list[Word] = []
    for m in _CHUNK.finditer(text):
        chunk, start, end = m.group(), m.start(), m.end()
        low = chunk.lower()
        if low not in lex:
            stripped = chunk.strip(_PUNCT)
            if not stripped:
                continue
            start += len(chunk) - len(chunk.lstrip(_PUNCT))
            end = start + len(stripped)
            low = stripped.lower()
        val = lex.get(low)
        words.append(Word(low, start, end, float(val) if val is not None else 0.0, val is not None))
    return words


def raw_score(text: str) -> float:
    """Sum of lexicon valences of the text's words (before scaling and clipping)."""
    return sum(w.valence for w in segment(text))


def reward(text: str) -> float:
    """The VADER task reward: raw score / 5, clipped to [-10, 10]."""
    return max(-REWARD_CLIP, min(REWARD_CLIP, raw_score(text) / REWARD_SCALE))


def rewards(texts: list[str]) -> list[float]:
    """:func:`reward` of each text."""
    return [reward(t) for t in texts]


def token_offsets(tokenizer, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode ``token_ids`` and give each token its character span in the decoded text.

    Spans come from decoding growing prefixes, so they are exact for byte-level BPE even where a
    multi-byte character is split over tokens (such a token gets an empty or partial span).
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    spans: list[tuple[int, int]] = []
    prev = 0
    for i in range(1, len(token_ids) + 1):
        cur = len(tokenizer.decode(token_ids[:i], skip_special_tokens=False)) if i < len(token_ids) else len(text)
        cur = max(cur, prev)
        spans.append((prev, cur))
        prev = cur
    return text, spans


@dataclass(frozen=True)
class TokenValence:
    """Per token: the index of the word it belongs to (-1: none), whether it ends that word,
    and the word's valence (0 for tokens outside lexicon words)."""

    word_index: int
    word_end: bool
    valence: float


def align(words: list[Word], spans: list[tuple[int, int]]) -> list[TokenValence]:
    """Give every token its word's valence.

    A token belongs to the first word its character span overlaps (a leading space is outside
    the word's span). ``word_end`` marks the word's last token: the position where the model has
    seen the whole word, which the probe stage uses.
    """
    out: list[TokenValence] = []
    last_token_of: dict[int, int] = {}
    wi = 0
    for ti, (s, e) in enumerate(spans):
        while wi < len(words) and words[wi].end <= s:
            wi += 1
        if wi < len(words) and s < words[wi].end and e > words[wi].start:
            out.append(TokenValence(wi, False, words[wi].valence))
            last_token_of[wi] = ti
        else:
            out.append(TokenValence(-1, False, 0.0))
    for w, ti in last_token_of.items():
        out[ti] = TokenValence(w, True, out[ti].valence)
    return out


def token_valences(tokenizer, token_ids: list[int]) -> tuple[list[Word], list[TokenValence]]:
    """Words of the decoded token sequence and each token's alignment to them."""
    text, spans = token_offsets(tokenizer, token_ids)
    words = segment(text)
    return words, align(words, spans)


def token_valence_table(tokenizer, vocab_size: int | None = None) -> list[float]:
    """Per token id, the VADER lexicon valence of the word the token spells, when its decoded text is a
    space followed by exactly one word (by :func:`segment`, e.g. ``" good"`` → 1.9): the valence a token adds
    to the reward when it is a whole word. Every other token gets 0 — word-internal pieces (``"ily"`` of
    ``" family"`` is no lexicon word there), and the pieces of a word split over several tokens."""
    from lfp_core.models import continuation_decoder  # torch: only when a table is built

    n = vocab_size if vocab_size is not None else len(tokenizer)
    piece = continuation_decoder(tokenizer, skip_special_tokens=False)  # " good" also for Llama's "▁good"
    out = []
    for i in range(n):
        text = piece([i])
        words = segment(text) if text[:1].isspace() else []
        out.append(words[0].valence if len(words) == 1 else 0.0)
    return out
