"""torchao's QAT weight fake quantizer (``torchao.quantization.qat.IntxFakeQuantizer``), configured like ours.

The peer of ``impl.qat``'s forward. Configurations that match ours: symmetric integer grids
(``-2^(b-1) .. 2^(b-1)-1``, scale = absmax / ((qmax - qmin) / 2)), per group (``PerGroup(g)``) or per
output channel (``PerAxis(0)``), dynamic scales from the weight itself, fp32 scales, and the smallest
scale set to float32's machine epsilon (torchao's default floor is the dtype's smallest normal;
ours is ``finfo(float32).eps``: the ``eps`` argument makes them the same).

Not matched, so not compared: torchao's asymmetric weight grid in QAT uses tinygemm's convention (a
float zero point anchored at the minimum, zero not exactly on the grid), ours keeps 0 exact with
an integer zero point.

One arithmetic difference remains and the check allows for it: torchao quantizes with
``x * (1 / scale)``, ours with ``x / scale``; where those two fp32 numbers differ, a value within
a rounding error of a half step may land on the neighbouring code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where used: torchao's import logs about its CUDA kernels on every CPU machine
    from torchao.quantization.qat import IntxFakeQuantizer

_INT_DTYPES = {2: torch.int2, 3: torch.int3, 4: torch.int4, 5: torch.int5, 6: torch.int6, 7: torch.int7, 8: torch.int8}


def fake_quantizer(bits: int, group_size: int | None, symmetric: bool = True) -> IntxFakeQuantizer:
    """torchao's fake quantizer for a (out, in) weight: ``bits`` wide, per group of ``group_size`` along
    the input dimension (None: per output channel), symmetric."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    if not symmetric:
        raise ValueError("torchao's asymmetric QAT grid (tinygemm's float zero point) is not ours; compare "
                         "symmetric configurations only")
    granularity = "per_channel" if group_size is None else "per_group"
    config = IntxFakeQuantizeConfig(_INT_DTYPES[bits], granularity, group_size=group_size, is_symmetric=True,
                                    eps=torch.finfo(torch.float32).eps)
    return IntxFakeQuantizer(config)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int | None,
                  symmetric: bool = True) -> dict[str, torch.Tensor]:
    """{"out": torchao's fake-quantized ``x`` (rows, cols), "scale": its scales (rows, n_groups)}."""
    quantizer = fake_quantizer(bits, group_size, symmetric)
    with torch.no_grad():
        out = quantizer(x)
    return {"out": out, "scale": quantizer.scale.reshape(x.shape[0], -1).float()}
