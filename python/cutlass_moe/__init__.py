"""cutlass_moe: the fused Mixture-of-Experts layer, compiled ahead of time with CUTLASS.

A drop-in for FlashInfer's ``cutlass_fused_moe``::

    from cutlass_moe import cutlass_fused_moe, ActivationType
    out = cutlass_fused_moe(x, topk_ids, topk_weights, w31, w2, x.dtype)[0]

Importing this package makes no CUDA call and works without a GPU or a built extension; the op
then raises a ``RuntimeError`` that says what is missing.
"""

from __future__ import annotations

from ._ext import build_info
from ._version import __version__
from .activation import ActivationType
from .autotuner import autotune, clear_tuning_cache, load_tuning_cache, save_tuning_cache
from .ops import cutlass_fused_moe
from .reference import reference_moe
from .weights import swap_w13_to_w31

__all__ = [
    "ActivationType",
    "__version__",
    "autotune",
    "build_info",
    "clear_tuning_cache",
    "cutlass_fused_moe",
    "load_tuning_cache",
    "reference_moe",
    "save_tuning_cache",
    "swap_w13_to_w31",
]
