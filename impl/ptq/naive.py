"""GPTQ as the paper states it (Frantar et al., 2022, eqs. 2-3): one column at a time, the explicit
inverse Hessian updated after every column. Shared pieces (damping, act-order, group scales) are in
``impl.ptq.gptq``; ``impl.ptq.fast`` is the same algorithm in the paper's Cholesky / lazy-batch form.

For column ``i`` (processing order) with ``d = Hinv[i, i]``:
    q_i   = round(w_i)                                 on its group's grid
    err   = (w_i - q_i) / d                            (out,)
    W[:, j] -= err * Hinv[i, j]   for every later j    the OBS update: later columns absorb the error
    Hinv  -= Hinv[:, i] Hinv[i, :] / d                 remove column i from the inverse (eq. 3)
"""

from __future__ import annotations

import torch

from impl.ptq.gptq import Codes, column_groups, finish, group_params, prepare, round_column, solve_layer
from impl.ptq.quant import Scheme


@torch.no_grad()
def gptq_naive(weight: torch.Tensor, H: torch.Tensor, scheme: Scheme, act_order: bool = False) -> Codes:
    """GPTQ codes of ``weight`` (out, in) for the Hessian ``H`` (in, in) of its inputs (``gptq.hessian``):
    (q (out, in) in ``scheme.storage``, scale (out, groups) fp32, zero (out, groups) fp32)."""
    W, H, perm = prepare(weight, H, act_order)
    out, n = W.shape
    Hinv = torch.linalg.inv(H)
    groups = column_groups(scheme, n, perm)
    scale = torch.full((out, scheme.groups(n)), float("nan"), dtype=W.dtype)
    zero = torch.full_like(scale, float("nan"))
    Q = torch.empty(out, n, dtype=scheme.storage)
    for i in range(n):
        g = int(groups[i])
        if torch.isnan(scale[0, g]):  # the group's first column: its grid from its current weights
            scale[:, g], zero[:, g] = group_params(W[:, groups == g], scheme)
        Q[:, i], dq = round_column(W[:, i], scale[:, g], zero[:, g], scheme)
        d = Hinv[i, i]
        err = (W[:, i] - dq) / d
        W[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None, :]
        W[:, i] = dq
        Hinv -= Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / d
    return finish(Q, scale, zero, perm)


def gptq_layer(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               act_order: bool) -> dict[str, torch.Tensor]:
    """``gptq_naive`` on the Hessian of ``inputs`` (n, in): codes, scale, zero and the dequantized weight."""
    return solve_layer(gptq_naive, weight, inputs, bits, group_size, symmetric, act_order)
