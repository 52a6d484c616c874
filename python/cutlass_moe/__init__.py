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

FP8 (e4m3) and MXFP4 weight-only, quantised once with :mod:`cutlass_moe.fp8` /
:mod:`cutlass_moe.mxfp4` (or converted from checkpoints with :func:`load_fp8_experts` /
:func:`load_mxfp4_experts`; DeepSeek-style 128x128 block scales with
:func:`expand_block_scales`)::

    q31, q2, scales = quantize_moe_weights_fp8(w31, w2, group_size=128)
    out = cutlass_fused_moe(x, topk_ids, topk_weights, q31, q2, x.dtype, quant_scales=scales,
                            use_fp8_woq_group_scaling=True)[0]
    p31, p2, scales = quantize_moe_weights_mxfp4(w31, w2)  # uint8 e8m0 scales select MXFP4
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
from .fp8 import dequantize_fp8, expand_block_scales, quantize_moe_weights_fp8
from .fp8_checkpoints import load_fp8_experts
from .int4 import (
    dequantize_int4,
    pack_int4,
    quantize_int4_groupwise,
    quantize_moe_weights_int4,
    unpack_int4,
)
from .int4_checkpoints import load_int4_experts
from .mxfp4 import dequantize_mxfp4, quantize_moe_weights_mxfp4
from .mxfp4_checkpoints import load_mxfp4_experts
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
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_mxfp4",
    "expand_block_scales",
    "load_fp8_experts",
    "load_int4_experts",
    "load_mxfp4_experts",
    "load_tuning_cache",
    "pack_int4",
    "quantization",
    "quantize_int4_groupwise",
    "quantize_moe_weights_fp8",
    "quantize_moe_weights_int4",
    "quantize_moe_weights_int8",
    "quantize_moe_weights_mxfp4",
    "reference_moe",
    "save_tuning_cache",
    "swap_w13_to_w31",
    "unpack_int4",
]
