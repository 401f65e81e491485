"""Hotword biasing at decode time: a token prefix tree (context graph).

Each hotword phrase is tokenized with the model's tokenizer and inserted into a trie;
Aho-Corasick failure links let a match restart inside a failed one (phrases that
overlap). A search carries one graph state per hypothesis and adds the score change
`step()` returns each time the hypothesis grows by a token:

- a token that extends a match earns the phrase's per-token boost (partial matches
  are rewarded, so the beam keeps a hotword that is still being spelled);
- a token that breaks a match takes those pending bonuses back (to what the longest
  still-matching suffix has earned), so a near miss ends up with nothing;
- a completed phrase keeps its bonus for good; a longer phrase that extends it
  ("new york" -> "new york city") earns only its extra tokens, never twice.
`finish()` takes back a match still pending when the hypothesis ends.

Phrases that only complete as the suffix of a longer pending match are not
rewarded separately, and when a completed phrase's last tokens also begin another
phrase those tokens can count twice (both rare shapes for lists of names and terms).

With a character tokenizer, phrases start at a word boundary (the "▁" token, with
no bonus of its own) so that "new" does not match inside "renewal".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from echoic.data.text import WORD_BOUNDARY
from echoic.data.tokenizer import Tokenizer
from echoic.errors import EchoicError

DEFAULT_BOOST = 2.0  # log-score bonus per matched token


@dataclass(frozen=True)
class Hotword:
    phrase: str
    boost: float = DEFAULT_BOOST


def read_hotwords(path: str | Path, default_boost: float = DEFAULT_BOOST) -> list[Hotword]:
    """One phrase per line, optionally followed by a TAB and its boost. Blank lines and
    lines starting with # are ignored."""
    path = Path(path)
    if not path.is_file():
        raise EchoicError(f"hotword file not found: {path}")
    hotwords = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        phrase, _, boost = line.partition("\t")
        try:
            value = float(boost) if boost.strip() else default_boost
        except ValueError:
            raise EchoicError(
                f"{path}:{number}: boost must be a number, got '{boost.strip()}'"
            ) from None
        hotwords.append(Hotword(" ".join(phrase.split()), value))
    if not hotwords:
        raise EchoicError(f"{path}: no hotwords")
    return hotwords


@dataclass
class _Node:
    depth: int
    token_bonus: float = 0.0  # earned by the token that leads here
    score: float = 0.0  # bonuses along the path from the root
    end: bool = False  # a phrase ends here
    base: float = 0.0  # score of the deepest end node on the path (self included): kept for good
    children: dict[int, int] = field(default_factory=dict)
    fail: int = 0


class ContextGraph:
    """States are node ids; 0 is the root."""

    def __init__(
        self, sequences: list[tuple[list[int], float]], start_token: int | None = None
    ) -> None:
        self.nodes = [_Node(depth=0)]
        self.start_token = start_token
        for tokens, boost in sequences:
            if not tokens:
                continue
            node = 0
            for position, token in enumerate(tokens):
                child = self.nodes[node].children.get(token)
                bonus = 0.0 if (position == 0 and token == start_token) else boost
                if child is None:
                    child = len(self.nodes)
                    parent = self.nodes[node]
                    self.nodes.append(
                        _Node(depth=parent.depth + 1, token_bonus=bonus, score=parent.score + bonus)
                    )
                    parent.children[token] = child
                elif bonus > self.nodes[child].token_bonus:  # shared prefix: the larger boost wins
                    raise_by = bonus - self.nodes[child].token_bonus
                    self._raise_subtree(child, raise_by)
                node = child
            self.nodes[node].end = True
        self._link()

    def _raise_subtree(self, node_id: int, amount: float) -> None:
        self.nodes[node_id].token_bonus += amount
        stack = [node_id]
        while stack:
            current = stack.pop()
            self.nodes[current].score += amount
            stack.extend(self.nodes[current].children.values())

    def _link(self) -> None:
        """Breadth-first: failure links (longest proper suffix that is a trie path) and
        the kept score of each node."""
        queue = deque()
        for child in self.nodes[0].children.values():
            self.nodes[child].fail = 0
            queue.append(child)
        for node_id in [0, *queue]:
            node = self.nodes[node_id]
            node.base = node.score if node.end else 0.0
        while queue:
            node_id = queue.popleft()
            node = self.nodes[node_id]
            for token, child_id in node.children.items():
                child = self.nodes[child_id]
                child.base = child.score if child.end else node.base
                fail = node.fail
                while fail and token not in self.nodes[fail].children:
                    fail = self.nodes[fail].fail
                candidate = self.nodes[fail].children.get(token, 0)
                child.fail = candidate if candidate != child_id else 0
                queue.append(child_id)

    @classmethod
    def build(cls, hotwords: list[Hotword], tokenizer: Tokenizer) -> ContextGraph:
        boundary = (
            tokenizer.tokens.index(WORD_BOUNDARY) if WORD_BOUNDARY in tokenizer.tokens else None
        )
        sequences = []
        for hotword in hotwords:
            tokens = tokenizer.encode(hotword.phrase)
            if tokenizer.unk_id in tokens:
                raise EchoicError(
                    f"hotword '{hotword.phrase}' has characters the tokenizer does not know"
                )
            if boundary is not None and tokens and tokens[0] != boundary:
                tokens = [boundary, *tokens]
            sequences.append((tokens, hotword.boost))
        return cls(sequences, start_token=boundary)

    def _pending(self, state: int) -> float:
        node = self.nodes[state]
        return node.score - node.base

    def initial_state(self) -> int:
        """The root, after the utterance start, which counts as a word boundary."""
        if self.start_token is not None:
            return self.nodes[0].children.get(self.start_token, 0)
        return 0

    def step(self, state: int, token: int) -> tuple[float, int]:
        """(score change, next state) when a hypothesis in `state` grows by `token`.

        A hypothesis holds from the graph what its completed phrases kept plus the
        pending bonus of the match in progress (node score minus the kept part).
        Extending the match adds the token's bonus (a phrase that completes keeps it).
        A mismatch follows failure links to the longest suffix that still matches:
        the old pending bonus is dropped and the suffix's is held instead; when that
        completes a phrase, the new token's bonus is kept too.
        """
        node = self.nodes[state]
        child = node.children.get(token)
        if child is not None:
            return self.nodes[child].token_bonus, child
        fail = node.fail
        while fail and token not in self.nodes[fail].children:
            fail = self.nodes[fail].fail
        nxt = self.nodes[fail].children.get(token, 0)
        change = self._pending(nxt) - self._pending(state)
        if self.nodes[nxt].end:
            change += self.nodes[nxt].token_bonus
        return change, nxt

    def finish(self, state: int) -> float:
        """Score change when a hypothesis ends in `state`: a pending match is taken back."""
        return -self._pending(state)
