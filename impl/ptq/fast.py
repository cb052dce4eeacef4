"""GPTQ in the paper's fast form (Frantar et al., 2022, section 4 and Algorithm 1): the same result as
``impl.ptq.naive`` (the explicit inverse updated per column) with two changes:

- Cholesky reformulation: the row of the updated inverse Hessian that column ``i`` needs is, up to a
  factor ``1/sqrt(d)``, row ``i`` of the upper Cholesky factor ``U`` of ``H^-1`` (computed once), so no
  inverse is updated at all: ``err = (w_i - q_i) / U[i, i]``, ``W[:, j] -= err * U[i, j]``;
- lazy batches: inside a block of ``BLOCK`` columns the updates touch only the block; the columns after
  it get the block's whole error in one matrix product ``W[:, i2:] -= Err @ U[i1:i2, i2:]``
  (the work is the same, but done as a GEMM instead of ``in`` rank-1 updates of the whole matrix).
"""

from __future__ import annotations

import torch

from impl.ptq.gptq import Codes, column_groups, finish, group_params, prepare, round_column, solve_layer
from impl.ptq.quant import Scheme

BLOCK = 128  # columns per lazy batch (the paper's B)


@torch.no_grad()
def gptq_fast(weight: torch.Tensor, H: torch.Tensor, scheme: Scheme, act_order: bool = False,
              block: int = BLOCK) -> Codes:
    """GPTQ codes of ``weight`` (out, in) for the Hessian ``H`` (in, in) of its inputs: (q (out, in),
    scale (out, groups) fp32, zero (out, groups) fp32), equal to ``gptq_naive``'s up to float error."""
    W, H, perm = prepare(weight, H, act_order)
    out, n = W.shape
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U
    groups = column_groups(scheme, n, perm)
    scale = torch.full((out, scheme.groups(n)), float("nan"), dtype=W.dtype)
    zero = torch.full_like(scale, float("nan"))
    Q = torch.empty(out, n, dtype=scheme.storage)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()  # the block, updated eagerly
        Err = torch.zeros_like(W1)  # each column's scaled error, for the lazy update of the rest
        for k in range(i2 - i1):
            i = i1 + k
            g = int(groups[i])
            if torch.isnan(scale[0, g]):
                # a group's grid needs its current weights: columns past the block still owe the
                # block's pending updates of the columns done so far
                cols = torch.nonzero(groups == g)[:, 0]
                inside, past = cols[cols < i2], cols[cols >= i2]
                current = torch.empty(out, len(cols), dtype=W.dtype)
                current[:, : len(inside)] = W1[:, inside - i1]
                current[:, len(inside):] = W[:, past] - Err[:, :k] @ U[i1:i, past]
                scale[:, g], zero[:, g] = group_params(current, scheme)
            Q[:, i], dq = round_column(W1[:, k], scale[:, g], zero[:, g], scheme)
            err = (W1[:, k] - dq) / U[i, i]
            W1[:, k:] -= err[:, None] * U[i, i:i2][None, :]
            Err[:, k] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]  # lazy batch update: one GEMM for the whole block
    return finish(Q, scale, zero, perm)


def gptq_layer(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               act_order: bool) -> dict[str, torch.Tensor]:
    """``gptq_fast`` on the Hessian of ``inputs`` (n, in): codes, scale, zero and the dequantized weight."""
    return solve_layer(gptq_fast, weight, inputs, bits, group_size, symmetric, act_order)
