"""A word language model for searches over character tokens: a lexicon prefix tree
plus an interpolated bigram, scored token by token with unigram look-ahead.

A character model spells what it hears ("awful" -> "olful"); a lexicon and word
statistics from the training transcripts pull the search back to real words. It
plugs into the searches exactly like the hotword graph (`initial_state`, `step`,
`finish`), so every method that takes hotwords takes it too, with or without them:

- inside a word, a state is a node of the lexicon tree; each token moves the look-ahead
  to the best unigram log-probability of any word below the new node, so a prefix pays
  for its word gradually instead of all at once at the boundary (which would favour
  unfinished words);
- at a word boundary the look-ahead is exchanged for the word's bigram log-probability
  given the previous word, plus a per-word bonus that offsets the LM's preference for
  fewer, shorter words;
- a spelling that leaves the lexicon pays `oov_penalty` once and continues freely to
  the next boundary, so words the LM never saw (a hotword, a name) stay reachable.

Bigram: absolute discounting interpolated with the unigram (Ney, Essen and Kneser),
which needs no tuning and never gives a seen word zero probability.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from echoic.data.manifest import read_manifest
from echoic.data.text import WORD_BOUNDARY
from echoic.data.tokenizer import Tokenizer
from echoic.errors import EchoicError

DISCOUNT = 0.75
# Tuned on the built-in corpus's dev split (recipes/synth_en/README.md).
LM_WEIGHT = 0.4
WORD_BONUS = 1.5
OOV = -1  # node id of "spelling outside the lexicon until the next boundary"
END = -2  # word id of </s> in the counts and in log_prob


@dataclass
class _Node:
    children: dict[int, int] = field(default_factory=dict)
    word: int | None = None  # the word that ends here
    lookahead: float = -math.inf  # best unigram log-probability of a word below


def read_lm_text(path: str | Path) -> list[str]:
    """Sentences to train the LM on: a manifest's transcripts (.jsonl) or a text file,
    one sentence a line."""
    path = Path(path)
    if not path.is_file():
        raise EchoicError(f"LM text not found: {path}")
    if path.suffix == ".jsonl":
        return [u.text for u in read_manifest(path).utterances]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class WordLM:
    """States are (previous word id, lexicon node id); word id 0 is <s>/<unk>."""

    def __init__(
        self,
        sentences: Iterable[str],
        tokenizer: Tokenizer,
        weight: float = LM_WEIGHT,
        word_bonus: float = WORD_BONUS,
        oov_penalty: float = -10.0,
    ) -> None:
        if tokenizer.kind != "char" or WORD_BOUNDARY not in tokenizer.tokens:
            raise EchoicError(
                "--lm needs a character tokenizer with spaces between words (echoic prepare "
                "--tokenizer char on a space-separated language)"
            )
        self.boundary = tokenizer.tokens.index(WORD_BOUNDARY)
        self.weight, self.word_bonus, self.oov_penalty = weight, word_bonus, oov_penalty
        self.words = ["<s>"]
        index: dict[str, int] = {}
        unigrams: Counter[int] = Counter()
        bigrams: Counter[tuple[int, int]] = Counter()
        for sentence in sentences:
            previous = 0
            for word in sentence.split():
                if word not in index:
                    index[word] = len(self.words)
                    self.words.append(word)
                unigrams[index[word]] += 1
                bigrams[previous, index[word]] += 1
                previous = index[word]
            unigrams[END] += 1
            bigrams[previous, END] += 1
        if len(self.words) == 1:
            raise EchoicError("the LM text has no words")
        total = sum(unigrams.values())
        self._unigram = {w: c / total for w, c in unigrams.items()}
        self._bigrams = bigrams
        self._history_counts: Counter[int] = Counter()
        self._followers: Counter[int] = Counter()
        for (previous, _), count in bigrams.items():
            self._history_counts[previous] += count
            self._followers[previous] += 1
        self.nodes = [_Node()]
        for word_id, word in enumerate(self.words[1:], start=1):
            tokens = tokenizer.encode(word)
            if tokenizer.unk_id in tokens:
                continue  # the model cannot spell it: leave it to the OOV path
            logp = math.log(self._unigram[word_id])
            node = 0
            self.nodes[0].lookahead = max(self.nodes[0].lookahead, logp)
            for token in tokens:
                child = self.nodes[node].children.get(token)
                if child is None:
                    child = len(self.nodes)
                    self.nodes.append(_Node())
                    self.nodes[node].children[token] = child
                node = child
                self.nodes[node].lookahead = max(self.nodes[node].lookahead, logp)
            self.nodes[node].word = word_id

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer, **kwargs) -> WordLM:
        return cls(read_lm_text(path), tokenizer, **kwargs)

    def log_prob(self, word: int, previous: int) -> float:
        """log P(word | previous); word END is </s>, previous 0 is <s> (or an OOV word)."""
        unigram = self._unigram.get(word, 0.0)
        seen = self._history_counts.get(previous, 0)
        if not seen:
            return math.log(unigram)
        kept = max(self._bigrams.get((previous, word), 0) - DISCOUNT, 0.0) / seen
        spread = DISCOUNT * self._followers[previous] / seen
        return math.log(kept + spread * unigram)

    def _leave(self, previous: int, node: int) -> tuple[float, int]:
        """Score change and previous-word id when the word spelled up to `node` ends."""
        if node == OOV:
            return 0.0, 0  # its penalty was paid on the way out of the lexicon
        if node == 0:
            return 0.0, previous  # no word (a repeated boundary)
        word = self.nodes[node].word
        lookahead = self.nodes[node].lookahead
        if word is None:  # a prefix of lexicon words, not a word itself
            return self.oov_penalty - self.weight * lookahead, 0
        change = self.weight * (self.log_prob(word, previous) - lookahead) + self.word_bonus
        return change, word

    def initial_state(self) -> tuple[int, int]:
        return (0, 0)

    def step(self, state: tuple[int, int], token: int) -> tuple[float, tuple[int, int]]:
        previous, node = state
        if token == self.boundary:
            change, word = self._leave(previous, node)
            return change, (word, 0)
        if node == OOV:
            return 0.0, state
        child = self.nodes[node].children.get(token)
        here = self.nodes[node].lookahead if node else 0.0
        if child is None:
            return self.oov_penalty - self.weight * here, (previous, OOV)
        return self.weight * (self.nodes[child].lookahead - here), (previous, child)

    def finish(self, state: tuple[int, int]) -> float:
        change, word = self._leave(*state)
        return change + self.weight * self.log_prob(END, word)


class ScorerSum:
    """Several prefix scorers (hotword graph, word LM) as one: the state is the tuple
    of theirs and the score change the sum."""

    def __init__(self, scorers: list) -> None:
        self.scorers = scorers

    def initial_state(self) -> tuple:
        return tuple(s.initial_state() for s in self.scorers)

    def step(self, state: tuple, token: int) -> tuple[float, tuple]:
        changes, states = zip(*(s.step(x, token) for s, x in zip(self.scorers, state)))
        return sum(changes), tuple(states)

    def finish(self, state: tuple) -> float:
        return sum(s.finish(x) for s, x in zip(self.scorers, state))
