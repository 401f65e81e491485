"""Building blocks shared by encoders and decoders.

Shapes: B batch, T time, D model width, H heads, K = D / H head width.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Positional = Literal["none", "rel_pos", "rope"]


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at real frames."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def strided_lengths(lengths, layers: tuple[tuple[int, int], ...]):
    """Output lengths of unpadded strided convolutions, (kernel, stride) each, for input
    lengths: an int, or a tensor (as tensor operations, so that export traces them)."""
    tensor = isinstance(lengths, torch.Tensor)
    for kernel, stride in layers:
        if tensor:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        else:
            lengths = (lengths - kernel) // stride + 1
    return lengths.clamp(min=0) if tensor else max(lengths, 0)


def strided_input_length(outputs: int, layers: tuple[tuple[int, int], ...]) -> int:
    """The fewest input frames that give `outputs` outputs through those convolutions."""
    for kernel, stride in reversed(layers):
        outputs = (outputs - 1) * stride + kernel
    return outputs


def _dropped(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability p (exact to 1/32768).

    torch's CPU dropout draws one float Bernoulli per element (about 8 ns each here).
    One int64 draw instead yields four 16-bit lanes; each lane's low 15 bits are
    uniform (an int64 draw's sign bit is 0, so the top lane has only 15), which makes
    the mask about three times cheaper to draw, on the global generator as usual.
    """
    count = shape.numel()
    lanes = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = lanes.view(torch.int16)[:count].bitwise_and_(0x7FFF)
    return (lanes < round(p * 32768)).view(shape)


class _MaskedDropout(torch.autograd.Function):
    """Dropout with a cheap mask (see `_dropped`), optionally in place.

    In place is for inputs whose producer does not need them for its own backward
    (the output of a Linear or of SiLU): it saves allocating and faulting in a new
    tensor. The mask is kept as bool, a quarter of a float mask's memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        dropped = _dropped(x.shape, p, x.device)
        ctx.save_for_backward(dropped)
        ctx.scale = 1.0 / (1.0 - p)
        if inplace:
            ctx.mark_dirty(x)
            return x.masked_fill_(dropped, 0.0).mul_(ctx.scale)
        return torch.where(dropped, 0.0, x).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        return torch.where(dropped, 0.0, grad).mul_(ctx.scale), None, None


class Dropout(nn.Module):
    """nn.Dropout with a cheaper mask on CPU; the native kernel elsewhere.

    `inplace=True` only where the input's producer keeps no reference to it for backward.
    """

    def __init__(self, p: float, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if torch.compiler.is_compiling():
            # Inductor draws rand_like inside the fused kernel (its bernoulli_ on CPU,
            # and so F.dropout, is a slow fallback; the cheap mask's in-place random_
            # would break the graph).
            return torch.where(torch.rand_like(x) < self.p, 0.0, x) * (1.0 / (1.0 - self.p))
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True, inplace=self.inplace)
        return _MaskedDropout.apply(x, self.p, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


def _conv2d_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Weight gradient of an unpadded, undilated conv2d as one matrix product per
    utterance over its patches (im2col), both operands in channels_last layout.
    x (B, C, H, W), grad (B, O, H', W') -> (O, C, kh, kw), channels_last."""
    kh, kw = kernel
    sh, sw = stride
    rows = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view, contiguous for channels_last x
    grads = grad.permute(0, 2, 3, 1)  # (B, H', W', O)
    batch, out_h, out_w, out_c = grads.shape
    channels = rows.shape[-1]
    sb, s_h, s_w, sc = rows.stride()
    total = x.new_zeros(kh * kw * channels, out_c)
    for b in range(batch):  # one utterance's patches at a time bounds the copy (~44 MB)
        patches = rows.as_strided(
            (out_h, out_w, kh, kw, channels),
            (sh * s_h, sw * s_w, s_h, s_w, sc),
            rows.storage_offset() + b * sb,
        ).reshape(out_h * out_w, kh * kw * channels)
        total.addmm_(patches.t(), grads[b].reshape(out_h * out_w, out_c))
    weight = total.view(kh, kw, channels, out_c).permute(3, 2, 0, 1)
    return weight.contiguous(memory_format=torch.channels_last)


