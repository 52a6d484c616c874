"""MXFP4 checkpoint importer: gpt-oss (``quant_method: "mxfp4"``) expert weights into the kernel
layout of :mod:`cutlass_moe.mxfp4`.

The e2m1 codes and e8m0 scales are moved, never requantised: :func:`load_mxfp4_experts`
returns exactly the bytes the checkpoint holds, reordered into the kernels' layout.

Format facts used (verified in transformers 5.x: ``integrations/mxfp4.py``
``_convert_moe_packed_tensors`` (its dequantiser), ``Mxfp4GptOssExperts``, and
``models/gpt_oss/modeling_gpt_oss.py`` ``GptOssExperts``):

- Tensors per MoE layer (all experts in one tensor), under ``{prefix}`` =
  ``model.layers.{l}.mlp.experts``: ``gate_up_proj_blocks`` uint8 ``[E, 2I, H/32, 16]``,
  ``gate_up_proj_scales`` uint8 ``[E, 2I, H/32]``, ``gate_up_proj_bias`` ``[E, 2I]``
  (bfloat16 in the released checkpoints), ``down_proj_blocks`` uint8 ``[E, H, I/32, 16]``,
  ``down_proj_scales`` uint8 ``[E, H, I/32]``, ``down_proj_bias`` ``[E, H]``.
- Dimension 1 of blocks/scales is the output row ``n`` of the linear layer (the dequantiser
  produces ``[E, N, K]`` and then transposes to the ``[E, K, N]`` = ``[E, H, 2I]`` /
  ``[E, I, H]`` parameters the model multiplies as ``x @ W``); dimension 2 is the MX block
  ``b`` along the input ``k`` (32 elements), and its 16 bytes hold elements
  ``32b + 2j`` (LOW nibble, ``blk & 0x0F``) and ``32b + 2j + 1`` (HIGH nibble, ``blk >> 4``)
  of byte ``j``: the same nibble order as the kernel layout, so a row's blocks flattened are
  the kernel's ``[K/2]`` bytes.
- A nibble is an index into ``FP4_VALUES = [+0, +0.5, +1, +1.5, +2, +3, +4, +6, -0, -0.5, ...,
  -6]``: the OCP e2m1 code. A scale byte ``x`` multiplies its 32 elements by ``2^(x - 127)``
  (``torch.ldexp(values, x - 127)``): OCP e8m0.
- gate and up are INTERLEAVED along dimension 1 of gate_up: ``gate = gate_up[..., ::2]``,
  ``up = gate_up[..., 1::2]`` (``GptOssExperts._apply_gate``), i.e. row ``2i`` is gate row
  ``i`` and row ``2i + 1`` is up row ``i``; ``gate_up_proj_bias`` likewise. The kernels want
  fc1 rows ``[up; gate]``: up rows ``1, 3, 5, ...`` first, then gate rows ``0, 2, 4, ...``.
- The activation is a clamped SwiGLU: ``gate = min(gate, limit)``, ``up = clamp(up, -limit,
  limit)``, ``out = (up + 1) * gate * sigmoid(alpha * gate)`` with ``alpha = 1.702`` and
  ``limit = swiglu_limit`` (7.0): :func:`cutlass_moe.cutlass_fused_moe`'s
  ``swiglu_alpha``/``swiglu_beta``/``swiglu_limit`` (float32 ``[E]``: 1.702, 1, 7) with
  ``fc1_expert_biases``/``fc2_expert_biases`` = :attr:`Mxfp4Experts.fc1_bias`/``fc2_bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .mxfp4 import E8M0_NAN, MXFP4_BLOCK, check_mxfp4_layer

#: Bytes per MX block of 32 e2m1 codes.
_BLOCK_BYTES = MXFP4_BLOCK // 2
_BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Mxfp4Experts:
    """The MXFP4 tensors of one MoE layer, as :func:`cutlass_moe.cutlass_fused_moe` takes them
    with ``use_w4_group_scaling=True`` (uint8 scales): ``fc1`` rows are ``[up; gate]``."""

    fc1_weights: torch.Tensor  #: uint8 [E, 2I, H/2], rows up then gate
    fc2_weights: torch.Tensor  #: uint8 [E, H, I/2]
    fc1_scales: torch.Tensor  #: uint8 e8m0 [E, H/32, 2I], columns up then gate
    fc2_scales: torch.Tensor  #: uint8 e8m0 [E, I/32, H]
    fc1_bias: torch.Tensor | None  #: [E, 2I] up then gate, or None
    fc2_bias: torch.Tensor | None  #: [E, H] or None

    @property
    def quant_scales(self) -> list[torch.Tensor]:
        """``[fc31_scales, fc2_scales]``."""
        return [self.fc1_scales, self.fc2_scales]


def _shape(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
    return type(t).__name__


def _get(state_dict: Mapping[str, torch.Tensor], prefix: str, proj: str, suffix: str,
         required: bool) -> torch.Tensor | None:
    key = f"{prefix}.{proj}_{suffix}"
    if key in state_dict:
        return state_dict[key]
    if not required:
        return None
    hint = ""
    if not any(str(other).startswith(prefix + ".") for other in state_dict):
        hint = f"; no key starts with {prefix + '.'!r} (check the prefix)"
    raise KeyError(f"load_mxfp4_experts: {key!r} is missing from the state dict (gpt-oss MXFP4 "
                   f"experts need {proj}_blocks and {proj}_scales){hint}")


def _projection(state_dict: Mapping[str, torch.Tensor], prefix: str, proj: str,
                rows: tuple[int, int] | None,
                num_experts: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [E, N, K/2], scales uint8 [E, N, K/32])`` of ``proj`` (checked)."""
    blocks = _get(state_dict, prefix, proj, "blocks", True)
    scales = _get(state_dict, prefix, proj, "scales", True)
    name = f"{prefix}.{proj}_blocks"
    if (not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 4
            or blocks.shape[-1] != _BLOCK_BYTES):
        raise ValueError(f"{name} must be uint8 [E, N, K/32, 16] (16 bytes = 32 e2m1 codes per "
                         f"MX block), got {_shape(blocks)}")
    e, n, nblocks, _ = blocks.shape
    if num_experts is not None and e != num_experts:
        raise ValueError(f"{name} has {e} experts but gate_up_proj_blocks has {num_experts}")
    if rows is not None and (n, nblocks * MXFP4_BLOCK) != rows:
        raise ValueError(f"{name} [E, N, K/32, 16] = {list(blocks.shape)} must be [E, H, I/32, "
                         f"16] with H = {rows[0]} (the gate_up input size) and I = {rows[1]} "
                         "(half its rows)")
    sname = f"{prefix}.{proj}_scales"
    if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8
            or list(scales.shape) != [e, n, nblocks]):
        raise ValueError(f"{sname} must be uint8 e8m0 [E, N, K/32] = {[e, n, nblocks]} for "
                         f"{name} {list(blocks.shape)}, got {_shape(scales)}")
    nan = scales == E8M0_NAN
    if bool(nan.any()):
        first = [int(i) for i in torch.nonzero(nan)[0]]
        raise ValueError(f"{sname} holds the e8m0 NaN code 255 at {first} (of "
                         f"{int(nan.sum())}); the weights would be NaN")
    return blocks.reshape(e, n, nblocks * _BLOCK_BYTES), scales


