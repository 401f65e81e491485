"""A word language model for searches over character tokens: a lexicon prefix tree
plus an interpolated Kneser-Ney n-gram (trigram by default), scored token by token
with unigram look-ahead.

A character model spells what it hears ("awful" -> "olful"); a lexicon and word
statistics from the training transcripts pull the search back to real words. It
plugs into the searches exactly like the hotword graph (`initial_state`, `step`,
`finish`), so every method that takes hotwords takes it too, with or without them:

- inside a word, a state is a node of the lexicon tree; each token moves the look-ahead
  to the best unigram log-probability of any word below the new node, so a prefix pays
  for its word gradually instead of all at once at the boundary (which would favour
  unfinished words);
- at a word boundary the look-ahead is exchanged for the word's n-gram log-probability
  given the previous words, plus a per-word bonus that offsets the LM's preference for
  fewer, shorter words;
- a spelling that leaves the lexicon pays `oov_penalty` once and continues freely to
  the next boundary, so words the LM never saw (a name) stay reachable;
- hotwords the text lacks join the lexicon (`extra_words`) as unlisted words: as likely
  as the rarest word of the text, without the OOV penalty, so that the LM does not
  cancel the hotword boost it is decoded with.

N-gram: interpolated Kneser-Ney with one absolute discount (Chen and Goodman): the top
order uses counts, lower orders count distinct left contexts, an unseen history backs
off to the next order down, and every word of the text keeps a non-zero probability.
No tuning; tested to sum to one over the vocabulary for any history.
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
LM_ORDER = 3
# Tuned on the built-in corpus's dev split (recipes/synth_en/README.md).
LM_WEIGHT = 0.4
WORD_BONUS = 1.5
OOV = -1  # node id of "spelling outside the lexicon until the next boundary"
END = -2  # word id of </s> in the counts and in log_prob
START = 0  # word id of <s>, which also stands for "after an OOV word" in a history
UNLISTED = -3  # word id of an extra lexicon word (a hotword) the LM text lacks

History = tuple[int, ...]  # the previous order - 1 word ids, oldest first


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
    """States are (history, lexicon node id); word id 0 is <s>/<unk>."""

    cache_entries = 1_000_000  # ~180 MB at most; a 500-utterance decode fills ~65,000

    def __init__(
        self,
        sentences: Iterable[str],
        tokenizer: Tokenizer,
        weight: float = LM_WEIGHT,
        word_bonus: float = WORD_BONUS,
        oov_penalty: float = -10.0,
        order: int = LM_ORDER,
        extra_words: Iterable[str] = (),
    ) -> None:
        if tokenizer.kind != "char" or WORD_BOUNDARY not in tokenizer.tokens:
            raise EchoicError(
                "--lm needs a character tokenizer with spaces between words (echoic prepare "
                "--tokenizer char on a space-separated language)"
            )
        if order < 1:
            raise EchoicError(f"the LM order must be at least 1, got {order}")
        self.boundary = tokenizer.tokens.index(WORD_BOUNDARY)
        self.weight, self.word_bonus, self.oov_penalty = weight, word_bonus, oov_penalty
        self.order = order
        self.words = ["<s>"]
        index: dict[str, int] = {}
        unigrams: Counter[int] = Counter()
        top: Counter[tuple[int, ...]] = Counter()  # n-grams of the top order, padded with <s>
        for sentence in sentences:
            ids = [START] * (order - 1)
            for word in sentence.split():
                if word not in index:
                    index[word] = len(self.words)
                    self.words.append(word)
                ids.append(index[word])
            ids.append(END)
            unigrams.update(ids[order - 1 :])
            top.update(tuple(ids[i - order + 1 : i + 1]) for i in range(order - 1, len(ids)))
        if len(self.words) == 1:
            raise EchoicError("the LM text has no words")
        total = sum(unigrams.values())
        self._unigram = {w: c / total for w, c in unigrams.items()}  # for the look-ahead
        self._counts = self._kneser_ney_counts(top, order)
        self._totals: list[Counter[History]] = []
        self._types: list[Counter[History]] = []
        for counts in self._counts:
            totals, types = Counter(), Counter()
            for ngram, count in counts.items():
                totals[ngram[:-1]] += count
                types[ngram[:-1]] += 1
            self._totals.append(totals)
            self._types.append(types)
        self._cache: dict[tuple[int, History], float] = {}
        self.nodes = [_Node()]
        for word_id, word in enumerate(self.words[1:], start=1):
            self._insert(tokenizer, word, word_id, math.log(self._unigram[word_id]))
        # Words the text lacks but the user names (hotwords): in the lexicon, without
        # the OOV penalty, each as likely as the rarest word of the text and with no
        # n-gram context, like an OOV word.
        self.unlisted_log_prob = math.log(min(self._unigram.values()))
        for word in dict.fromkeys(w for phrase in extra_words for w in phrase.split()):
            if word not in index:
                self._insert(tokenizer, word, UNLISTED, self.unlisted_log_prob)

    def _insert(self, tokenizer: Tokenizer, word: str, word_id: int, logp: float) -> None:
        """Add a word's spelling to the lexicon tree, updating the look-aheads on its way."""
        tokens = tokenizer.encode(word)
        if tokenizer.unk_id in tokens:
            return  # the model cannot spell it: leave it to the OOV path
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
        if self.nodes[node].word is None:
            self.nodes[node].word = word_id

    @staticmethod
    def _kneser_ney_counts(
        top: Counter[tuple[int, ...]], order: int
    ) -> list[Counter[tuple[int, ...]]]:
        """counts[n - 1] for n-grams of length n: the top order's own counts, and for each
        lower order the number of distinct words seen before the n-gram."""
        counts = [top]
        for _ in range(order - 1):
            lower: Counter[tuple[int, ...]] = Counter(ngram[1:] for ngram in counts[0])
            counts.insert(0, lower)
        return counts

    def initial_history(self) -> History:
        return (START,) * (self.order - 1)

    def _advance(self, history: History, word: int) -> History:
        return (*history, word)[1:] if history else ()

    def log_prob(self, word: int, history: History | None = None) -> float:
        """log P(word | history); word END is </s>, history the previous order - 1 word
        ids (START for <s> or an OOV word), oldest first; None is the sentence start."""
        history = self.initial_history() if history is None else history
        key = (word, history)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        prob = self._counts[0].get((word,), 0) / self._totals[0][()]
        for n in range(1, self.order):
            context = history[len(history) - n :]
            seen = self._totals[n].get(context, 0)
            if not seen:
                break  # an unseen history has no longer one either
            kept = max(self._counts[n].get((*context, word), 0) - DISCOUNT, 0.0) / seen
            prob = kept + DISCOUNT * self._types[n][context] / seen * prob
        value = math.log(prob) if prob > 0 else -math.inf
        if len(self._cache) >= self.cache_entries:
            # Pure values: dropping them all costs only recomputation, and keeps a
            # long-lived decoder (a server) from growing without end.
            self._cache.clear()
        self._cache[key] = value
        return value

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer, **kwargs) -> WordLM:
        return cls(read_lm_text(path), tokenizer, **kwargs)

    def _leave(self, history: History, node: int) -> tuple[float, History]:
        """Score change and the new history when the word spelled up to `node` ends."""
        if node == OOV:  # its penalty was paid on the way out of the lexicon
            return 0.0, self._advance(history, START)
        if node == 0:
            return 0.0, history  # no word (a repeated boundary)
        word = self.nodes[node].word
        lookahead = self.nodes[node].lookahead
        if word is None:  # a prefix of lexicon words, not a word itself
            return self.oov_penalty - self.weight * lookahead, self._advance(history, START)
        if word == UNLISTED:
            change = self.weight * (self.unlisted_log_prob - lookahead) + self.word_bonus
            return change, self._advance(history, START)
        change = self.weight * (self.log_prob(word, history) - lookahead) + self.word_bonus
        return change, self._advance(history, word)

    def initial_state(self) -> tuple[History, int]:
        return (self.initial_history(), 0)

    def step(self, state: tuple[History, int], token: int) -> tuple[float, tuple[History, int]]:
        history, node = state
        if token == self.boundary:
            change, history = self._leave(history, node)
            return change, (history, 0)
        if node == OOV:
            return 0.0, state
        child = self.nodes[node].children.get(token)
        here = self.nodes[node].lookahead if node else 0.0
        if child is None:
            return self.oov_penalty - self.weight * here, (history, OOV)
        return self.weight * (self.nodes[child].lookahead - here), (history, child)

    def finish(self, state: tuple[History, int]) -> float:
        change, history = self._leave(*state)
        return change + self.weight * self.log_prob(END, history)


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