class _StridedConv2d(torch.autograd.Function):
    """conv2d (no padding) whose backward computes the weight gradient by im2col.

    oneDNN's own fp32 weight gradient in channels_last is slow for wide inputs on the
    CPUs here: for the 256-to-256 3x3 stride-2 conv over 8 x 10 s it takes 1.0 s,
    against 0.37 s as one matrix product per utterance. Whole fwd + bwd, this path
    against nn.Conv2d: 256 channels 0.86 / 1.21 s, 144 0.26 / 0.34 s, 64 68 / 84 ms;
    but 32 channels 17 / 14 ms and a 1-channel input 190 / 146 ms, where the product
    is too thin, so `strided_conv2d` takes it from 64 input channels. Forward and the
    input gradient stay with oneDNN, which is fast in that layout. Under bf16 autocast
    oneDNN's own backward is as fast as this one (measured), so autocast keeps
    nn.Conv2d.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            (grad_x, _, _) = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ctx.stride, [0, 0], [1, 1], False, [0, 0], 1,
                [True, False, False],
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_w = _conv2d_weight_grad(x, grad, tuple(weight.shape[2:]), ctx.stride)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def strided_conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)` for an unpadded, undilated, ungrouped conv2d with channels_last
    input and weight; on CPU in fp32 with gradients, from 64 input channels, through
    `_StridedConv2d`."""
    if (
        conv.in_channels >= 64
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and (x.requires_grad or conv.weight.requires_grad)
    ):
        return _StridedConv2d.apply(x, conv.weight, conv.bias, list(conv.stride))
    return conv(x)


def _onednn_linear_op():
    """torch's oneDNN linear on dense tensors (the op Inductor's CPU code calls), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear_op()


class _OneDnnLinear(torch.autograd.Function):
    """fp32 linear whose forward and input gradient run in oneDNN, weight gradient in BLAS.

    On the AMD EPYC machines here, for the encoder's shapes (1992 x 256 by 256 x 1024
    and the like), oneDNN's products are 1.15-1.4x faster than MKL's for the forward
    and the input gradient, and slower for the weight gradient (x^T g), which stays
    with torch.mm (benchmarks/encoder.py --profile). Same maths; rounding differs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that runs fp32 on CPU through oneDNN
    (`_OneDnnLinear`); under autocast, export, torch.compile or on other devices it
    is nn.Linear's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _ONEDNN_LINEAR is None
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
            or _exporting()
        ):
            return F.linear(x, self.weight, self.bias)
        # The Function sees 2-D tensors: a view made inside it could not be modified
        # in place (the in-place dropouts after Linear do that).
        rows = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return rows.view(*x.shape[:-1], rows.shape[-1])


class FeedForward(nn.Module):
    """Linear -> activation -> dropout -> Linear. (B, T, D) -> (B, T, D)."""

    def __init__(
        self, d_model: int, hidden: int, dropout: float, activation: Literal["swish", "relu"]
    ) -> None:
        super().__init__()
        self.w1 = Linear(d_model, hidden)
        self.w2 = Linear(hidden, d_model)
        self.activation = nn.SiLU() if activation == "swish" else nn.ReLU()
        # SiLU's backward reads its input, ReLU's its output: only SiLU allows in place.
        self.dropout = Dropout(dropout, inplace=activation == "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise (as Linear) -> GLU -> depthwise conv ->
    norm -> swish -> pointwise. Padded frames are zeroed before the depthwise conv so
    they never leak into real ones. (B, T, D) -> (B, T, D)."""

    def __init__(
        self, d_model: int, kernel: int, norm: Literal["batch_norm", "layer_norm"]
    ) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (symmetric context), got {kernel}")
        self.pointwise_in = Linear(d_model, 2 * d_model)
        # Before BatchNorm a bias is removed again by the mean subtraction (zero gradient).
        self.depthwise = nn.Conv1d(
            d_model, d_model, kernel, padding=kernel // 2, groups=d_model, bias=norm != "batch_norm"
        )
        self.norm = nn.BatchNorm1d(d_model) if norm == "batch_norm" else nn.LayerNorm(d_model)
        self.pointwise_out = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pointwise_in(x), dim=-1)
        x = x.masked_fill(~valid[..., None], 0.0)
        x = self.depthwise(x.transpose(1, 2))  # (B, D, T)
        if isinstance(self.norm, nn.BatchNorm1d):
            x = self.norm(x).transpose(1, 2)
        else:
            x = self.norm(x.transpose(1, 2))
        return self.pointwise_out(F.silu(x))


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly negative) positions: (P,) -> (P, dim)."""
    inv = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
        * (-math.log(10000.0) / dim)
    )
    angles = positions.float()[:, None] * inv[None, :]
    out = torch.empty(positions.shape[0], dim, device=positions.device)
    out[:, 0::2] = torch.sin(angles)
    out[:, 1::2] = torch.cos(angles)
    return out


