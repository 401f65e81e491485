"""CTC forced alignment: which token each encoder frame belongs to, for a known
transcript (the Viterbi path through CTC's blank-interleaved token sequence)."""

from __future__ import annotations

import torch


def ctc_forced_align(log_probs: torch.Tensor, tokens: list[int], blank: int = 0) -> list[int]:
    """(T, V) log-probabilities of one utterance and its U tokens -> for each frame, the
    index (0..U-1) of the token it emits, or -1 for a blank frame. The most likely CTC
    path that spells exactly `tokens`; an empty list when T frames cannot hold them."""
    frames = log_probs.shape[0]
    extended = [blank]
    for token in tokens:
        extended += [token, blank]
    states = len(extended)
    ids = torch.tensor(extended)
    emit = log_probs[:, ids].float()  # (T, S)
    # a skip over a blank is allowed into a token that differs from the one before it
    skip = torch.zeros(states, dtype=torch.bool)
    skip[2:] = (ids[2:] != blank) & (ids[2:] != ids[:-2])
    minus_inf = torch.tensor(float("-inf"))
    score = torch.full((states,), float("-inf"))
    score[:2] = emit[0, :2] if states > 1 else emit[0, :1]
    back = torch.zeros((frames, states), dtype=torch.long)
    for t in range(1, frames):
        stay = score
        step = torch.cat([minus_inf[None], score[:-1]])
        jump = torch.where(skip, torch.cat([minus_inf.repeat(2), score[:-2]]), minus_inf)
        choices = torch.stack([stay, step, jump])  # (3, S)
        best, which = choices.max(0)
        back[t] = which
        score = best + emit[t]
    final = score[-2:] if states > 1 else score[-1:]
    if not torch.isfinite(final.max()):
        return []
    state = states - 2 + int(final.argmax()) if states > 1 else 0
    path = [0] * frames
    for t in range(frames - 1, -1, -1):
        path[t] = state
        state -= int(back[t, state])
    return [(s - 1) // 2 if s % 2 else -1 for s in path]
