"""cutlass_moe: the fused Mixture-of-Experts layer, compiled ahead of time with CUTLASS.

A drop-in for FlashInfer's ``cutlass_fused_moe``::

    from cutlass_moe import cutlass_fused_moe, ActivationType
    out = cutlass_fused_moe(x, topk_ids, topk_weights, w31, w2, x.dtype)[0]

Int8 weight-only (W8A16), quantised once at load time with :mod:`cutlass_moe.quantization`::

    q31, q2, scales = quantize_moe_weights_int8(w31, w2)
    out = cutlass_fused_moe(x, topk_ids, topk_weights, q31, q2, x.dtype, quant_scales=scales,
                            use_int8_woq_per_channel=True)[0]

Int4 group-wise weight-only (W4A16), quantised once with :mod:`cutlass_moe.int4` (or converted
from GPTQ/AWQ/compressed-tensors checkpoints with :func:`load_int4_experts`)::

    p31, p2, scales = quantize_moe_weights_int4(w31, w2, group_size=128)
    out = cutlass_fused_moe(x, topk_ids, topk_weights, p31, p2, x.dtype, quant_scales=scales,
                            use_w4_group_scaling=True)[0]

Importing this package makes no CUDA call and works without a GPU or a built extension; the op
then raises a ``RuntimeError`` that says what is missing.
"""

from __future__ import annotations

from . import quantization
from ._ext import build_info
from ._version import __version__
from .activation import ActivationType
from .autotuner import autotune, clear_tuning_cache, load_tuning_cache, save_tuning_cache
from .int4 import (
    dequantize_int4,
    pack_int4,
    quantize_int4_groupwise,
    quantize_moe_weights_int4,
    unpack_int4,
)
from .int4_checkpoints import load_int4_experts
from .ops import cutlass_fused_moe
from .quantization import quantize_moe_weights_int8
from .reference import reference_moe
from .weights import swap_w13_to_w31

__all__ = [
    "ActivationType",
    "__version__",
    "autotune",
    "build_info",
    "clear_tuning_cache",
    "cutlass_fused_moe",
    "dequantize_int4",
    "load_int4_experts",
    "load_tuning_cache",
    "pack_int4",
    "quantization",
    "quantize_int4_groupwise",
    "quantize_moe_weights_int4",
    "quantize_moe_weights_int8",
    "reference_moe",
    "save_tuning_cache",
    "swap_w13_to_w31",
    "unpack_int4",
]
