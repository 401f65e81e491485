"""Training hotwords for contextual models: spans of each reference, shared by the batch.

A contextual Paraformer or SeACo-Paraformer learns to use a hotword list by seeing one
in training. Each utterance, with probability `rate`, gives one random span of
`min_words` to `max_words` words of its own transcript (a span of characters for text
without spaces, such as Mandarin). The batch's hotwords are the union of those spans,
so for every utterance the other utterances' spans are distractors, as at inference
most listed hotwords are absent from any one utterance. Every draw comes from (seed,
epoch, utterance id), so the hotwords of a batch do not depend on workers, ranks or
where a run was resumed.

The model also needs to know where listed hotwords are spoken (SeACo's bias loss
targets those positions): `bias_targets` holds the token at every whole-word
occurrence of a listed hotword in an utterance and `NO_BIAS` (0, the CTC blank, never
a decoder target) everywhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from echoic.data.batch import IGNORE_ID
from echoic.data.tokenizer import Tokenizer, clean_text
from echoic.seeding import make_rng

NO_BIAS = 0  # the blank id: "no hotword here", in bias targets and the hotword posterior


@dataclass(frozen=True)
class HotwordSamplingConfig:
    # Probability that an utterance gives a hotword (when it has a span of the allowed
    # size; every allowed span is equally likely).
    rate: float = 0.5
    min_words: int = 1  # text with spaces: spans of min_words to max_words words
    max_words: int = 3
    min_chars: int = 3  # ... of at least this many characters (spaces not counted)
    # Text without spaces (Mandarin): spans of this many characters.
    min_chars_unspaced: int = 2
    max_chars_unspaced: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"hotword rate must be in [0, 1], got {self.rate}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError("hotword min_words must be >= 1 and <= max_words")
        if self.min_chars < 1 or not 1 <= self.min_chars_unspaced <= self.max_chars_unspaced:
            raise ValueError(
                "hotword min_chars must be >= 1, and 1 <= min_chars_unspaced <= max_chars_unspaced"
            )


@dataclass
class BatchHotwords:
    tokens: torch.Tensor  # (K, L) int64 the batch's hotwords, padded with IGNORE_ID
    lens: torch.Tensor  # (K,) int64
    bias_targets: torch.Tensor  # (B, U) int64: token inside a listed hotword, else NO_BIAS


def _candidate_spans(clean: str, config: HotwordSamplingConfig) -> list[tuple[int, int]]:
    """Every (start, end) character range of `clean` (clean_text) a hotword may be."""
    words = [m.span() for m in re.finditer(r"\S+", clean)]
    if len(words) > 1 or " " in clean:
        spans = []
        for first in range(len(words)):
            for size in range(config.min_words, config.max_words + 1):
                if first + size > len(words):
                    break
                start, end = words[first][0], words[first + size - 1][1]
                if len(clean[start:end].replace(" ", "")) >= config.min_chars:
                    spans.append((start, end))
        return spans
    low, high = config.min_chars_unspaced, config.max_chars_unspaced
    return [
        (start, start + size)
        for size in range(low, high + 1)
        for start in range(len(clean) - size + 1)
    ]


def draw_span(
    text: str, utt_id: str, seed: int, epoch: int, config: HotwordSamplingConfig
) -> tuple[int, int] | None:
    """The utterance's hotword for `epoch`, as a character range of clean_text(text), or
    None. A pure function of (seed, epoch, utterance id) and the text."""
    rng = make_rng(seed, epoch, utt_id, "hotword")
    if rng.random() >= config.rate:
        return None
    spans = _candidate_spans(clean_text(text), config)
    return spans[int(rng.integers(len(spans)))] if spans else None


def _covering(ranges: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens that cover some character of [start, end)."""
    return [i for i, (a, b) in enumerate(ranges) if a < b and a < end and b > start]


def _at_boundaries(clean: str, start: int, end: int) -> bool:
    """Whether [start, end) is whole words: in text with spaces, it starts and ends at
    a space or the text's ends ("the" inside "other" is not the hotword "the")."""
    if " " not in clean:
        return True
    while start < end and clean[start] == " ":  # a BPE piece's word boundary
        start += 1
    return (start == 0 or clean[start - 1] == " ") and (end == len(clean) or clean[end] == " ")


def sample_batch_hotwords(
    texts: list[str],
    ids: list[str],
    tokens: torch.Tensor,
    token_lens: torch.Tensor,
    tokenizer: Tokenizer,
    *,
    seed: int,
    epoch: int,
    config: HotwordSamplingConfig,
) -> BatchHotwords:
    """The batch's hotword list (each distinct span's tokens once, in utterance order)
    and the bias targets: every whole-word occurrence of a listed hotword in any
    utterance is marked, not only the span the utterance gave, so an utterance never
    learns NO_BIAS for a listed hotword it says. A hotword's tokens are the utterance's
    own tokens that cover the span's characters (tokenizer.token_ranges), so they are
    found where the span is whatever the tokenizer merges."""
    hotwords: list[tuple[int, ...]] = []
    rows = []
    for row, (text, utt_id) in enumerate(zip(texts, ids)):
        length = int(token_lens[row])
        row_tokens = tokens[row, :length].tolist()
        ranges = tokenizer.token_ranges(text)
        if len(ranges) != length:
            raise ValueError(f"{utt_id}: its tokens do not match its text's tokenization")
        rows.append((clean_text(text), row_tokens, ranges))
        span = draw_span(text, utt_id, seed, epoch, config)
        if span is None:
            continue
        hotword = tuple(row_tokens[i] for i in _covering(ranges, *span))
        if hotword and hotword not in hotwords:
            hotwords.append(hotword)
    targets = np.full(tuple(tokens.shape), IGNORE_ID, dtype=np.int64)
    for row, (clean, row_tokens, ranges) in enumerate(rows):
        targets[row, : len(row_tokens)] = NO_BIAS
        for hotword in hotwords:
            size = len(hotword)
            for first in range(len(row_tokens) - size + 1):
                if tuple(row_tokens[first : first + size]) != hotword:
                    continue
                start, end = ranges[first][0], ranges[first + size - 1][1]
                if _at_boundaries(clean, start, end):
                    targets[row, first : first + size] = hotword
    padded, lens = hotword_tensors([list(h) for h in hotwords])
    return BatchHotwords(padded, lens, torch.from_numpy(targets))


def phrase_tokens(tokenizer: Tokenizer, phrase: str) -> list[int]:
    """A decode-time hotword's tokens as training saw them inside a sentence: without a
    leading token that covers no character (sentencepiece's lone word boundary before
    text without spaces, which a span in mid-sentence never has)."""
    tokens = tokenizer.encode(phrase)
    ranges = tokenizer.token_ranges(phrase)
    while tokens and ranges and ranges[0][0] == ranges[0][1]:
        tokens, ranges = tokens[1:], ranges[1:]
    return tokens


def hotword_tensors(phrases: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists (a decode-time hotword list) -> (K, L) padded with IGNORE_ID, (K,)."""
    phrases = [p for p in phrases if p]
    longest = max((len(p) for p in phrases), default=0)
    padded = torch.full((len(phrases), longest), IGNORE_ID, dtype=torch.int64)
    for k, phrase in enumerate(phrases):
        padded[k, : len(phrase)] = torch.tensor(phrase, dtype=torch.int64)
    return padded, torch.tensor([len(p) for p in phrases], dtype=torch.int64)
