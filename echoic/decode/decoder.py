"""Decoding methods by name and the options they take.

A model names the methods it can run (`decode_methods`, echoic.models.contract);
`available_methods(model)` lists them, and asking for another is a one-line error
listing those. Loading a trained model is echoic.train.experiment's.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from echoic.data.batch import Batch
from echoic.data.hotwords import hotword_tensors, phrase_tokens
from echoic.data.tokenizer import Tokenizer
from echoic.decode.context import ContextGraph, read_hotwords
from echoic.decode.lm import LM_WEIGHT, WORD_BONUS, ScorerSum, WordLM
from echoic.decode.search import (
    Hypothesis,
    attention_beam,
    attention_rescoring,
    ctc_greedy,
    ctc_prefix_beam,
    rnnt_beam,
    rnnt_greedy,
)
from echoic.errors import EchoicError
from echoic.models.base import EncoderModel
from echoic.models.contract import TakesHotwords, TrainableModel


@dataclass(frozen=True)
class DecodeOptions:
    method: str
    beam: int = 10  # hypotheses kept (and CTC n-best size for attention_rescoring)
    ctc_weight: float = 0.5  # attention_rescoring: weight of the CTC score
    attention_weight: float = 1.0  # attention_rescoring: weight of the attention score
    reverse_weight: float = 0.0  # attention_rescoring: weight of the right-to-left decoder
    length_penalty: float = 1.0  # attention: finished score / length ** length_penalty
    max_symbols_per_frame: int = 3  # rnnt_greedy / rnnt_beam
    # Prefix scorer: hotword graph and/or word LM (ctc_prefix_beam, attention_rescoring,
    # rnnt_beam); anything with initial_state(), step(state, token), finish(state).
    context: ContextGraph | WordLM | ScorerSum | None = None
    # paraformer on a contextual or SeACo-Paraformer: the hotword list, token ids per
    # hotword (echoic.models.bias); None: no list. An empty list decodes as none.
    hotwords: tuple[tuple[int, ...], ...] | None = None


def _prefix_beam_nbests(log_probs, lens, options):
    return [
        ctc_prefix_beam(log_probs[b, :n], options.beam, options.context)
        for b, n in enumerate(lens.tolist())
    ]


def _ctc_greedy(model, encoded, lens, options):
    return ctc_greedy(model.ctc.log_probs(encoded), lens)


def _ctc_prefix_beam(model, encoded, lens, options):
    return _prefix_beam_nbests(model.ctc.log_probs(encoded), lens, options)


def _attention(model, encoded, lens, options):
    return attention_beam(model.attention, encoded, lens, options.beam, options.length_penalty)


def _attention_rescoring(model, encoded, lens, options):
    nbests = _ctc_prefix_beam(model, encoded, lens, options)
    return [
        attention_rescoring(
            model.attention,
            encoded[b : b + 1],
            lens[b : b + 1],
            nbest,
            options.ctc_weight,
            options.reverse_weight,
            options.attention_weight,
        )
        for b, nbest in enumerate(nbests)
    ]


def _rnnt_greedy(model, encoded, lens, options):
    return rnnt_greedy(model.transducer, encoded, lens, options.max_symbols_per_frame)


def _rnnt_beam(model, encoded, lens, options):
    return [
        rnnt_beam(
            model.transducer,
            encoded[b],
            n,
            options.beam,
            options.max_symbols_per_frame,
            options.context,
        )
        for b, n in enumerate(lens.tolist())
    ]


def _paraformer(model, encoded, lens, options):
    hotwords = None
    if options.hotwords is not None:
        tokens, lengths = hotword_tensors([list(h) for h in options.hotwords])
        hotwords = (tokens.to(encoded.device), lengths.to(encoded.device))
    return [
        [Hypothesis(d.tokens, d.score, times=d.times)]
        for d in model.parallel_decode(encoded, lens, hotwords)
    ]


# name -> (search, whether it takes a prefix scorer: hotword graph or word LM). Which of
# them a model can run, and which is its default, is the model's to say
# (`decode_methods`, echoic.models.contract). `decode_batch` runs the encoder on the
# whole batch; of the searches, ctc_greedy, attention (B * beam decoder rows per step)
# and rnnt_greedy step through the batch together, the others loop over its utterances
# one at a time.
METHODS: dict[str, tuple[Callable, bool]] = {
    "ctc_greedy": (_ctc_greedy, False),
    "ctc_prefix_beam": (_ctc_prefix_beam, True),
    "attention": (_attention, False),
    "attention_rescoring": (_attention_rescoring, True),
    "rnnt_greedy": (_rnnt_greedy, False),
    "rnnt_beam": (_rnnt_beam, True),
    # One batched parallel pass, greedy per position: no prefix search for a hotword graph
    # or LM to steer, so --lm is refused for it (not silently ignored), and --hotwords
    # works only with a model trained to take a list (DecodeOptions.hotwords).
    "paraformer": (_paraformer, False),
}


def available_methods(model: TrainableModel) -> list[str]:
    """The methods `model` can run, in METHODS' order."""
    own = model.decode_methods()
    return [name for name in METHODS if name in own]


def default_method(model: TrainableModel) -> str:
    """The most accurate method the model has."""
    own = [name for name in model.decode_methods() if name in METHODS]
    if not own:
        raise EchoicError("this model does not transcribe: it has no decoding method")
    return own[0]


