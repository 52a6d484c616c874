"""Weight-only int8 quantization (W8A16) of MoE expert weights: quantise, lay out, dequantise.

Scheme (TensorRT-LLM's ``use_int8_woq_per_channel``): symmetric, per output channel, no zero
point. For each expert ``e`` and output row ``n`` of a weight ``W[e]`` of shape ``[N, K]``::

    scale[e, n] = max_k |W[e, n, k]| / 127
    Q[e, n, k]  = clamp(round(W[e, n, k] / scale[e, n]), -127, 127)     (int8)
    W[e, n, k] ~= Q[e, n, k] * scale[e, n]                              (dequantised)

``round`` is round-to-nearest (ties to even). The scale is rounded to its dtype first and the
weights are quantised against the *stored* scale, which gives ``|W - Q*scale| <= scale/2``
element-wise.

Kernel layout: the int8 grouped GEMM reads each expert's ``Q[e]`` as ``[N, K]`` row-major with
K contiguous (``B = Q[e]^T`` column-major), i.e. **the ordinary layout** ``[E, 2I, H]`` (fc1,
rows up then gate) and ``[E, H, I]`` (fc2), contiguous, with ``K % 16 == 0`` (16-byte int8
loads) and ``N % 8 == 0``. :func:`to_int8_kernel_layout` checks that once at load time and makes
the tensor contiguous; :func:`from_int8_kernel_layout` is its inverse (also the identity on the
data). Neither interleaves nor permutes anything, so a later layout change stays behind them.

The scales go to :func:`cutlass_moe.cutlass_fused_moe` as
``quant_scales=[fc31_scale [E, N1], fc2_scale [E, H]]`` in the activation dtype, with
``use_int8_woq_per_channel=True``; ``fc31_scale`` is ordered like fc1's rows (up, then gate),
and :func:`cutlass_moe.swap_w13_to_w31` converts a gate-first one with ``dim=-1``.

Everything here is plain torch and works on CPU and GPU tensors.
"""

from __future__ import annotations

import torch

#: Largest quantised magnitude: the symmetric int8 range is [-127, 127] (-128 is not used).
INT8_MAX = 127
#: K (the contiguous weight dimension) must be a multiple of this for the int8 kernels.
INT8_K_ALIGNMENT = 16
#: N (output rows per expert) must be a multiple of this (16-byte scale and output accesses).
INT8_N_ALIGNMENT = 8

#: Elements quantised per step (bounds the float temporaries at ~256 MB in float32).
_CHUNK_ELEMENTS = 1 << 26

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS_AS_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _row_name(name: str, shape: torch.Size, index: list[int]) -> str:
    """``"expert 3, row 17 of fc1 [E, N, K]"`` for a 3-D weight, else the row's index."""
    if len(shape) == 3:
        return f"expert {index[0]}, row {index[1]} of {name} [E, N, K] = {list(shape)}"
    if len(shape) == 2:
        return f"row {index[0]} of {name} [N, K] = {list(shape)}"
    return f"row {name}[{', '.join(map(str, index))}, :] of shape {list(shape)}"


def _check_rows(name: str, w: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor) -> None:
    """ValueError naming the first row whose values or scale are not finite: a NaN or inf
    weight would otherwise quantise its whole row to zeros with a NaN/inf scale."""
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        rows = torch.nonzero(bad)
        index = rows[0].tolist()
        row = w[tuple(index)]
        what = "NaN" if bool(torch.isnan(row).any()) else "inf"
        others = rows.shape[0] - 1
        more = f" (and {others} more row{'s' if others > 1 else ''})" if others else ""
        raise ValueError(
            f"quantize_int8_per_channel: {_row_name(name, w.shape, index)} holds {what}{more}; "
            "int8 weights need finite values (check the checkpoint, or the conversion that "
            "produced it)"
        )
    overflow = ~torch.isfinite(scale)
    if bool(overflow.any()):
        index = torch.nonzero(overflow)[0].tolist()
        raise ValueError(
            f"quantize_int8_per_channel: the scale of {_row_name(name, w.shape, index)} "
            f"(max |w| = {float(amax[tuple(index)]):.6g}, / {INT8_MAX}) overflows "
            f"{scale.dtype}; pass a wider scale_dtype"
        )


