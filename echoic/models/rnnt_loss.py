"""RNN-T loss: forward-backward over the (t, u) lattice with an analytic gradient.

No torchaudio or k2 here, so echoic computes it itself, as one autograd Function:

1. Log-normaliser. With `fused_log_softmax=True` the input is the joiner's raw
   logits (B, T, U+1, V): their log-sum-exp over V is computed in chunks, so no
   full-size log-softmax tensor is ever made. Otherwise the input already holds
   log-probabilities.
2. Only the two log-probs the lattice uses are gathered: blank at every node and
   the next target symbol at every node, (B, T, U+1) each.
3. alpha (forward) and beta (backward) variables are computed over anti-diagonals
   n = t + u, in a skewed layout where a diagonal is one contiguous row, vectorised
   over the batch and the diagonal: T + U sequential steps of small tensor ops.
4. The gradient is analytic. With occupancies occ_blank(t, u) and occ_emit(t, u)
   (the posterior probability of taking each edge) and occ(t, u) their sum:
       d(-log P)/d z[t, u, v] = softmax(z)[t, u, v] * occ(t, u)
                                - occ_blank(t, u) [v = blank] - occ_emit(t, u) [v = y_u+1]
   written chunk by chunk straight into one logits-sized gradient tensor.

So memory beyond the logits and their gradient is O(B * T * U), not an autograd
graph of T * U steps. Variable T and U within a batch are handled by masking the
lattice edges of each utterance; the last blank, from (T_b - 1, U_b), ends the path.
"""

from __future__ import annotations

from typing import Literal

import torch

_NEG_INF = float("-inf")
_CHUNK_ELEMENTS = 1 << 22  # logits elements per chunk of the log-sum-exp and the gradient


def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int = 0,
    reduction: Literal["mean", "sum", "none"] = "mean",
    fused_log_softmax: bool = True,
) -> torch.Tensor:
    """RNN-T negative log-likelihood.

    logits: (B, T, U+1, V) joiner output (raw logits, or log-probs when
        `fused_log_softmax=False`); float32, float64, or half types (computed in float32).
    targets: (B, U) int, padding ignored; logit_lengths, target_lengths: (B,).
    Returns (B,) for reduction "none", else the sum or the batch mean.
    """
    _check(logits, targets, logit_lengths, target_lengths, blank)
    losses = _RnntLoss.apply(
        logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax
    )
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def _check(logits, targets, logit_lengths, target_lengths, blank) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, T, U+1, V), got shape {tuple(logits.shape)}")
    batch, frames, u1, vocab = logits.shape
    if targets.shape != (batch, u1 - 1):
        raise ValueError(
            f"targets must be (B, U) = ({batch}, {u1 - 1}), got {tuple(targets.shape)}"
        )
    if logit_lengths.shape != (batch,) or target_lengths.shape != (batch,):
        raise ValueError("logit_lengths and target_lengths must be (B,)")
    if not 0 <= blank < vocab:
        raise ValueError(f"blank {blank} is outside the vocabulary of {vocab}")
    if int(logit_lengths.min()) < 1 or int(logit_lengths.max()) > frames:
        raise ValueError(f"logit_lengths must be within [1, {frames}]")
    if int(target_lengths.min()) < 0 or int(target_lengths.max()) > u1 - 1:
        raise ValueError(f"target_lengths must be within [0, {u1 - 1}]")


class _RnntLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, blank, fused):
        batch, frames, u1, _ = logits.shape
        compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        logits = logits.contiguous()
        if fused:
            normaliser = _log_sum_exp(logits, compute)
        else:
            normaliser = torch.zeros(batch, frames, u1, dtype=compute, device=logits.device)
        symbols = targets.long().clamp(min=0)
        blank_lp = logits[..., blank].to(compute) - normaliser
        emit_lp = _gather_targets(logits, symbols).to(compute) - normaliser[:, :, :-1]
        lattice = _Lattice(blank_lp, emit_lp, logit_lengths.long(), target_lengths.long())
        ctx.save_for_backward(
            logits,
            normaliser,
            symbols,
            lattice.alpha,
            lattice.beta,
            lattice.blank_sk,
            lattice.emit_sk,
            lattice.terminal_sk,
            lattice.loglike,
        )
        ctx.blank, ctx.fused = blank, fused
        return -lattice.loglike.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        logits, normaliser, symbols, alpha, beta, blank_sk, emit_sk, terminal_sk, loglike = (
            ctx.saved_tensors
        )
        batch, frames, u1, _ = logits.shape
        occ_blank, occ_emit = _occupancies(
            alpha, beta, blank_sk, emit_sk, terminal_sk, loglike, frames, u1
        )
        scale = grad_output.to(occ_blank.dtype)[:, None, None]
        if ctx.fused:
            grad = _softmax_times(logits, normaliser, occ_blank + occ_emit, scale)
        else:
            grad = torch.zeros_like(logits)
        grad[..., ctx.blank] -= (occ_blank * scale).to(grad.dtype)
        if u1 > 1:
            index = symbols[:, None, :, None].expand(batch, frames, u1 - 1, 1)
            emit_grad = (occ_emit[:, :, :-1] * scale).to(grad.dtype)[..., None]
            grad[:, :, :-1].scatter_add_(3, index, -emit_grad)
        return grad, None, None, None, None, None


