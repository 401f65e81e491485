"""Real sentences for the built-in corpus, from Debian's fortune data files.

English comes from the `fortunes` package (quotations, jokes, literature, science),
Mandarin from `fortunes-zh` (Tang and Song poetry and modern prose). Sentences are
split, filtered to what a speech synthesizer reads unambiguously (no acronyms, code,
URLs or stray symbols), normalised (lower case, no punctuation, numbers spelled out),
de-duplicated and sorted, so the list only depends on the installed data files.

The shifted domain (`echoic synth --domain shifted`) reads other English files, on other
topics (computing, Unix lore, Star Trek, newspapers, product labels), for fine-tuning
experiments: none of its sentences occurs in the demo's pool or repeats 5 words of one.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from echoic.data.synth.overlap import OverlapIndex
from echoic.data.text import is_cjk, normalize_text
from echoic.errors import EchoicError

FORTUNE_DIR = Path("/usr/share/games/fortunes")

# Prose-like files; left out: ascii-art, code (perl, linux, computers), nonsense (zippy),
# and lists of definitions or headlines that read badly as sentences.
ENGLISH_FILES = (
    "art",
    "cookie",
    "drugs",
    "education",
    "food",
    "fortunes",
    "humorists",
    "kids",
    "law",
    "literature",
    "love",
    "magic",
    "medicine",
    "men-women",
    "miscellaneous",
    "people",
    "pets",
    "platitudes",
    "politics",
    "riddles",
    "science",
    "songs-poems",
    "sports",
    "tao",
    "wisdom",
    "work",
)
# The shifted domain: every other prose file. Left out: zippy (nonsense), pratchett (4
# sentences), translate-me (Latin). Sentences each gives, before dropping the demo's
# (fortunes 1:1.99.1-7.3): computers 1634, definitions 994, startrek 318, ethnic 276,
# linux 265, disclaimer 264, perl 244, knghtbrd 209, linuxcookie 93, paradoxum 88,
# goedel 73, news 53, debian 49.
SHIFTED_ENGLISH_FILES = (
    "computers",
    "debian",
    "definitions",
    "disclaimer",
    "ethnic",
    "goedel",
    "knghtbrd",
    "linux",
    "linuxcookie",
    "news",
    "paradoxum",
    "perl",
    "startrek",
)
MANDARIN_FILES = ("tang300", "song100", "chinese")
DOMAINS = ("demo", "shifted")  # the corpus's text and voices: the demo's, or others

MIN_WORDS, MAX_WORDS = 3, 20  # English sentence length
MIN_CHARS, MAX_CHARS = 4, 30  # Mandarin sentence length (characters)

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_ATTRIBUTION_RE = re.compile(r"^\s*--")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_ALLOWED_EN_RE = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"()$%&-]+$")
_ACRONYM_RE = re.compile(r"\b(?!I\b|A\b)[A-Z]{2,}\b|\b[A-Za-z]\.[A-Za-z]\.")
_LETTER_DIGIT_RE = re.compile(r"[A-Za-z]\d|\d(?!st|nd|rd|th)[A-Za-z']")
_NORMALISED_EN_RE = re.compile(r"^[a-z]+(?:'[a-z]+)?(?: [a-z]+(?:'[a-z]+)?)*$")
_ZH_SPLIT_RE = re.compile(r"[。！？；!?;]+")
_LONG_NUMBER_RE = re.compile(r"[0-9０-９]{9,}")


def _is_han(char: str) -> bool:
    return is_cjk(char) and not 0x3040 <= ord(char) <= 0x30FF


def _entries(name: str) -> list[str]:
    path = FORTUNE_DIR / name
    if not path.is_file():
        raise EchoicError(
            f"text source {path} not found; install Debian's fortunes and fortunes-zh "
            "packages (make setup does this)"
        )
    return path.read_text(encoding="utf-8", errors="replace").split("\n%\n")


def english_sentence(raw: str) -> str | None:
    """The normalised form of one raw English sentence, or None if it should not be used."""
    raw = " ".join(raw.split())
    if not _ALLOWED_EN_RE.match(raw) or _ACRONYM_RE.search(raw) or _LETTER_DIGIT_RE.search(raw):
        return None
    if raw.count('"') % 2 or raw.count("(") != raw.count(")"):
        return None  # a fragment of a longer quotation
    text = normalize_text(raw, "en")
    if not _NORMALISED_EN_RE.match(text):
        return None
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or max(len(w) for w in words) > 18:
        return None
    if any(len(w) == 1 and w not in ("a", "i") for w in words):
        return None  # spelled-out letters ("m o u s e") or a stray "s" from "60's"
    return text


def mandarin_sentence(raw: str) -> str | None:
    if _LONG_NUMBER_RE.search(raw):
        return None  # cn2an reads at most 16 digits; such numbers are codes, not speech
    text = normalize_text(raw, "zh")
    # Han characters only: espeak-ng's Mandarin voice reads kana as "japanese letter".
    if not MIN_CHARS <= len(text) <= MAX_CHARS or not all(_is_han(c) for c in text):
        return None
    return text


def english_file_sentences(name: str) -> set[str]:
    """The usable sentences of one English fortune file."""
    found: set[str] = set()
    for entry in _entries(name):
        lines = [line for line in entry.splitlines() if not _ATTRIBUTION_RE.match(line)]
        body = " ".join(" ".join(lines).split())
        for raw in _SENTENCE_END_RE.split(body):
            sentence = english_sentence(raw)
            if sentence:
                found.add(sentence)
    return found


@functools.cache
def english_sentences() -> tuple[str, ...]:
    return tuple(sorted(set().union(*map(english_file_sentences, ENGLISH_FILES))))


@functools.cache
def shifted_english_sentences() -> tuple[str, ...]:
    """The shifted domain's sentences. Those that repeat 5 words in a row of a demo
    sentence (or lie inside one) are dropped, not only exact repeats: a model trained on
    the demo corpus, or its LM text (the whole pool), has heard them."""
    demo = OverlapIndex(english_sentences(), "en")
    found = set().union(*map(english_file_sentences, SHIFTED_ENGLISH_FILES))
    return tuple(sorted(s for s in found if not demo.repeats(s)))


@functools.cache
def mandarin_sentences() -> tuple[str, ...]:
    found: set[str] = set()
    for name in MANDARIN_FILES:
        for entry in _entries(name):
            for line in entry.splitlines():
                if "\x1b" in line:  # coloured title and author lines
                    continue
                for raw in _ZH_SPLIT_RE.split(_ANSI_RE.sub("", line)):
                    sentence = mandarin_sentence(raw)
                    if sentence:
                        found.add(sentence)
    return tuple(sorted(found))


def sentences(lang: str, domain: str = "demo") -> tuple[str, ...]:
    check_domain(lang, domain)
    if lang == "en":
        return english_sentences() if domain == "demo" else shifted_english_sentences()
    return mandarin_sentences()


def check_domain(lang: str, domain: str) -> None:
    """A one-line error for a language or domain the corpus does not have."""
    if lang not in ("en", "zh"):
        raise EchoicError(f"unknown corpus language '{lang}' (allowed: en, zh)")
    if domain not in DOMAINS:
        raise EchoicError(f"unknown corpus domain '{domain}' (allowed: {', '.join(DOMAINS)})")
    if domain != "demo" and lang != "en":
        raise EchoicError(f"the {domain} domain is English only")