def check_options(model: TrainableModel, options: DecodeOptions) -> None:
    valid = available_methods(model)
    if options.method not in METHODS:
        close = difflib.get_close_matches(options.method, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise EchoicError(
            f"unknown method '{options.method}'{hint} (this model runs {', '.join(valid)})"
        )
    if options.method not in valid:
        raise EchoicError(
            f"method '{options.method}' needs heads this model lacks; "
            f"valid methods: {', '.join(valid)}"
        )
    if options.context is not None and not METHODS[options.method][1]:
        biased = [m for m in valid if METHODS[m][1]]
        raise EchoicError(
            f"hotwords and --lm work with {', '.join(biased)}, not with {options.method}"
        )
    if options.hotwords is not None and not isinstance(model, TakesHotwords):
        raise EchoicError(
            f"--hotwords with {options.method} needs a contextual or SeACo-Paraformer "
            "(paraformer.bias); this model has no hotword modules"
        )
    if options.beam < 1:
        raise EchoicError("--beam must be at least 1")


def with_scorer(
    options: DecodeOptions, scorer: ScorerSettings | None, tokenizer: Tokenizer
) -> DecodeOptions:
    """`options` with what `scorer` names: a prefix scorer (hotword graph, word LM) for
    the searches that take one; for `paraformer`, the hotword list as token ids (its
    one pass has no prefix search for an LM, which is refused)."""
    scorer = scorer or ScorerSettings()
    if options.method == "paraformer":
        if scorer.lm is not None:
            raise EchoicError(
                "the paraformer method takes no word LM: its one parallel pass has no "
                "prefix search for an LM to steer"
            )
        if scorer.hotwords is None:
            return options
        if scorer.hotword_boost is not None:
            raise EchoicError(
                "--hotword-boost is for the context graph; paraformer's hotword list has no boost"
            )
        phrases = []
        for entry in read_hotwords(scorer.hotwords):
            tokens = phrase_tokens(tokenizer, entry.phrase)
            if tokenizer.unk_id in tokens:
                raise EchoicError(
                    f"hotword '{entry.phrase}' has characters the tokenizer does not know"
                )
            phrases.append(tuple(tokens))
        return replace(options, hotwords=tuple(phrases))
    context = scorer.build(tokenizer)
    # else keep whatever context the caller's options carry
    return replace(options, context=context) if context is not None else options


@dataclass(frozen=True)
class ScorerSettings:
    """What the prefix scorer is made of, as `echoic decode` and `transcribe` take it:
    a hotword file and its default boost, a word-LM text and its weights (None: the
    tuned defaults). `build` makes the scorer; nothing given builds None."""

    hotwords: str | Path | None = None
    hotword_boost: float | None = None
    lm: str | Path | None = None
    lm_weight: float | None = None
    word_bonus: float | None = None

    def build(self, tokenizer: Tokenizer) -> ContextGraph | WordLM | ScorerSum | None:
        return build_scorer(tokenizer, **asdict(self))


def build_scorer(
    tokenizer: Tokenizer,
    *,
    hotwords: str | Path | None = None,
    hotword_boost: float | None = None,
    lm: str | Path | None = None,
    lm_weight: float | None = None,
    word_bonus: float | None = None,
) -> ContextGraph | WordLM | ScorerSum | None:
    """The prefix scorer for `DecodeOptions.context`: a hotword graph from a hotword
    file, a word LM from a text or manifest (weights default to the tuned ones), both,
    or None."""
    scorers: list = []
    phrases: list[str] = []
    if hotwords is not None:
        kwargs = {"default_boost": hotword_boost} if hotword_boost is not None else {}
        entries = read_hotwords(hotwords, **kwargs)
        scorers.append(ContextGraph.build(entries, tokenizer))
        phrases = [entry.phrase for entry in entries]
    if lm is not None:
        weight = LM_WEIGHT if lm_weight is None else lm_weight
        bonus = WORD_BONUS if word_bonus is None else word_bonus
        scorers.append(
            WordLM.from_file(lm, tokenizer, weight=weight, word_bonus=bonus, extra_words=phrases)
        )
    if not scorers:
        return None
    return scorers[0] if len(scorers) == 1 else ScorerSum(scorers)


@torch.no_grad()
def decode_batch(model: EncoderModel, batch: Batch, options: DecodeOptions) -> list[Hypothesis]:
    """The best hypothesis of every utterance in the batch."""
    encoded, lens = model.encode(batch)
    search, _ = METHODS[options.method]
    return _best(search(model, encoded, lens, options))


def decode_ctc_log_probs(
    log_probs: torch.Tensor, lens: torch.Tensor, options: DecodeOptions
) -> list[Hypothesis]:
    """The best hypothesis of every utterance from CTC log-probabilities (B, T, V) made
    elsewhere (the exported model in onnxruntime), with ctc_greedy or ctc_prefix_beam."""
    if options.method == "ctc_greedy":
        return _best(ctc_greedy(log_probs, lens))
    return _best(_prefix_beam_nbests(log_probs, lens, options))


def _best(nbests: list[list[Hypothesis]]) -> list[Hypothesis]:
    return [nbest[0] if nbest else Hypothesis((), float("-inf")) for nbest in nbests]