class RelativePositions(nn.Module):
    """Embeddings of relative distances T-1, T-2, ..., -(T-1): (2T-1, D), for rel_pos attention."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.dropout = Dropout(dropout)

    def forward(self, frames: int, device: torch.device) -> torch.Tensor:
        distances = torch.arange(frames - 1, -frames, -1, device=device)
        return self.dropout(sinusoids(distances, self.d_model))


def rotary_tables(
    frames: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary position embeddings: (T, K/2) each."""
    inv = 1.0 / (
        10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    angles = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, K) by position (rotate-half form)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) position scores -> (B, H, T, T), entry [i, j] taken from column
    (T-1) - (i - j), i.e. relative distance i - j. A strided view: no copy. Exporters
    have no as_strided, so under export the same result comes from Transformer-XL's
    pad-and-reshape."""
    if _exporting():
        return rel_shift_padded(scores)
    batch, heads, frames, _ = scores.shape
    s0, s1, s2, s3 = scores.stride()
    return scores.as_strided(
        (batch, heads, frames, frames),
        (s0, s1, s2 - s3, s3),
        storage_offset=scores.storage_offset() + (frames - 1) * s3,
    )


def rel_shift_padded(scores: torch.Tensor) -> torch.Tensor:
    """rel_shift by padding one column, reading the buffer as (2T, T) rows and dropping
    the first: the same values, through copies every exporter understands."""
    batch, heads, frames, width = scores.shape
    padded = F.pad(scores, (1, 0)).view(batch, heads, width + 1, frames)
    return padded[:, :, 1:].reshape(batch, heads, frames, width)[..., :frames]


class MultiHeadAttention(nn.Module):
    """Multi-head attention through torch's scaled_dot_product_attention.

    positional:
      "none"    plain attention (positions added to the input, or cross-attention)
      "rel_pos" Transformer-XL relative positions with biases u and v (the Conformer
                paper's): content scores go through SDPA, the position term
                (q + v) p^T, shifted to relative distances, enters as its additive mask
      "rope"    rotary embeddings folded into q and k: no extra term at all
    """

    def __init__(
        self, d_model: int, num_heads: int, dropout: float, positional: Positional = "none"
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.positional = positional
        self.dropout = dropout
        self.query = Linear(d_model, d_model)
        # No bias on keys: softmax ignores it (its gradient is exactly zero), and Adam
        # would only amplify rounding noise into it.
        self.key = Linear(d_model, d_model, bias=False)
        self.value = Linear(d_model, d_model)
        self.out = Linear(d_model, d_model)
        if positional == "rel_pos":
            self.position = Linear(d_model, d_model, bias=False)
            self.bias_u = nn.Parameter(torch.zeros(num_heads, self.head_dim))
            self.bias_v = nn.Parameter(torch.zeros(num_heads, self.head_dim))
            nn.init.xavier_uniform_(self.bias_u)
            nn.init.xavier_uniform_(self.bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape
        return x.view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """query (B, Tq, D), key/value (B, Tk, D); mask: bool, True = may attend,
        broadcastable to (B, H, Tq, Tk); positions: (2T-1, D) for rel_pos, or the
        (cos, sin) rotary tables for rope. Returns (B, Tq, D)."""
        q, k, v = (
            self._heads(self.query(query)),
            self._heads(self.key(key)),
            self._heads(self.value(value)),
        )
        scale = 1.0 / math.sqrt(self.head_dim)
        attn_mask = mask
        if self.positional == "rel_pos":
            batch, heads, frames, _ = q.shape
            p = (
                self.position(positions).view(-1, heads, self.head_dim).transpose(0, 1)
            )  # (H, 2T-1, K)
            position_scores = torch.matmul((q + self.bias_v[:, None]) * scale, p.transpose(1, 2))
            attn_mask = rel_shift(position_scores)
            if mask is not None:
                attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
            else:
                attn_mask = attn_mask.contiguous()
            q = q + self.bias_u[:, None]
        elif self.positional == "rope":
            cos, sin = positions
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=scale,
        )
        batch, _, frames, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(batch, frames, -1))
