"""Search algorithms over a model's heads. Each returns, per utterance, an n-best list
of `Hypothesis`, best first.

Scores are natural-log probabilities (plus hotword bonuses when a context graph is
given). Tokens never include <blank>, <sos/eos>.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from echoic.decode.context import ContextGraph
from echoic.models.heads.attention import AttentionHead, TransformerDecoder
from echoic.models.heads.transducer import TransducerHead
from echoic.models.layers import lengths_to_mask

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]
    score: float  # what the search ranked by: log-probability + hotword bonus
    ctc_score: float | None = None  # CTC log-probability of the prefix (prefix beam search)
    context_score: float = 0.0  # hotword bonus included in `score`
    times: tuple[tuple[float, float], ...] | None = None  # (start, end) s per token, if known


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


# -- CTC --------------------------------------------------------------------------------------


def ctc_greedy(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0
) -> list[list[Hypothesis]]:
    """Best path per utterance: argmax per frame, repeats merged, blanks removed.
    log_probs (B, T, V)."""
    best, best_ids = log_probs.max(dim=-1)
    results = []
    for scores, ids, length in zip(best, best_ids, lengths.tolist()):
        merged = torch.unique_consecutive(ids[:length])
        tokens = tuple(merged[merged != blank].tolist())
        score = float(scores[:length].sum())
        results.append([Hypothesis(tokens, score, ctc_score=score)])
    return results


@dataclass
class _Prefix:
    blank: float = NEG_INF  # log P(prefix, path ending in blank)
    nonblank: float = NEG_INF  # log P(prefix, path ending in its last token)
    context_state: int | None = None  # a function of the prefix: set once, when it first appears
    context_score: float = 0.0

    @property
    def total(self) -> float:
        return _logaddexp(self.blank, self.nonblank)


def ctc_prefix_beam(
    log_probs: torch.Tensor, beam: int, context: ContextGraph | None = None, blank: int = 0
) -> list[Hypothesis]:
    """CTC prefix beam search over one utterance's (T, V) log-probabilities.

    Prefixes are ranked by their CTC probability plus their hotword bonus; at each
    frame only the `beam` most likely tokens are tried.
    """
    frames, vocab = log_probs.shape
    rows = log_probs.detach().float().cpu().numpy()
    start = _Prefix(blank=0.0, context_state=context.initial_state() if context else 0)
    beams: dict[tuple[int, ...], _Prefix] = {(): start}
    width = min(beam, vocab)
    for t in range(frames):
        row = rows[t]
        candidates = np.argpartition(row, -width)[-width:]
        candidates = [int(c) for c in candidates if c != blank]
        nxt: dict[tuple[int, ...], _Prefix] = defaultdict(_Prefix)
        blank_lp = float(row[blank])
        for prefix, state in beams.items():
            stay = nxt[prefix]
            stay.blank = _logaddexp(stay.blank, state.total + blank_lp)
            stay.context_state, stay.context_score = state.context_state, state.context_score
            last = prefix[-1] if prefix else None
            for token in candidates:
                lp = float(row[token])
                extended = (*prefix, token)
                grown = nxt[extended]
                if token == last:
                    # "aa" with no blank between stays "a"; after a blank it is a new token.
                    same = nxt[prefix]
                    same.nonblank = _logaddexp(same.nonblank, state.nonblank + lp)
                    grown.nonblank = _logaddexp(grown.nonblank, state.blank + lp)
                else:
                    grown.nonblank = _logaddexp(grown.nonblank, state.total + lp)
                if grown.context_state is None:
                    if context is None:
                        grown.context_state = 0
                    else:
                        change, new_state = context.step(state.context_state, token)
                        grown.context_state, grown.context_score = (
                            new_state,
                            state.context_score + change,
                        )
        ranked = sorted(
            nxt.items(), key=lambda item: item[1].total + item[1].context_score, reverse=True
        )
        beams = dict(ranked[:beam])
    hypotheses = []
    for prefix, state in beams.items():
        bonus = state.context_score + (context.finish(state.context_state) if context else 0.0)
        hypotheses.append(
            Hypothesis(prefix, state.total + bonus, ctc_score=state.total, context_score=bonus)
        )
    return sorted(hypotheses, key=lambda h: h.score, reverse=True)


# -- attention decoder ------------------------------------------------------------------------


def _padded(sequences: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long, device=device)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out, torch.tensor([len(s) for s in sequences], device=device)


def sequence_log_probs(
    decoder: TransformerDecoder,
    memory: torch.Tensor,
    memory_lens: torch.Tensor,
    hypotheses: list[tuple[int, ...]],
    sos_eos: int,
    reverse: bool = False,
) -> torch.Tensor:
    """log P(hypothesis + <eos> | memory) under a teacher-forced decoder, for hypotheses
    of one utterance (memory (1, T, D)) or one per utterance (memory (N, T, D))."""
    sequences = [list(reversed(h)) if reverse else list(h) for h in hypotheses]
    ys_in, lengths = _padded([[sos_eos, *s] for s in sequences], sos_eos, memory.device)
    count = len(sequences)
    if memory.shape[0] == 1 and count > 1:
        memory, memory_lens = memory.expand(count, -1, -1), memory_lens.expand(count)
    mask = lengths_to_mask(memory_lens, memory.shape[1])[:, None, None, :]
    log_probs = decoder(memory, mask, ys_in, lengths).float().log_softmax(-1)
    totals = []
    for row, sequence in enumerate(sequences):
        targets = torch.tensor([*sequence, sos_eos], device=memory.device)
        totals.append(log_probs[row, : len(targets)].gather(1, targets[:, None]).sum())
    return torch.stack(totals)


def attention_beam(
    head: AttentionHead,
    memory: torch.Tensor,
    memory_lens: torch.Tensor,
    beam: int,
    length_penalty: float,
) -> list[list[Hypothesis]]:
    """Autoregressive beam search, all utterances of the batch at once (one decoder call
    per step for B * beam rows). A finished hypothesis is ranked by
    log P(tokens + <eos>) / (len(tokens) + 1) ** length_penalty.

    An utterance of T encoder frames gets at most T tokens: at step T + 1 every live
    hypothesis ends, scored with the <eos> it is given there. Scoring such a cut
    hypothesis without that <eos> (once done here) let a decoder that loops
    confidently win with a tail of repeats."""
    decoder, sos_eos = head.decoder, head.sos_eos_id
    batch, device = memory.shape[0], memory.device
    memory = memory.repeat_interleave(beam, dim=0)
    memory_mask = lengths_to_mask(memory_lens, memory.shape[1]).repeat_interleave(beam, 0)[
        :, None, None, :
    ]
    tokens = torch.full((batch * beam, 1), sos_eos, dtype=torch.long, device=device)
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0  # one live hypothesis to start with
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    max_steps = int(memory_lens.max()) + 1
    done = [False] * batch
    for step in range(1, max_steps + 1):
        lengths = torch.full((batch * beam,), step, device=device)
        log_probs = decoder(memory, memory_mask, tokens, lengths)[:, -1].float().log_softmax(-1)
        vocab = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam * vocab)
        top_scores, top_ids = candidates.topk(2 * beam, dim=-1)
        new_tokens, new_scores = [], torch.full((batch, beam), NEG_INF, device=device)
        for b in range(batch):
            alive = 0
            if not done[b] and step >= int(memory_lens[b]) + 1:
                # The length limit: every live hypothesis takes <eos> now, and its score.
                for source, score in enumerate(scores[b].tolist()):
                    if score != NEG_INF:
                        row = b * beam + source
                        ended = score + float(log_probs[row, sos_eos])
                        sequence = tuple(tokens[row, 1:].tolist())
                        normalised = ended / (len(sequence) + 1) ** length_penalty
                        finished[b].append(Hypothesis(sequence, normalised))
                done[b] = True
            for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                source, token = divmod(flat, vocab)
                row = b * beam + source
                if score == NEG_INF or done[b]:
                    break
                if token == sos_eos and rank >= beam:
                    continue  # an ending below the live beams: not a contender
                if token == sos_eos:
                    sequence = tuple(tokens[row, 1:].tolist())
                    normalised = score / (len(sequence) + 1) ** length_penalty
                    finished[b].append(Hypothesis(sequence, normalised))
                    continue
                if alive < beam:
                    new_tokens.append(torch.cat([tokens[row], tokens.new_tensor([token])]))
                    new_scores[b, alive] = score
                    alive += 1
            while alive < beam:  # keep the shape: dead rows
                new_tokens.append(torch.cat([tokens[b * beam], tokens.new_tensor([sos_eos])]))
                alive += 1
            if done[b] or len(finished[b]) >= beam:
                done[b] = True
                new_scores[b] = NEG_INF
        tokens = torch.stack(new_tokens)
        scores = new_scores
        if all(done) or bool((scores == NEG_INF).all()):
            break
    return [sorted(f, key=lambda h: h.score, reverse=True)[:beam] for f in finished]


def attention_rescoring(
    head: AttentionHead,
    memory: torch.Tensor,
    memory_len: torch.Tensor,
    nbest: list[Hypothesis],
    ctc_weight: float,
    reverse_weight: float,
    attention_weight: float = 1.0,
) -> list[Hypothesis]:
    """Rescore one utterance's CTC n-best with the attention decoder(s):
    attention_weight * ((1 - r) * left-to-right + r * right-to-left) + ctc_weight * CTC,
    plus the prefix scorer's score (hotword bonus, word LM). Returns the n-best re-ranked
    by that combined score.

    The prefix search ranks by CTC (weight 1) + scorer, and a word LM's weight is tuned
    for that sum: with the LM in, keep attention_weight + ctc_weight near 1 or below, or
    the two acoustic scores together outweigh it."""
    candidates = [h.tokens for h in nbest]
    left = sequence_log_probs(head.decoder, memory, memory_len, candidates, head.sos_eos_id)
    combined = left
    if reverse_weight > 0 and head.reverse_decoder is not None:
        right = sequence_log_probs(
            head.reverse_decoder, memory, memory_len, candidates, head.sos_eos_id, reverse=True
        )
        combined = (1 - reverse_weight) * left + reverse_weight * right
    rescored = [
        Hypothesis(
            h.tokens,
            attention_weight * float(a) + ctc_weight * h.ctc_score + h.context_score,
            h.ctc_score,
            h.context_score,
        )
        for h, a in zip(nbest, combined.tolist())
    ]
    return sorted(rescored, key=lambda h: h.score, reverse=True)


# -- transducer -------------------------------------------------------------------------------


def rnnt_greedy(
    head: TransducerHead, encoded: torch.Tensor, lengths: torch.Tensor, max_symbols: int
) -> list[list[Hypothesis]]:
    return [
        [Hypothesis(tuple(tokens), 0.0)] for tokens in head.greedy(encoded, lengths, max_symbols)
    ]


@dataclass
class _TransducerHyp:
    tokens: tuple[int, ...]
    score: float  # log-probability
    state: object = None  # predictor state after the last token
    output: torch.Tensor | None = None  # predictor output after the last token
    context_state: int = 0
    context_score: float = 0.0

    @property
    def ranked(self) -> float:
        return self.score + self.context_score


def _merge(hyps: list[_TransducerHyp]) -> list[_TransducerHyp]:
    """Hypotheses with the same tokens are one: their probabilities add up."""
    merged: dict[tuple[int, ...], _TransducerHyp] = {}
    for hyp in hyps:
        kept = merged.get(hyp.tokens)
        if kept is None:
            merged[hyp.tokens] = hyp
        else:
            kept.score = _logaddexp(kept.score, hyp.score)
    return list(merged.values())


def rnnt_beam(
    head: TransducerHead,
    encoded: torch.Tensor,
    length: int,
    beam: int,
    max_symbols: int,
    context: ContextGraph | None = None,
) -> list[Hypothesis]:
    """Modified beam search over one utterance (encoded (T, D)): at each frame, up to
    `max_symbols` rounds in which every hypothesis may emit one more token; a blank
    moves it to the next frame. Hypotheses with equal tokens are merged."""
    blank = head.blank_id
    predictor, joiner = head.predictor, head.joiner
    state = predictor.initial_state(1, encoded.device)
    output, state = predictor.step(torch.tensor([blank], device=encoded.device), state)
    start = _TransducerHyp((), 0.0, state, output[0], context.initial_state() if context else 0)
    hyps = [start]
    for t in range(length):
        frame = encoded[t]
        next_frame: list[_TransducerHyp] = []
        active = hyps
        for _ in range(max_symbols):
            if not active:
                break
            outputs = torch.stack([h.output for h in active])
            log_probs = joiner(frame.expand(len(active), -1), outputs).float().log_softmax(-1)
            emitted: list[_TransducerHyp] = []
            width = min(beam, log_probs.shape[-1])
            for hyp, row in zip(active, log_probs):
                next_frame.append(
                    _TransducerHyp(
                        hyp.tokens,
                        hyp.score + float(row[blank]),
                        hyp.state,
                        hyp.output,
                        hyp.context_state,
                        hyp.context_score,
                    )
                )
                values, ids = row.topk(width)
                for value, token in zip(values.tolist(), ids.tolist()):
                    if token == blank:
                        continue
                    change, new_context = (
                        context.step(hyp.context_state, token) if context else (0.0, 0)
                    )
                    emitted.append(
                        _TransducerHyp(
                            (*hyp.tokens, token),
                            hyp.score + value,
                            hyp.state,
                            None,
                            new_context,
                            hyp.context_score + change,
                        )
                    )
            emitted = sorted(_merge(emitted), key=lambda h: h.ranked, reverse=True)[:beam]
            if emitted:  # run the predictor once for every new token, batched
                last = torch.tensor([h.tokens[-1] for h in emitted], device=encoded.device)
                states = _stack_states([h.state for h in emitted])
                out, new_states = predictor.step(last, states)
                for index, hyp in enumerate(emitted):
                    hyp.output, hyp.state = out[index], _index_state(new_states, index)
            active = emitted
        if active:  # still emitting after max_symbols rounds: they end the frame with a blank
            outputs = torch.stack([h.output for h in active])
            blanks = (
                joiner(frame.expand(len(active), -1), outputs).float().log_softmax(-1)[:, blank]
            )
            for hyp, value in zip(active, blanks.tolist()):
                hyp.score += value
                next_frame.append(hyp)
        hyps = sorted(_merge(next_frame), key=lambda h: h.ranked, reverse=True)[:beam]
    results = []
    for hyp in hyps:
        bonus = hyp.context_score + (context.finish(hyp.context_state) if context else 0.0)
        results.append(Hypothesis(hyp.tokens, hyp.score + bonus, context_score=bonus))
    return sorted(results, key=lambda h: h.score, reverse=True)


def _stack_states(states: list):
    if isinstance(states[0], tuple):  # LSTM (h, c), each (layers, 1, H)
        return tuple(torch.cat([s[i] for s in states], dim=1) for i in range(2))
    return torch.cat(states, dim=0)  # stateless: (1, context - 1) each


def _index_state(states, index: int):
    if isinstance(states, tuple):
        return tuple(s[:, index : index + 1] for s in states)
    return states[index : index + 1]
