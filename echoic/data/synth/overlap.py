"""Near-duplicate sentences: a shared stretch of `n` words (characters for Mandarin).

Debian's fortune files hold many variants of one joke or proverb ("your good nature
will bring unbounded happiness" / "... will bring you unbounded happiness"), which
exact-match de-duplication lets through. A held-out sentence that repeats a long
stretch of a training sentence is partly a training sentence: the model and its word
LM have heard that stretch, and the test measures memory instead of recognition.
"""

from __future__ import annotations

from collections.abc import Iterable

# Five words: in the English pool, stretches of 4 are mostly stock phrases ("at the end
# of", "one of the most": 23% of the old test split shared one with train), while 5
# already catches the fortune files' rewordings that 6 misses ("i could easily / i
# cannot overemphasize the importance of good grammar", "your good nature will bring
# (you) unbounded happiness"). Mandarin lines of the Tang poems are 5 or 7 characters,
# so 5 characters is a whole shared line.
NEAR_DUPLICATE_UNITS = 5


def units(text: str, lang: str) -> list[str]:
    """Words, or characters for Mandarin (written without spaces)."""
    return list(text) if lang == "zh" else text.split()


def _join(stretch: Iterable[str]) -> str:
    return "\x1f".join(stretch)  # a separator no sentence contains


def stretches(text: str, lang: str, n: int = NEAR_DUPLICATE_UNITS) -> set[str]:
    """The sentence's stretches of `n` units, or the whole sentence when it is shorter:
    another sentence that contains any of them is a near-duplicate of this one."""
    seq = units(text, lang)
    size = min(n, len(seq))
    return {_join(seq[i : i + size]) for i in range(len(seq) - size + 1)}


def pieces(text: str, lang: str, n: int = NEAR_DUPLICATE_UNITS) -> set[str]:
    """Every stretch of 1 to `n` units: what `stretches` of another sentence are looked
    up in."""
    seq = units(text, lang)
    return {
        _join(seq[i : i + size])
        for size in range(1, min(n, len(seq)) + 1)
        for i in range(len(seq) - size + 1)
    }


class OverlapIndex:
    """Reference sentences, indexed so that `repeats(text)` says whether `text` shares
    a stretch of `n` units with one of them or, when shorter than `n`, occurs inside
    one (so an exact repeat is included)."""

    def __init__(self, references: Iterable[str], lang: str, n: int = NEAR_DUPLICATE_UNITS):
        self.lang, self.n = lang, n
        self._pieces: set[str] = set()
        for text in references:
            self._pieces |= pieces(text, lang, n)

    def repeats(self, text: str) -> bool:
        return not self._pieces.isdisjoint(stretches(text, self.lang, self.n))


class StretchIndex:
    """Sentences to keep out of another text, indexed so that `contains(text)` says
    whether `text` holds a stretch of `n` units of one of them (or the whole of one
    shorter than `n`): the reverse direction of `OverlapIndex`."""

    def __init__(self, kept_out: Iterable[str], lang: str, n: int = NEAR_DUPLICATE_UNITS):
        self.lang, self.n = lang, n
        self._stretches: set[str] = set()
        for text in kept_out:
            self._stretches |= stretches(text, lang, n)

    def contains(self, text: str) -> bool:
        return not self._stretches.isdisjoint(pieces(text, self.lang, self.n))