def _rows(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logits as (B*T, U+1, V) rows and the number of rows per chunk."""
    batch, frames, u1, vocab = logits.shape
    return logits.view(batch * frames, u1, vocab), max(1, _CHUNK_ELEMENTS // (u1 * vocab))


def _log_sum_exp(logits: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """log sum_v exp(logits) per lattice node, in chunks: (B, T, U+1)."""
    rows, step = _rows(logits)
    out = torch.empty(rows.shape[:2], dtype=compute, device=logits.device)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = torch.logsumexp(rows[start : start + step].to(compute), dim=-1)
    return out.view(logits.shape[:3])


def _gather_targets(logits: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """logits[b, t, u, symbols[b, u]] for u < U: (B, T, U)."""
    batch, frames, u1, _ = logits.shape
    index = symbols[:, None, :, None].expand(batch, frames, u1 - 1, 1)
    return logits[:, :, :-1].gather(3, index).squeeze(3)


def _softmax_times(logits, normaliser, occupancy, scale) -> torch.Tensor:
    """softmax(logits) * occupancy * scale, chunk by chunk into one new tensor.

    Folding the factor into the exponent, exp(z - (lse - log|occ * scale|)), makes it two
    passes over the logits (subtract, exp) with no temporaries.
    """
    weight = occupancy * scale
    shift = normaliser - torch.log(weight.abs())  # +inf where the weight is 0: exp gives 0
    rows, step = _rows(logits)
    shift_rows = shift.reshape(rows.shape[0], rows.shape[1], 1)
    grad = torch.empty_like(logits)
    grad_rows = grad.view(rows.shape)
    for start in range(0, rows.shape[0], step):
        chunk = slice(start, start + step)
        torch.sub(rows[chunk], shift_rows[chunk].to(logits.dtype), out=grad_rows[chunk])
        grad_rows[chunk].exp_()
    negative = (weight < 0).any(dim=2).any(dim=1)
    if bool(negative.any()):  # only when a caller scales some utterance's loss negatively
        grad[negative] = grad[negative] * weight[negative].sign()[..., None].to(grad.dtype)
    return grad


# -- the lattice -----------------------------------------------------------------------------


def _skew_index(frames: int, u1: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Index of node (t, u = n - t) in a flattened (T, U+1) tensor for every diagonal n and
    position t, with validity mask: (N, T) each, N = T + U."""
    diagonals = frames + u1 - 1
    n = torch.arange(diagonals, device=device)[:, None]
    t = torch.arange(frames, device=device)[None, :]
    u = n - t
    valid = (u >= 0) & (u < u1)
    return t * u1 + u.clamp(0, u1 - 1), valid, diagonals


def _skew(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, U+1) -> (N, B, T): diagonal n of the lattice becomes row n."""
    batch = values.shape[0]
    flat = values.reshape(batch, -1)[:, index.reshape(-1)].reshape(batch, *index.shape)
    return flat.masked_fill(~valid, _NEG_INF).transpose(0, 1).contiguous()


def _unskew(skewed: torch.Tensor, u1: int) -> torch.Tensor:
    """(N, B, T) -> (B, T, U+1)."""
    diagonals, batch, frames = skewed.shape
    t = torch.arange(frames, device=skewed.device)[:, None]
    u = torch.arange(u1, device=skewed.device)[None, :]
    flat = skewed.transpose(0, 1).reshape(batch, diagonals * frames)
    return flat[:, ((t + u) * frames + t).reshape(-1)].reshape(batch, frames, u1)


class _Lattice:
    """alpha and beta over one batch; each utterance b uses nodes t < T_b, u <= U_b."""

    def __init__(self, blank_lp, emit_lp, frame_lens, target_lens) -> None:
        batch, frames, u1 = blank_lp.shape
        device, dtype = blank_lp.device, blank_lp.dtype
        t = torch.arange(frames, device=device)[None, :, None]
        u = torch.arange(u1, device=device)[None, None, :]
        last_t = (frame_lens - 1)[:, None, None]
        last_u = target_lens[:, None, None]
        # Edges inside each utterance's lattice; the final blank is kept apart as "terminal".
        blank_edge = blank_lp.masked_fill(~((t < last_t) & (u <= last_u)), _NEG_INF)
        emit_edge = torch.cat([emit_lp, emit_lp.new_full((batch, frames, 1), _NEG_INF)], dim=2)
        emit_edge = emit_edge.masked_fill(~((t <= last_t) & (u < last_u)), _NEG_INF)
        terminal = blank_lp.masked_fill(~((t == last_t) & (u == last_u)), _NEG_INF)

        index, valid, diagonals = _skew_index(frames, u1, device)
        self.blank_sk = _skew(blank_edge, index, valid)
        self.emit_sk = _skew(emit_edge, index, valid)
        self.terminal_sk = _skew(terminal, index, valid)
        self.alpha = self._alpha(diagonals, batch, frames, dtype, device)
        self.beta = self._beta(diagonals)
        # Every path ends with the terminal blank; log P = logsumexp over (alpha + terminal).
        self.loglike = torch.logsumexp(
            (self.alpha + self.terminal_sk).transpose(0, 1).reshape(batch, -1), 1
        )

    def _alpha(self, diagonals, batch, frames, dtype, device) -> torch.Tensor:
        alpha = torch.full((diagonals, batch, frames), _NEG_INF, dtype=dtype, device=device)
        alpha[0, :, 0] = 0.0
        emitted = torch.empty(batch, frames, dtype=dtype, device=device)
        blanked = torch.empty(batch, frames - 1, dtype=dtype, device=device)
        for n in range(1, diagonals):
            # Into (t, u): by emission from (t, u-1), same position on the previous
            # diagonal; by blank from (t-1, u), one position to the left.
            torch.add(alpha[n - 1], self.emit_sk[n - 1], out=emitted)
            alpha[n, :, 0] = emitted[:, 0]
            if frames > 1:
                torch.add(alpha[n - 1, :, :-1], self.blank_sk[n - 1, :, :-1], out=blanked)
                torch.logaddexp(emitted[:, 1:], blanked, out=alpha[n, :, 1:])
        return alpha

    def _beta(self, diagonals) -> torch.Tensor:
        beta = self.terminal_sk.clone()
        _, batch, frames = beta.shape
        emitted = torch.empty(batch, frames, dtype=beta.dtype, device=beta.device)
        blanked = torch.empty(batch, frames - 1, dtype=beta.dtype, device=beta.device)
        for n in range(diagonals - 2, -1, -1):
            # Out of (t, u): emission to (t, u+1), same position on the next diagonal;
            # blank to (t+1, u), one position to the right; or the terminal blank.
            torch.add(beta[n + 1], self.emit_sk[n], out=emitted)
            torch.logaddexp(beta[n], emitted, out=beta[n])
            if frames > 1:
                torch.add(beta[n + 1, :, 1:], self.blank_sk[n, :, :-1], out=blanked)
                torch.logaddexp(beta[n, :, :-1], blanked, out=beta[n, :, :-1])
        return beta


def _occupancies(alpha, beta, blank_sk, emit_sk, terminal_sk, loglike, frames, u1):
    """Posterior probability of each blank (terminal included) and emission edge: (B, T, U+1)."""
    neg_inf = alpha.new_full((1, *alpha.shape[1:]), _NEG_INF)
    loglike = loglike[None, :, None]
    beta_next_diag = torch.cat([beta[1:], neg_inf], dim=0)  # beta of (t, u+1)
    occ_emit = torch.exp(alpha + emit_sk + beta_next_diag - loglike)
    beta_right = torch.cat(
        [beta_next_diag[:, :, 1:], neg_inf[:, :, :1].expand(alpha.shape[0], -1, 1)], dim=2
    )
    occ_blank = torch.exp(alpha + blank_sk + beta_right - loglike) + torch.exp(
        alpha + terminal_sk - loglike
    )
    return _unskew(occ_blank, u1), _unskew(occ_emit, u1)
