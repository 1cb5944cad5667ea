"""The VADER reward against hand-computed examples (lexicon values read from the wheel's file)."""

from __future__ import annotations

import os

import pytest
import vaderSentiment

from lfp_core import reward


def _wheel_value(word: str) -> float:
    """The valence as written in the vaderSentiment wheel's lexicon file (independent parse)."""
    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == word:
                return float(parts[1])
    raise KeyError(word)


def test_lexicon_matches_the_wheel_file():
    lex = reward.lexicon()
    assert len(lex) > 7000
    for w in ("great", "terrible", "love", "worst", ":)"):
        assert lex[w] == _wheel_value(w)


def test_hand_computed_reward():
    # great 3.1, awful -2.0, loved 2.9; "movie", "the", "was" are not in the lexicon.
    text = "The movie was great, awful and LOVED!"
    assert reward.raw_score(text) == pytest.approx(3.1 - 2.0 + 2.9)
    assert reward.reward(text) == pytest.approx((3.1 - 2.0 + 2.9) / 5)


def test_reward_clips_at_ten():
    assert reward.reward(" ".join(["great"] * 30)) == 10.0  # 93 / 5 = 18.6 -> 10
    assert reward.reward(" ".join(["worst"] * 30)) == -10.0


def test_empty_and_neutral_text_score_zero():
    assert reward.reward("") == 0.0
    assert reward.reward("the film runs two hours") == 0.0


def test_segmentation_strips_punctuation_and_keeps_emoticons():
    words = reward.segment('"Great"... it was :) (bad).')
    assert [w.text for w in words] == ["great", "it", "was", ":)", "bad"]
    great = words[0]
    assert (great.start, great.end) == (1, 6)  # span inside the quotes
    assert words[3].valence == _wheel_value(":)")
    assert words[4].valence == _wheel_value("bad")


def test_multiword_entries_are_not_matched():
    # "fed up" is a lexicon entry; words are matched one at a time, as in the paper.
    assert "fed up" in reward.lexicon()
    assert reward.raw_score("fed up") == reward.lexicon().get("fed", 0.0) + reward.lexicon().get("up", 0.0)


class _CharTokenizer:
    """Decodes ids as characters of a fixed alphabet; enough to test alignment by offsets."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


def test_token_alignment_marks_each_words_last_token():
    pieces = [" gr", "eat", " fi", "lm", ",", " aw", "ful"]
    tok = _CharTokenizer(pieces)
    words, tv = reward.token_valences(tok, list(range(len(pieces))))
    assert [w.text for w in words] == ["great", "film", "awful"]
    assert [t.word_index for t in tv] == [0, 0, 1, 1, -1, 2, 2]
    assert [t.word_end for t in tv] == [False, True, False, True, False, False, True]
    assert tv[1].valence == _wheel_value("great") and tv[6].valence == _wheel_value("awful")
    assert tv[4].valence == 0.0


def test_alignment_with_the_demo_tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    ids = tok(" This film was terrible, but the ending was great!")["input_ids"]
    words, tv = reward.token_valences(tok, ids)
    ends = [(words[t.word_index].text, t.valence) for t in tv if t.word_end and t.valence != 0]
    assert ends == [("terrible", _wheel_value("terrible")), ("great", _wheel_value("great"))]