def quantize_int8_per_channel(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None, *, name: str = "weights"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of ``w`` (``[..., N, K]``).

    Args:
        w: floating-point weights ``[..., N, K]`` (typically ``[E, N, K]``: one ``[N, K]``
            matrix per expert), on any device. Each row (last dimension) gets its own scale.
        scale_dtype: dtype of the returned scales. Default: ``w.dtype`` — for float16/bfloat16
            weights that is the activation dtype the kernel wants; float32 (or float64) weights
            keep exact float32 (float64) scales, for references and offline work. To feed the
            kernel from float32 weights pass ``scale_dtype=`` the activation dtype: the scale is
            rounded to it *before* the weights are quantised against it, which keeps the
            ``scale/2`` error bound (converting float32 scales afterwards would not).
        name: what ``w`` is called in error messages (e.g. ``"fc1_expert_weights"``).

    Returns:
        ``(qweight, scale)``: ``qweight`` int8 of ``w``'s shape, contiguous; ``scale``
        ``[..., N]`` of ``scale_dtype``, positive and finite: ``max|row|/127`` rounded to the
        nearest ``scale_dtype`` value (so a row's largest element maps to +-127), raised by one
        step where that rounding would map it beyond 127.5 (subnormal scales only). An all-zero
        row gets scale 1 (and zeros). ``|w - qweight * scale[..., None]| <= scale / 2``
        element-wise (up to float32 rounding of the division).

    Raises:
        ValueError: ``w`` is not floating point, has fewer than 2 dimensions or ``K == 0``,
            ``scale_dtype`` is not a floating-point dtype, a row holds NaN or inf (the message
            names the expert and row, and how many other rows do), or a row's scale overflows
            ``scale_dtype``.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(
            f"quantize_int8_per_channel needs float16/bfloat16/float32/float64 weights, got {got}"
        )
    if w.dim() < 2 or w.shape[-1] == 0:
        raise ValueError(
            f"quantize_int8_per_channel needs weights [..., N, K] with K >= 1, got shape "
            f"{list(w.shape)}"
        )
    scale_dtype = w.dtype if scale_dtype is None else scale_dtype
    if scale_dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"scale_dtype must be float16, bfloat16, float32 or float64, got {scale_dtype}"
        )
    compute = torch.float64 if torch.float64 in (w.dtype, scale_dtype) else torch.float32
    w = w.detach()
    amax = w.abs().amax(dim=-1).to(compute)  # exact in w's dtype
    scale = (amax / INT8_MAX).to(scale_dtype)
    _check_rows(name, w, amax, scale)
    # Rounding down to scale_dtype maps the largest element to 127/(1 - d) for a relative
    # rounding d: at most 127.25 for normal fp16/bf16 values (d <= 2^-9), which still rounds to
    # 127. Only a subnormal scale can lose enough to push it past 127.5, where the clamp would
    # break the scale/2 bound: step up to the next representable value there. Scales are >= 0,
    # so the next value up is the bit pattern plus one (works on any device).
    too_small = scale.to(compute) * (INT8_MAX + 0.5) < amax
    bits = scale.view(_BITS_AS_INT[scale_dtype])
    scale = torch.where(too_small, (bits + 1).view(scale_dtype), scale)
    scale = torch.where(amax == 0, torch.ones((), dtype=scale_dtype, device=w.device), scale)
    # Rows in chunks: the float division needs a temporary of `compute` per element, which for
    # a whole model layer (Mixtral fc1: 940 M weights) would be several GB next to the model.
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    rows_w, rows_q = w.reshape(-1, w.shape[-1]), q.view(-1, w.shape[-1])
    rows_scale = scale.to(compute).reshape(-1, 1)
    step = max(1, _CHUNK_ELEMENTS // w.shape[-1])
    for begin in range(0, rows_w.shape[0], step):
        end = begin + step
        chunk = rows_w[begin:end].to(compute) / rows_scale[begin:end]
        rows_q[begin:end] = chunk.round_().clamp_(-INT8_MAX, INT8_MAX)
    return q, scale.contiguous()


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``qweight * scale[..., None]``: the weights the int8 kernels compute with (for references).

    Args:
        qweight: int8 ``[..., N, K]``, ordinary or kernel layout (they are the same).
        scale: ``[..., N]`` per-output-channel scales.
        dtype: result dtype; default ``scale.dtype``. The product is formed in float32 (float64
            when either dtype is float64) and rounded once.

    Returns:
        ``[..., N, K]`` tensor of ``dtype`` on ``qweight``'s device.
    """
    if qweight.dtype != torch.int8:
        raise ValueError(f"dequantize needs int8 weights, got {qweight.dtype}")
    if qweight.dim() < 2 or list(scale.shape) != list(qweight.shape[:-1]):
        raise ValueError(
            f"dequantize needs scale [..., N] = {list(qweight.shape[:-1])} for weights "
            f"{list(qweight.shape)}, got {list(scale.shape)}"
        )
    dtype = scale.dtype if dtype is None else dtype
    compute = torch.float64 if torch.float64 in (dtype, scale.dtype) else torch.float32
    return (qweight.to(compute) * scale.to(compute).unsqueeze(-1)).to(dtype)


def _check_int8_weight(name: str, w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} needs int8 weights [E, N, K], got {got}")
    if w.dim() != 3:
        raise ValueError(f"{name} needs int8 weights [E, N, K], got shape {list(w.shape)}")


def check_int8_alignment(*weights: tuple[str, torch.Tensor]) -> None:
    """The int8 kernels' alignment rule for weights ``[E, N, K]``, given as ``(label, tensor)``
    pairs: every ``N`` a multiple of 8 (16-byte scale and output accesses), then every ``K`` (the
    contiguous dimension) a multiple of 16 (16-byte int8 loads). ValueError naming the first
    weight that breaks it."""
    for label, w in weights:
        if w.shape[1] % INT8_N_ALIGNMENT != 0:
            raise ValueError(
                f"{label} [E, N, K] = {list(w.shape)}: N={w.shape[1]} must be a multiple of "
                f"{INT8_N_ALIGNMENT}"
            )
    for label, w in weights:
        if w.shape[2] % INT8_K_ALIGNMENT != 0:
            raise ValueError(
                f"{label} [E, N, K] = {list(w.shape)}: K={w.shape[2]} (the contiguous dimension) "
                f"must be a multiple of {INT8_K_ALIGNMENT}"
            )


def to_int8_kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """The layout the int8 kernels read, from ordinary int8 weights ``[E, N, K]``.

    Call once at load time. The kernel layout is the ordinary one — ``[E, N, K]`` row-major,
    K contiguous (fc1 ``[E, 2I, H]`` rows up then gate, fc2 ``[E, H, I]``) — so this checks the
    shape and alignment and returns a contiguous tensor (``w`` itself when already contiguous).
    Inverse: :func:`from_int8_kernel_layout`.

    Raises:
        ValueError: ``w`` is not a 3-D int8 tensor, ``K`` is not a multiple of 16 or ``N`` not
            a multiple of 8 (the message names the shape).
    """
    _check_int8_weight("to_int8_kernel_layout", w)
    check_int8_alignment(("int8 weights", w))
    return w.contiguous()


def from_int8_kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """Ordinary int8 weights ``[E, N, K]`` (K contiguous) from the kernel layout: the inverse of
    :func:`to_int8_kernel_layout` (the two layouts coincide, so the data is unchanged)."""
    _check_int8_weight("from_int8_kernel_layout", w)
    return w.contiguous()


def quantize_moe_weights_int8(
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Quantises both expert weights of an MoE layer for ``use_int8_woq_per_channel=True``.

    Args:
        fc1_expert_weights: ``[E, 2I, H]`` (rows up, then gate) or ``[E, I, H]``, floating point.
        fc2_expert_weights: ``[E, H, I]``, floating point.
        scale_dtype: see :func:`quantize_int8_per_channel` (pass the activation dtype for
            float32 weights).

    Returns:
        ``(fc1_q, fc2_q, [fc31_scale, fc2_scale])``: the int8 weights in kernel layout and the
        ``quant_scales`` list for :func:`cutlass_moe.cutlass_fused_moe`.
    """
    fc1_q, fc1_scale = quantize_int8_per_channel(fc1_expert_weights, scale_dtype,
                                                 name="fc1_expert_weights")
    fc2_q, fc2_scale = quantize_int8_per_channel(fc2_expert_weights, scale_dtype,
                                                 name="fc2_expert_weights")
    return to_int8_kernel_layout(fc1_q), to_int8_kernel_layout(fc2_q), [fc1_scale, fc2_scale]
