"""Tokenizers: characters (CJK-aware) and sentencepiece BPE, one JSON file each.

Both share one id layout so every model head can rely on it:

    0          <blank>    (CTC / transducer blank; never produced by encode)
    1          <unk>      (anything not in the vocabulary: counted, never dropped)
    2 .. V-2   the vocabulary
    V-1        <sos/eos>  (attention decoder start and end)

A word boundary is the token "▁" (U+2581), as in sentencepiece. Spaces between
two CJK characters carry no information and are dropped before encoding.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from echoic.data.text import WORD_BOUNDARY, drop_spaces_between_cjk
from echoic.errors import EchoicError

BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
BLANK_ID = 0
UNK_ID = 1


def clean_text(text: str) -> str:
    """The text every tokenizer encodes: single spaces, none between CJK characters."""
    return drop_spaces_between_cjk(" ".join(text.split()))


class Tokenizer:
    """The shared interface; see the module docstring for the id layout."""

    kind: str
    tokens: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def blank_id(self) -> int:
        return BLANK_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def sos_eos_id(self) -> int:
        return len(self.tokens) - 1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of `text` that `encode` maps to <unk>, in order."""
        raise NotImplementedError

    def token_ranges(self, text: str) -> list[tuple[int, int]]:
        """For each token of `encode(text)`, the characters of `clean_text(text)` it
        covers, as (start, end); a token that covers none (a lone word boundary at the
        start) has start == end."""
        raise NotImplementedError

    def to_json(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n")


class CharTokenizer(Tokenizer):
    """One token per character; spaces become "▁"."""

    kind = "char"

    def __init__(self, tokens: list[str]) -> None:
        _check_layout(tokens)
        self.tokens = list(tokens)
        self._ids = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(clean_text(text).replace(" ", WORD_BOUNDARY))
        return cls([BLANK, UNK, *sorted(chars), SOS_EOS])

    def _symbols(self, text: str) -> str:
        return clean_text(text).replace(" ", WORD_BOUNDARY)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(char, UNK_ID) for char in self._symbols(text)]

    def unknown_chars(self, text: str) -> list[str]:
        return [char for char in self._symbols(text) if char not in self._ids]

    def token_ranges(self, text: str) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(len(self._symbols(text)))]

    def decode(self, ids: Iterable[int]) -> str:
        special = (BLANK_ID, self.sos_eos_id)
        pieces = [self.tokens[i] for i in ids if i not in special]
        return "".join(pieces).replace(WORD_BOUNDARY, " ").strip()

    def to_json(self) -> dict:
        return {"type": self.kind, "tokens": self.tokens}


