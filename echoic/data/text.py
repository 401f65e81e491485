"""Transcript normalisation: lower case, no punctuation, numbers spelled out.

Apostrophes inside words ("don't") are kept, as LibriSpeech does: they are part of
the spelling and change the pronunciation ("won't" vs "wont"). Numbers are spelled
out with num2words (English) and cn2an (Chinese) rather than by hand.
"""

from __future__ import annotations

import re
import unicodedata

from num2words import num2words

WORD_BOUNDARY = "\u2581"  # "▁", the same mark sentencepiece uses for a space

# Han ideographs and Japanese kana: written without spaces between words, so a
# space between two of them carries no information and is dropped.
_CJK_RANGES = (
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FA1F),  # extensions B-F and compatibility supplement
)

_EN_ABBREVIATIONS = {
    "mr.": "mister",
    "mrs.": "missus",
    "ms.": "miss",
    "dr.": "doctor",
    "st.": "saint",
    "vs.": "versus",
    "etc.": "et cetera",
    "jr.": "junior",
    "sr.": "senior",
}
_ABBREVIATION_RE = re.compile(
    r"\b(" + "|".join(re.escape(a[:-1]) for a in _EN_ABBREVIATIONS) + r")\.", re.IGNORECASE
)
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_MONEY_RE = re.compile(r"\$(\d+(?:\.\d\d)?)")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s?%")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_SPACE_RE = re.compile(r"\s+")


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def drop_spaces_between_cjk(text: str) -> str:
    """'你好 世界 hello' -> '你好世界 hello': spaces only survive next to non-CJK text."""
    if " " not in text:
        return text
    out = []
    for i, char in enumerate(text):
        if char == " " and 0 < i < len(text) - 1 and is_cjk(text[i - 1]) and is_cjk(text[i + 1]):
            continue
        out.append(char)
    return "".join(out)


def _spell_en_number(match: re.Match[str]) -> str:
    token = match.group(0)
    if "." in token:
        return " " + num2words(float(token)) + " "
    value = int(token)
    # Four-digit numbers in this range are read as years ("nineteen eighty four").
    if len(token) == 4 and 1000 <= value <= 2099 and value % 100 != 0:
        return " " + num2words(value, to="year") + " "
    return " " + num2words(value) + " "


def _spell_money(match: re.Match[str]) -> str:
    amount = match.group(1)
    if "." in amount and not amount.endswith(".00"):
        return " " + num2words(float(amount), to="currency", currency="USD") + " "
    dollars = int(float(amount))
    return f" {num2words(dollars)} {'dollar' if dollars == 1 else 'dollars'} "


def spell_numbers_en(text: str) -> str:
    text = _THOUSANDS_RE.sub("", text)
    text = _MONEY_RE.sub(_spell_money, text)
    text = _PERCENT_RE.sub(lambda m: f" {m.group(1)} percent ", text)
    text = _ORDINAL_RE.sub(lambda m: " " + num2words(int(m.group(1)), to="ordinal") + " ", text)
    return _NUMBER_RE.sub(_spell_en_number, text)


def spell_numbers_zh(text: str) -> str:
    import cn2an  # imported lazily: it is slow to import and only Chinese text needs it

    if not any(c.isdigit() for c in text):
        return text
    return cn2an.transform(text, "an2cn")


def _strip_punctuation(text: str) -> str:
    """Replace punctuation and symbols by spaces, keeping apostrophes inside words."""
    out = []
    for i, char in enumerate(text):
        category = unicodedata.category(char)
        if char in "'\u2019":
            before = text[i - 1] if i > 0 else " "
            after = text[i + 1] if i + 1 < len(text) else " "
            out.append("'" if before.isalnum() and after.isalpha() else " ")
        elif category[0] in "PS" or category in ("Cc", "Cf"):
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def normalize_text(text: str, lang: str = "en") -> str:
    """Lower-case, spell out numbers, remove punctuation, collapse spaces.

    `lang` picks the number speller ("en", "zh"); other languages keep their digits.
    CJK text loses the spaces between ideographs.
    """
    text = unicodedata.normalize("NFKC", text)
    if lang == "en":
        text = _ABBREVIATION_RE.sub(
            lambda m: " " + _EN_ABBREVIATIONS[m.group(0).lower()] + " ", text
        )
        text = text.replace("&", " and ")
        text = spell_numbers_en(text)
    elif lang == "zh":
        text = spell_numbers_zh(text)
    text = _strip_punctuation(text.lower())
    text = _SPACE_RE.sub(" ", text).strip()
    return drop_spaces_between_cjk(text)
