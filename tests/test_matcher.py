"""The banned-term matcher against the usual evasions, and against false positives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.matcher import clean_term, find_banned, fold

TERMS = ("banned", "gore", "blood bath", "nud*", "4chan")

# (text, the term it must be caught as)
EVASIONS = [
    ("banned", "banned"),
    ("BANNED", "banned"),
    ("BaNnEd", "banned"),
    ("a banned thing", "banned"),
    ("banned!", "banned"),
    ("(banned)", "banned"),
    ("b a n n e d", "banned"),
    ("b.a.n.n.e.d", "banned"),
    ("b-a-n-n-e-d", "banned"),
    ("b_a_n_n_e_d", "banned"),
    ("b.a n-n e d", "banned"),
    ("b  a  n  n  e  d", "banned"),
    ("b*a*n*n*e*d", "banned"),
    ("b/a/n/n/e/d", "banned"),
    ("b\u200ba\u200bn\u200bn\u200be\u200bd", "banned"),  # zero-width space
    ("ban\u200cned", "banned"),  # zero-width non-joiner
    ("ban\u200dned", "banned"),  # zero-width joiner
    ("ban\u2060ned", "banned"),  # word joiner
    ("ban\ufeffned", "banned"),  # BOM / zero-width no-break space
    ("ban\u00adned", "banned"),  # soft hyphen
    ("ｂａｎｎｅｄ", "banned"),  # full-width forms
    ("ＢＡＮＮＥＤ", "banned"),
    ("𝐛𝐚𝐧𝐧𝐞𝐝", "banned"),  # mathematical bold
    ("𝓫𝓪𝓷𝓷𝓮𝓭", "banned"),  # mathematical script
    ("𝕓𝕒𝕟𝕟𝕖𝕕", "banned"),  # double-struck
    ("Ⓑⓐⓝⓝⓔⓓ", "banned"),  # circled letters
    ("bаnnеd", "banned"),  # Cyrillic а and е
    ("ВАNNЕD", "banned"),  # Cyrillic В, А, Е
    ("bαnnеd", "banned"),  # Greek alpha, Cyrillic ie
    ("bánnéd", "banned"),  # accents
    ("b̲a̲n̲n̲e̲d̲", "banned"),  # combining underline
    ("b@nned", "banned"),
    ("b4nn3d", "banned"),
    ("8anned", "banned"),
    ("baaaannned", "banned"),  # repeated letters
    ("bbaannnneedd", "banned"),
    ("b@ n n 3 d", "banned"),  # symbols and spacing together
    ("gore", "gore"),
    ("g0re", "gore"),
    ("g o r e", "gore"),
    ("gοrе", "gore"),  # Greek omicron, Cyrillic ie
    ("ɡore", "gore"),  # Latin script g
    ("GØRE", "gore"),  # O with stroke: not in Unicode's confusables
    ("bannεd", "banned"),  # Greek epsilon
    ("błood bath", "blood bath"),  # l with stroke
    ("nuđe", "nud*"),  # d with stroke
    ("blood bath", "blood bath"),
    ("bloodbath", "blood bath"),
    ("blood-bath", "blood bath"),
    ("BLOOD   BATH", "blood bath"),
    ("bl00d b4th", "blood bath"),
    ("nude", "nud*"),
    ("nudity", "nud*"),
    ("n u d i t y", "nud*"),
    ("4chan", "4chan"),
    ("achan", "4chan"),
    ("@chan", "4chan"),
    # Digits and symbols are word boundaries and gaps, as CLIP's tokenizer splits them.
    ("nude1", "nud*"),
    ("2nude", "nud*"),
    ("1banned2", "banned"),
    ("n+u+d+e", "nud*"),
    ("b|a|n|n|e|d", "banned"),
    ("b!a!n!n!e!d", "banned"),
    ("g$o$r$e", "gore"),
    ("b1a2n3n4e5d", "banned"),
    ("b😀a😀n😀n😀e😀d", "banned"),  # emoji between letters
    ("banned's", "banned"),
    ("it'sbanned", "banned"),  # CLIP reads "it", "'s", "banned"
    ("#banned#", "banned"),
    ("x_banned_x", "banned"),
    # Look-alike families beyond the confusables list.
    ("ʙᴀɴɴᴇᴅ", "banned"),  # small capitals
    ("ɴᴜᴅᴇ", "nud*"),
    ("🅑🅐🅝🅝🅔🅓", "banned"),  # negative circled
    ("🅱🅰🅽🅽🅴🅳", "banned"),  # negative squared
    ("🄱🄰🄽🄽🄴🄳", "banned"),  # squared
    ("🇧🇦🇳🇳🇪🇩", "banned"),  # regional indicators
    ("⒝⒜⒩⒩⒠⒟", "banned"),  # parenthesized
    ("𝔟𝔞𝔫𝔫𝔢𝔡", "banned"),  # mathematical fraktur
    ("𝚋𝚊𝚗𝚗𝚎𝚍", "banned"),  # mathematical monospace
    ("ᵇᵃⁿⁿᵉᵈ", "banned"),  # modifier letters
    ("b‮a‭nned", "banned"),  # bidi overrides
    ("&#98;anned", "banned"),  # HTML entities, which CLIP's tokenizer unescapes with ftfy
    ("b&amp;#97;nned", "banned"),  # … twice
]

# Text that must NOT be flagged.
INNOCENT = [
    "a band playing at a barn dance",
    "a bandana",
    "an unbanned list",  # whole words only
    "gorgeous scenery",
    "the goretex jacket",
    "a bloody bathroom floor",  # different words
    "a nun dancing",
    "4 chandeliers",
    "smørrebrød on a plate",  # Danish: folds to ASCII, but to no banned word
    "Ελληνικά γράμματα",  # Greek text
    "a classic 35mm photo of a glass bass",
    "1gorilla 2gorillas",  # "gore" is not a word here: letters glue "gorilla" together
    "nun1 nun2",
    "",
]


@pytest.mark.parametrize("text, term", EVASIONS)
def test_evasion_is_caught(text, term):
    assert find_banned(text, TERMS) == term


@pytest.mark.parametrize("text", INNOCENT)
def test_innocent_text_passes(text):
    assert find_banned(text, TERMS) is None


def test_evasion_case_count():
    # Reported in the closing note; keep this in step with the lists above.
    assert len(EVASIONS) == 83
    assert len(INNOCENT) == 14


def test_terms_are_folded_the_same_way_as_text():
    assert find_banned("banned", ("ＢＡＮＮＥＤ",)) == "ＢＡＮＮＥＤ"
    assert find_banned("bаnned", ("b.a.n.n.e.d",)) == "b.a.n.n.e.d"


def test_fold():
    # A zero-width character is a piece of its own for CLIP: an edge (one space), not nothing.
    assert fold("Ｂ\u200bÀ𝐍") == "b an"
    assert fold("ÀＢ𝐍") == "abn"
    assert fold("Straße") == "strasse"
    # Symbols keep the letters they fold to, in upper case: they match a term but never glue.
    assert fold("nude™") == "nudeTM"


def test_clean_term():
    assert clean_term("  Blood   Bath ") == "blood bath"
    assert clean_term("...") == ""
    assert find_banned("anything", ("...",)) is None


def test_long_adversarial_text_is_fast():
    import time

    text = "b " * 250 + "a" * 500
    started = time.perf_counter()
    assert find_banned(text, TERMS) is None
    assert time.perf_counter() - started < 0.5


# ---------------------------------------------------------------------------------------------
# The matcher's words are the text encoder's words: checked against CLIP's own pre-splitter.

WORDS = ("banned", "gore", "nude")
PIECES = st.sampled_from(["", " ", "1", "23", "+", "|", "@", "$", "!", "-", "_", "'s", "!'s", "'re", ".", "😀",
                          "\u200b", "x", "ab", "ing", "Ü", "ж"])


@pytest.fixture(scope="module")
def clip_words():
    """The words CLIP reads in a text: its normalizer, then its pre-tokenizer's pieces (a run of
    letters is a word; digits and punctuation runs are pieces of their own)."""
    from worker.tiny import build_tokenizer

    backend = build_tokenizer().backend_tokenizer

    def words(text: str) -> list[str]:
        normalized = backend.normalizer.normalize_str(text)
        return [normalized[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    return words


def test_the_tokenizer_splits_digits_and_symbols_off_words(clip_words):
    assert clip_words("nude1 2nude") == ["nude", "1", "2", "nude"]
    assert clip_words("n+u+d+e") == ["n", "+", "u", "+", "d", "+", "e"]


@given(before=PIECES, word=st.sampled_from(WORDS), after=PIECES, upper=st.booleans())
def test_every_word_the_tokenizer_reads_is_caught(clip_words, before, word, after, upper):
    """Whatever surrounds a banned word, if CLIP reads it as a word, the matcher catches it."""
    text = before + (word.upper() if upper else word) + after
    if word in [fold(w) for w in clip_words(text)]:
        assert find_banned(text, WORDS) == word, text


@given(glue=st.sampled_from(["x", "ab", "ing", "Ü", "ж", "ä"]), word=st.sampled_from(WORDS),
       side=st.sampled_from(["before", "after"]))
def test_a_word_glued_to_letters_is_another_word_for_both(clip_words, glue, word, side):
    text = glue + word if side == "before" else word + glue
    assert word not in clip_words(text)
    assert find_banned(text, WORDS) is None
