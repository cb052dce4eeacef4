"""GPTQ (Frantar et al., 2022): what the naive and fast solvers share, and the model-level pass.

One layer: weights ``W`` (out, in) and the Hessian of the layer's reconstruction loss
``||X W^T - X Q^T||^2`` over its calibration inputs ``X`` (n, in), ``H = 2 X^T X / n`` (in, in).
Columns are quantized one at a time; the error of each quantized column is spread over the columns
not yet quantized, weighted by the inverse Hessian (the Optimal Brain Surgeon update), so later columns
compensate for earlier rounding. ``naive.py`` does it with the explicit inverse, updated after every
column; ``fast.py`` with the paper's Cholesky rows and lazy block updates. Both:

- damp ``H`` by 1% of its mean diagonal (``DAMP``) and treat a column no input ever touches (a zero
  diagonal) as dead: its weight is 0 and its diagonal 1, as the paper's code does;
- act-order: process columns by decreasing ``diag(H)`` (largest inputs first) and return the codes in
  the original column order;
- group scales: groups are runs of ``group_size`` columns in the ORIGINAL order (the storage format of
  ``impl.ptq.quant``); a group's scale and zero point come from the group's current weights (already
  corrected by the columns quantized before it) at the moment its first column is quantized. Without
  act-order that is the paper's rule; with act-order it generalizes it to groups whose columns are
  spread over the processing order. Per-channel (no groups) takes the whole row's range at the start.

``gptq_model`` runs the GPT block by block: each block's Hessians are taken on the outputs of the blocks
already quantized (the paper's sequential pass), all linears of one block from one pass over it (the block
itself still in full precision: not the reference code's "true sequential" sub-order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from impl.ptq.calibration import block_by_block
from impl.ptq.quant import Scheme, dequantize, qparams, quantize, quantize_dequantize

DAMP = 0.01  # fraction of the mean diagonal added to H (the paper's percdamp)
Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (q (out, in), scale (out, groups), zero (out, groups))


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` (in, in) in float64 of the inputs ``X`` (..., in) a layer saw."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2 * x.T @ x / x.shape[0]


class HessianAccumulator:
    """Running ``2 X^T X / n`` over batches of a layer's inputs (float64), for calibration passes."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch ``x`` (..., in)."""
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m)).add_(2 * x.T @ x / (self.n + m))
        self.n += m


def prepare(weight: torch.Tensor, H: torch.Tensor, act_order: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, H, perm): W in compute precision (at least fp32) with dead columns zeroed, H damped with dead
    diagonals set to 1, both with columns in processing order ``perm``."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = H.detach().to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=dtype)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    return W[:, perm], H[perm][:, perm], perm


def column_groups(scheme: Scheme, n: int, perm: torch.Tensor) -> torch.Tensor:
    """The group (in the original order) of each column in processing order (n,) long."""
    scheme.groups(n)  # a row that does not split into groups is an error here, not a silent misfit
    return perm // (scheme.group_size or n)


def row_scheme(scheme: Scheme) -> Scheme:
    """The same grid with one group per row: how one column or one group's slice is quantized."""
    return Scheme(scheme.bits, None, scheme.symmetric)


def group_params(values: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (out,), of a group's current weights ``values`` (out, group columns)."""
    scale, zero = qparams(values, row_scheme(scheme))
    return scale[:, 0], zero[:, 0]


def round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out,), dequantized (out,) in ``w``'s dtype) of one column ``w`` (out,) on its group's grid."""
    s = row_scheme(scheme)
    q = quantize(w[:, None], scale[:, None], zero[:, None], s)
    return q[:, 0], dequantize(q, scale[:, None], zero[:, None], s, w.dtype)[:, 0]


def finish(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, perm: torch.Tensor) -> Codes:
    """Codes back in the original column order: (q (out, in), scale (out, groups), zero (out, groups))."""
    q = torch.empty_like(Q)
    q[:, perm] = Q
    return q, scale.float(), zero.float()


def reconstruction_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """``||X W^T - X A^T||^2 / n`` from the undamped ``H = 2 X^T X / n``: ``tr(D H D^T) / 2``, D = W - A."""
    D = (weight.double() - approx.double())
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D) / 2)


Solver = Callable[..., Codes]


def _quantize_layers(layers: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator], scheme: Scheme,
                     solver: Solver, act_order: bool, prefix: str, out: dict[str, Codes],
                     errors: dict[str, dict[str, float]] | None) -> None:
    """GPTQ every layer of ``layers`` on its Hessian, store its codes under ``prefix + name`` and put its
    dequantized weight in place (so later blocks see the quantized layer's outputs)."""
    for name, layer in layers.items():
        H = hessians[name].H
        q, scale, zero = solver(layer.weight.data, H, scheme, act_order=act_order)
        approx = dequantize(q, scale, zero, scheme, layer.weight.dtype)
        if errors is not None:
            errors[prefix + name] = {
                "gptq": reconstruction_error(layer.weight.data, approx, H),
                "rtn": reconstruction_error(layer.weight.data, quantize_dequantize(layer.weight.data, scheme), H),
            }
        layer.weight.data = approx.to(layer.weight.device)
        out[prefix + name] = (q, scale, zero)


@torch.no_grad()
def gptq_model(model: nn.Module, calib_batches: torch.Tensor, scheme: Scheme, act_order: bool = False,
               lm_head: bool = False, targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"),
               solver: Solver | None = None, batch_size: int = 16,
               errors: dict[str, dict[str, float]] | None = None) -> dict[str, Codes]:
    """GPTQ codes ``{module name: (q, scale, zero)}`` for every block linear of a GPT (and its LM head when
    ``lm_head``), for ``impl.ptq.modules.quantize_model(model, scheme, lm_head=..., weights=...)``.

    ``calib_batches`` (n_samples, seq_len) token ids. Blocks are quantized in order, each on the inputs the
    already-quantized blocks produce. ``model`` is not modified (a copy is). ``solver`` defaults to
    ``impl.ptq.fast.gptq_fast``. When ``errors`` is a dict it receives, per layer, the reconstruction error on
    its calibration inputs of GPTQ's weights and of round-to-nearest's."""
    if solver is None:
        from impl.ptq.fast import gptq_fast as solver
    out: dict[str, Codes] = {}
    for prefix, layers, hessians in block_by_block(model, calib_batches, lambda m: HessianAccumulator(m.in_features),
                                                   targets, lm_head, batch_size):
        _quantize_layers(layers, hessians, scheme, solver, act_order, prefix, out, errors)
    return out


def solve_layer(solver: Solver, weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int | None,
                symmetric: bool, act_order: bool) -> dict[str, torch.Tensor]:
    """One layer through ``solver`` on the Hessian of ``inputs`` (n, in): ``codes`` (out, in) and ``scale``,
    ``zero`` (out, groups) as ``solver`` gives them, and the dequantized ``weight`` in ``weight``'s dtype."""
    scheme = Scheme(bits, group_size, symmetric)
    q, scale, zero = solver(weight, hessian(inputs), scheme, act_order=act_order)
    return {"codes": q, "scale": scale, "zero": zero, "weight": dequantize(q, scale, zero, scheme, weight.dtype)}