def _bias(state_dict: Mapping[str, torch.Tensor], prefix: str, proj: str, shape: list[int],
          dtype: torch.dtype | None) -> torch.Tensor | None:
    bias = _get(state_dict, prefix, proj, "bias", False)
    if bias is None:
        return None
    if (not isinstance(bias, torch.Tensor) or bias.dtype not in _BIAS_DTYPES
            or list(bias.shape) != shape):
        raise ValueError(f"{prefix}.{proj}_bias must be a float {shape} tensor, got "
                         f"{_shape(bias)}")
    return bias if dtype is None else bias.to(dtype)


def load_mxfp4_experts(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    *,
    gate_up: str = "gate_up_proj",
    down: str = "down_proj",
    bias_dtype: torch.dtype | None = None,
) -> Mxfp4Experts:
    """Reads gpt-oss's MXFP4 experts of one MoE layer and assembles the kernel's tensors
    (format facts: module docstring).

    fc1 is ``gate_up`` with its interleaved rows reordered to ``[up; gate]`` (up = odd rows,
    gate = even rows), weights ``uint8 [E, 2I, H/2]`` and scales transposed to ``uint8
    [E, H/32, 2I]``; fc2 is ``down``, ``[E, H, I/2]`` and ``[E, I/32, H]``. The biases
    (``[E, 2I]`` reordered the same way, ``[E, H]``) are returned when present.

    Args:
        state_dict: a mapping from names to tensors (safetensors of the checkpoint, ...).
        prefix: the experts' prefix, e.g. ``"model.layers.0.mlp.experts"`` (a trailing ``.`` is
            ignored).
        gate_up, down: the projections' names (gpt-oss: ``gate_up_proj`` and ``down_proj``).
        bias_dtype: dtype of the returned biases; default the checkpoint's.

    Returns:
        :class:`Mxfp4Experts` (``.quant_scales`` is the list for ``cutlass_fused_moe``).

    Raises:
        KeyError: ``*_blocks`` or ``*_scales`` is missing (the message names its key).
        ValueError: a tensor's dtype or shape, e8m0 NaN scales (255), or a layer that breaks the
            kernels' alignment (H and I multiples of 32, 2I and H multiples of 16); each message
            names the tensor.
    """
    if bias_dtype is not None and bias_dtype not in _BIAS_DTYPES:
        raise ValueError(f"bias_dtype must be float16, bfloat16, float32 or float64, got "
                         f"{bias_dtype}")
    prefix = prefix.rstrip(".")
    p1, s1 = _projection(state_dict, prefix, gate_up, None, None)
    num_experts, n1, hidden = p1.shape[0], p1.shape[1], 2 * p1.shape[2]
    if n1 % 2:
        raise ValueError(f"{prefix}.{gate_up}_blocks has {n1} rows: gate and up interleaved "
                         "need an even count")
    p2, s2 = _projection(state_dict, prefix, down, (hidden, n1 // 2), num_experts)
    # [up; gate]: rows 1, 3, 5, ... (up) then 0, 2, 4, ... (gate).
    order = torch.cat([torch.arange(1, n1, 2), torch.arange(0, n1, 2)]).to(p1.device)
    fc1_weights = p1.index_select(1, order).contiguous()
    fc1_scales = s1.index_select(1, order).transpose(1, 2).contiguous()
    fc2_weights = p2.contiguous()
    fc2_scales = s2.transpose(1, 2).contiguous()
    b1 = _bias(state_dict, prefix, gate_up, [num_experts, n1], bias_dtype)
    b2 = _bias(state_dict, prefix, down, [num_experts, hidden], bias_dtype)
    if b1 is not None:
        b1 = b1.index_select(1, order.to(b1.device)).contiguous()
    try:
        check_mxfp4_layer(fc1_weights, fc2_weights, [fc1_scales, fc2_scales])
    except ValueError as exc:
        raise ValueError(f"load_mxfp4_experts: the experts under {prefix!r} do not make an MXFP4 "
                         f"MoE layer: {exc}") from None
    return Mxfp4Experts(fc1_weights, fc2_weights, fc1_scales, fc2_scales, b1,
                        None if b2 is None else b2.contiguous())
