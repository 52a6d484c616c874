"""Weight layout helpers."""

from __future__ import annotations

import torch


def swap_w13_to_w31(w: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Swaps the two halves of a fused gate/up weight along ``dim``.

    vLLM and Hugging Face checkpoints store the fused GEMM1 weight gate first ("w13":
    ``[E, 2I, H]`` with rows ``[gate | up]``); cutlass_moe (like FlashInfer and TensorRT-LLM)
    expects up first ("w31": rows ``[up | gate]``). The swap is its own inverse, so the same call
    converts back.

    The same call converts everything else that is indexed by fc1's output rows, along the
    dimension that holds them:

    - weights ``[E, 2I, H]`` (16-bit, or int8 quantised): the default ``dim=-2``;
    - the fc1 bias ``[E, 2I]`` and the int8 per-channel scales ``fc31_scale [E, 2I]``
      (``quant_scales[0]``): ``dim=-1``.

    Quantise-then-swap equals swap-then-quantise (the scales are per row), so a gate-first
    checkpoint can be quantised before or after the conversion, as long as weights and scales
    are both swapped.

    Args:
        w: ``[..., 2I, H]`` weight (any dtype), or ``[E, 2I]`` bias / scales with ``dim=-1``.
        dim: the dimension holding the ``2I`` fused rows: ``-2`` for weights, ``-1`` for biases
            and scales.

    Returns:
        A new contiguous tensor of the same shape, dtype and device with the halves swapped.
    """
    size = w.shape[dim]
    if size % 2 != 0:
        raise ValueError(
            f"swap_w13_to_w31 needs an even size along dim {dim}, got shape {tuple(w.shape)}"
        )
    first, second = w.split(size // 2, dim=dim)
    return torch.cat((second, first), dim=dim).contiguous()