class BpeTokenizer(Tokenizer):
    """Sentencepiece BPE; the model bytes travel inside the JSON file (base64)."""

    kind = "bpe"

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        processor = self._processor
        if processor.pad_id() != BLANK_ID or processor.unk_id() != UNK_ID:
            raise EchoicError("sentencepiece model must have <blank> as pad id 0 and <unk> as id 1")
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        self.tokens = [*pieces, SOS_EOS]

    @property
    def _processor(self) -> spm.SentencePieceProcessor:
        # Built lazily and dropped when pickled, so data-loader workers get a cheap copy.
        processor = self.__dict__.get("_sp")
        if processor is None:
            processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
            self.__dict__["_sp"] = processor
        return processor

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, character_coverage: float = 1.0
    ) -> BpeTokenizer:
        """Train on `texts`; `vocab_size` counts every id including <blank>, <unk> and <sos/eos>.

        A corpus too small for `vocab_size` gives a smaller vocabulary, not an error.
        """
        if vocab_size < 4:
            raise EchoicError("--vocab-size must be at least 4")
        model = io.BytesIO()
        sentences = [clean_text(t) for t in texts if t.strip()]
        if not sentences:
            raise EchoicError("no non-empty transcripts to train a BPE model on")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size - 1,  # <sos/eos> is appended by echoic
                character_coverage=character_coverage,
                pad_id=BLANK_ID,
                pad_piece=BLANK,
                unk_id=UNK_ID,
                unk_piece=UNK,
                unk_surface=UNK,
                bos_id=-1,
                eos_id=-1,
                hard_vocab_limit=False,
                normalization_rule_name="identity",
                num_threads=1,  # deterministic merges
                minloglevel=2,
            )
        except RuntimeError as error:
            if "required_chars" in str(error):
                chars = len(set("".join(sentences)) - {" "}) + 1  # + the word boundary
                raise EchoicError(
                    f"--vocab-size {vocab_size} is too small for the {chars} characters of the "
                    f"transcripts: use at least {chars + 3}, or a --character-coverage below 1"
                ) from None
            raise EchoicError(f"sentencepiece training failed: {error}") from None
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(clean_text(text), out_type=int)

    def token_ranges(self, text: str) -> list[tuple[int, int]]:
        clean = clean_text(text)
        # sentencepiece gives byte offsets into the UTF-8 text: map them to characters.
        char_at = [0] * (len(clean.encode("utf-8")) + 1)
        position = 0
        for index, char in enumerate(clean):
            width = len(char.encode("utf-8"))
            for offset in range(width):
                char_at[position + offset] = index
            position += width
        char_at[position] = len(clean)
        pieces = self._processor.encode(clean, return_type="proto").pieces
        return [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def unknown_chars(self, text: str) -> list[str]:
        # BPE keeps every character it covers as a piece of its own, so a character is
        # unknown exactly when it has no piece.
        processor = self._processor
        return [c for c in clean_text(text) if c != " " and processor.piece_to_id(c) == UNK_ID]

    def decode(self, ids: Iterable[int]) -> str:
        size = self._processor.get_piece_size()
        return self._processor.decode([i for i in ids if 0 < i < size])

    def to_json(self) -> dict:
        return {
            "type": self.kind,
            "tokens": self.tokens,
            "sentencepiece_model": base64.b64encode(self.model_proto).decode("ascii"),
        }


class UnitTokenizer(Tokenizer):
    """Cluster ids 0..K-1 (HuBERT's targets, see echoic.pretrain.units) as tokens: a
    transcript is the ids as space-separated integers, id k is token k + 2."""

    kind = "units"
    FIRST = 2  # the id of cluster 0: after <blank> and <unk>

    def __init__(self, num_units: int) -> None:
        if num_units < 2:
            raise ValueError("a unit vocabulary needs at least 2 units")
        self.num_units = num_units
        self.tokens = [BLANK, UNK, *(str(i) for i in range(num_units)), SOS_EOS]

    def encode(self, text: str) -> list[int]:
        ids = []
        for unit in text.split():
            value = int(unit) if unit.isdigit() else -1
            ids.append(value + self.FIRST if 0 <= value < self.num_units else UNK_ID)
        return ids

    def unknown_chars(self, text: str) -> list[str]:
        return [u for u in text.split() if not (u.isdigit() and int(u) < self.num_units)]

    def token_ranges(self, text: str) -> list[tuple[int, int]]:
        ranges, position = [], 0
        for unit in text.split():
            start = text.index(unit, position)
            position = start + len(unit)
            ranges.append((start, position))
        return ranges

    def decode(self, ids: Iterable[int]) -> str:
        units = [i - self.FIRST for i in ids if self.FIRST <= i < self.FIRST + self.num_units]
        return " ".join(map(str, units))

    def to_json(self) -> dict:
        return {"type": self.kind, "num_units": self.num_units, "tokens": self.tokens}


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise EchoicError(f"tokenizer not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        kind = record["type"]
        if kind == "char":
            return CharTokenizer(record["tokens"])
        if kind == "bpe":
            tokenizer = BpeTokenizer(base64.b64decode(record["sentencepiece_model"]))
            if tokenizer.tokens != record["tokens"]:
                raise ValueError("token list does not match the sentencepiece model")
            return tokenizer
        if kind == "units":
            return UnitTokenizer(int(record["num_units"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise EchoicError(f"{path}: not a tokenizer file ({error})") from None
    raise EchoicError(f"{path}: unknown tokenizer type '{kind}' (allowed: char, bpe, units)")


def _check_layout(tokens: list[str]) -> None:
    if (
        len(tokens) < 3
        or tokens[BLANK_ID] != BLANK
        or tokens[UNK_ID] != UNK
        or tokens[-1] != SOS_EOS
    ):
        raise ValueError(f"token list must start with {BLANK}, {UNK} and end with {SOS_EOS}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("token list has duplicates")
