"""Fused Triton kernels for the elementwise and row-wise ops of the GPT: one pass over memory each.

Each kernel reads its inputs once, keeps every intermediate in registers in float32, and writes
its outputs once, where eager PyTorch launches one kernel (and one round trip to memory) per step
of ``naive.py``:

- ``bias_gelu``: ``gelu(x + bias)`` (tanh form by default), 1-D blocks over the flat tensor;
  the bias column of element i is ``i % C``.
- ``layer_norm`` / ``add_layer_norm``: one program per row, the whole row in registers (C <= 64K);
  the residual sum ``s = x + residual`` is written out and normalized in the same pass. The row's
  mean and 1/std are saved for the backward.
- ``scaled_masked_softmax``: one program per row of scores: scale, causal mask (bottom-right),
  max, exp, sum, divide without leaving registers.

Backwards are Triton kernels too: GELU's derivative elementwise (the bias gradient is a column sum
done by torch); LayerNorm's ``dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))`` per row,
with each program accumulating the dweight / dbias partial sums of its group of rows (torch sums
the few partials); softmax's ``dz = scale * y * (dy - sum(dy * y))`` per row.

Details that bite: the masked lanes of a row padded to a power of two must not enter the mean or
the variance (they are zeroed with ``tl.where``), nor the softmax sum (they load as -inf); tanh is
built from ``exp`` (no ``tl.math.tanh`` in every Triton version), in a form that saturates to +-1
instead of overflowing. In the CPU interpreter (TRITON_INTERPRET=1) float32 -> bf16 stores
truncate where a GPU rounds to nearest even, so there the kernels write float32 and torch rounds
(``store_dtype``), as in ``impl/flash_attention/triton.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from impl.operator_fusion.naive import gradient_fns

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ELEMENTWISE_BLOCK = 1024
ROWS_PER_PROGRAM = 32  # rows each LayerNorm backward program walks, accumulating dweight / dbias
MAX_ROW = 65536  # one row lives in registers


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): exp overflows to inf for large u and the result saturates to 1
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_and_grad(u, TANH: tl.constexpr):
    """(gelu(u), gelu'(u)) in float32, tanh or erf form."""
    if TANH:
        k = 0.7978845608028654  # sqrt(2 / pi)
        t = _tanh(k * (u + 0.044715 * u * u * u))
        y = 0.5 * u * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * u * u)
    else:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        y = u * cdf
        dy = cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)  # pdf = exp(-u^2 / 2) / sqrt(2 pi)
    return y, dy


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, n, C, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(B + offs % C, mask=mask).to(tl.float32)
    y, _ = _gelu_and_grad(u, TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(X, B, DY, DX, n, C, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(B + offs % C, mask=mask).to(tl.float32)
    _, grad = _gelu_and_grad(u, TANH)  # recomputed: nothing but x is saved for the backward
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (dy * grad).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, C, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # s = x + residual, written once, normalized without a second read
        x += tl.load(R + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(S + row * C + cols, x.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(x, 0) / C
    d = tl.where(mask, x - mean, 0.0)  # padding lanes would add mean^2 each to the variance
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / C + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * C + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(S, W, DY, DS, MEAN, RSTD, DX, DW_PART, DB_PART, N, C, rows_per_program,
                           HAS_DS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # int64 bounds: the loop variable indexes in int64 too
    for row in range(first, tl.minimum(first + rows_per_program, N)):
        x = tl.load(S + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        wdy = w * dy
        dx = (wdy - xhat * (tl.sum(wdy * xhat, 0) / C) - tl.sum(wdy, 0) / C) * rstd
        if HAS_DS:  # the residual stream's own gradient joins the normed output's
            dx += tl.load(DS + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * C + cols, dw, mask=mask)
    tl.store(DB_PART + pid * C + cols, db, mask=mask)


@triton.jit
def _softmax_fwd_kernel(X, Y, T, S, kv_offset, scale, CAUSAL: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row r of the flat (rows, S) scores is query r % T of its head
    cols = tl.arange(0, BLOCK_S)
    z = tl.load(X + row * S + cols, mask=cols < S, other=float("-inf")).to(tl.float32) * scale
    if CAUSAL:  # bottom-right: query t is position kv_offset + t of the keys
        z = tl.where(cols <= (row % T) + kv_offset, z, float("-inf"))
    e = tl.exp(z - tl.max(z, 0))  # the diagonal key is always visible: the max is finite
    tl.store(Y + row * S + cols, (e / tl.sum(e, 0)).to(Y.dtype.element_ty), mask=cols < S)


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, S, scale, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_S)
    y = tl.load(Y + row * S + cols, mask=cols < S, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * S + cols, mask=cols < S, other=0.0).to(tl.float32)
    dx = scale * y * (dy - tl.sum(dy * y, 0))
    tl.store(DX + row * S + cols, dx.to(DX.dtype.element_ty), mask=cols < S)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the kernels write: float32 in the interpreter (whose downcasts truncate), else ``dtype``."""
    return torch.float32 if INTERPRET and dtype in (torch.bfloat16, torch.float16) else dtype


def _require_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or INTERPRET):
        raise ValueError("the Triton fused kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
                         "before triton is first imported (the tests do this in tests/conftest.py)")


def _empty(shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An output buffer for ``like``'s dtype, NaN so a lane the kernel failed to write shows."""
    return torch.full(shape, float("nan"), dtype=store_dtype(like.dtype), device=like.device)


def _row_block(C: int) -> int:
    if C > MAX_ROW:
        raise ValueError(f"rows of {C} elements do not fit one program's registers (at most {MAX_ROW})")
    return triton.next_power_of_2(C)


def _row_warps(block: int) -> int:
    """Warps for a program that holds a row of ``block`` elements: ~8-16 elements per thread."""
    return 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


# ------------------------------------------------------------------ launchers (2-D, contiguous)


def _bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    """gelu(x + bias) for a contiguous x (N, C)."""
    _require_device(x)
    y = _empty(x.shape, x)
    n = x.numel()
    _bias_gelu_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](x, bias, y, n, bias.numel(), TANH=tanh,
                                                                BLOCK=ELEMENTWISE_BLOCK)
    return y.to(x.dtype)


def _bias_gelu_backward(x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor,
                        tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias) of gelu(x + bias) for x, dy (N, C)."""
    dx = _empty(x.shape, x)
    n = x.numel()
    _bias_gelu_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](x, bias, dy.contiguous(), dx, n, bias.numel(),
                                                                TANH=tanh, BLOCK=ELEMENTWISE_BLOCK)
    return dx.to(x.dtype), dx.float().sum(0).to(bias.dtype)


def _layer_norm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, mean, rstd) for contiguous x, residual (N, C): s = x + residual (x itself without one),
    y = LayerNorm(s); mean and rstd (N,) float32."""
    _require_device(x)
    N, C = x.shape
    y = _empty(x.shape, x)
    s = _empty(x.shape, x) if residual is not None else x
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block = _row_block(C)
    _layer_norm_fwd_kernel[(N,)](x, residual if residual is not None else x, s, weight, bias, y, mean, rstd, C, eps,
                                 HAS_RESIDUAL=residual is not None, BLOCK_C=block, num_warps=_row_warps(block))
    return y.to(x.dtype), s.to(x.dtype), mean, rstd


def _layer_norm_backward(s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         dy: torch.Tensor, ds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of LayerNorm at the normalized input s (N, C); ``ds`` (the gradient of s
    itself, for add_layer_norm) is added to dx."""
    N, C = s.shape
    programs = triton.cdiv(N, ROWS_PER_PROGRAM)
    dx = _empty(s.shape, s)
    dw_part = torch.zeros(programs, C, dtype=torch.float32, device=s.device)
    db_part = torch.zeros(programs, C, dtype=torch.float32, device=s.device)
    block = _row_block(C)
    _layer_norm_bwd_kernel[(programs,)](s, weight, dy.contiguous(), ds.contiguous() if ds is not None else dy, mean,
                                        rstd, dx, dw_part, db_part, N, C, ROWS_PER_PROGRAM, HAS_DS=ds is not None,
                                        BLOCK_C=block, num_warps=_row_warps(block))
    return dx.to(s.dtype), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def _softmax_forward(scores: torch.Tensor, T: int, kv_offset: int, scale: float, causal: bool) -> torch.Tensor:
    """Row softmax of contiguous scores (rows, S), rows = (...) * T queries, causal from ``kv_offset``."""
    _require_device(scores)
    rows, S = scores.shape
    y = _empty(scores.shape, scores)
    block = _row_block(S)
    _softmax_fwd_kernel[(rows,)](scores, y, T, S, kv_offset, scale, CAUSAL=causal, BLOCK_S=block,
                                 num_warps=_row_warps(block))
    return y.to(scores.dtype)


def _softmax_backward(y: torch.Tensor, dy: torch.Tensor, scale: float) -> torch.Tensor:
    """d(scores) (rows, S) of the scaled softmax whose output was y."""
    rows, S = y.shape
    dx = _empty(y.shape, y)
    block = _row_block(S)
    _softmax_bwd_kernel[(rows,)](y, dy.contiguous(), dx, S, scale, BLOCK_S=block, num_warps=_row_warps(block))
    return dx.to(y.dtype)


# ------------------------------------------------------------------ autograd functions


def _tanh_form(approximate: str) -> bool:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return approximate == "tanh"


class BiasGELU(torch.autograd.Function):
    """gelu(x + bias): Triton forward, Triton backward recomputing gelu' from x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, bias)
        ctx.tanh = _tanh_form(approximate)
        return _bias_gelu_forward(x2, bias.contiguous(), ctx.tanh).view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        x2, bias = ctx.saved_tensors
        dx, db = _bias_gelu_backward(x2, bias, dy.reshape(x2.shape), ctx.tanh)
        return dx.view(dy.shape), db, None


class LayerNorm(torch.autograd.Function):
    """LayerNorm(x) over the last dim, Triton forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, _, mean, rstd = _layer_norm_forward(x2, None, weight.contiguous(), bias.contiguous(), eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_backward(x2, weight, mean, rstd, dy.reshape(x2.shape), None)
        return dx.view(dy.shape), dw, db, None


class AddLayerNorm(torch.autograd.Function):
    """(s, LayerNorm(s)) with s = x + residual, Triton forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        C = x.shape[-1]
        y, s, mean, rstd = _layer_norm_forward(x.reshape(-1, C).contiguous(), residual.reshape(-1, C).contiguous(),
                                               weight.contiguous(), bias.contiguous(), eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds: torch.Tensor, dy: torch.Tensor) -> tuple:
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_backward(s, weight, mean, rstd, dy.reshape(s.shape), ds.reshape(s.shape))
        dx = dx.view(dy.shape)
        return dx, dx, dw, db, None  # s = x + residual: both get the same gradient


class ScaledMaskedSoftmax(torch.autograd.Function):
    """softmax(scale * scores) with the causal mask, Triton forward and backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
        T, S = scores.shape[-2:]
        y = _softmax_forward(scores.reshape(-1, S).contiguous(), T, S - T, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y.view(scores.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        (y,) = ctx.saved_tensors
        return _softmax_backward(y, dy.reshape(y.shape), ctx.scale).view(dy.shape), None, None


# ------------------------------------------------------------------ the public ops (naive.py's signatures)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(x + bias)`` in one kernel: x (..., C), bias (C,) -> (..., C); differentiable."""
    return BiasGELU.apply(x, bias, approximate)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (..., C) in one kernel; differentiable."""
    return LayerNorm.apply(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LayerNorm(s)) with s = x + residual, in one kernel; differentiable."""
    return AddLayerNorm.apply(x, residual, weight, bias, eps)


def scaled_masked_softmax(scores: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(scale * scores) over keys of scores (..., T, S), causal bottom-right, in one kernel."""
    return ScaledMaskedSoftmax.apply(scores, scale, causal)


# through the hand-written Triton backward kernels
bias_gelu_grads, layer_norm_grads, add_layer_norm_grads, softmax_grads = gradient_fns(
    bias_gelu, layer_norm, add_layer_norm, scaled_masked_softmax)
