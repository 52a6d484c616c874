"""MXFP4 (OCP microscaling: e2m1 elements, e8m0 scales, blocks of 32) weight-only quantization of
MoE expert weights: the kernel layout, the two codes, the quantiser and dequantisation.

Kernel layout (the fixed contract of the MXFP4 kernels, the int4 family's group-scaled mainloop;
:mod:`cutlass_moe.int4` for the shared conventions). A linear layer's weight ``W [N, K]``
(``N`` output rows, ``K`` the contiguous input dimension) is stored as:

- ``packed``: ``torch.uint8 [N, K/2]``, two e2m1 codes per byte: byte ``j`` of row ``n`` holds
  ``k = 2j`` in its LOW nibble and ``k = 2j+1`` in its HIGH nibble (as int4);
- ``scales``: ``torch.uint8 [K/32, N]`` e8m0 codes (N contiguous, one row per block of 32
  consecutive input elements: ``G = 32`` always). No zero points.

The codes (OCP Microscaling Formats (MX) v1.0, sections 5.3.3 and 5.4.1):

- e2m1 (4 bits ``s e e m``, bias 1): ``(-1)^s * (m/2)`` for ``e == 0`` and
  ``(-1)^s * (1 + m/2) * 2^(e-1)`` otherwise, i.e. magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``
  for codes 0..7 (8..15: the same, negative; code 8 is -0). No inf, no NaN.
- e8m0 (8 bits, an unsigned biased exponent): ``2^(x - 127)``, from ``2^-127`` (``x = 0``) to
  ``2^127`` (``x = 254``); ``x = 255`` is NaN.

The weight the kernels compute with is ``W[n, k] = round_to_act_dtype(value * scale)``, the
product formed in float32 (exact: at most 2 significant bits times a power of two, and at
least ``0.5 * 2^-127``; only ``|value| >= 2`` with ``x = 254`` would exceed float32, giving
inf) (:func:`dequantize_mxfp4`). The kernels need ``K % 32 == 0`` and ``N % 16 == 0``
(16-byte rows of uint8 scales).

An MoE layer (:func:`cutlass_moe.cutlass_fused_moe` with ``use_w4_group_scaling=True`` and
uint8 scales, 16-bit activations) takes fc1 ``uint8 [E, N1, H/2]`` (rows up, then gate, for
gated activations), fc2 ``uint8 [E, H, I/2]``, and ``quant_scales=[s1 uint8 [E, H/32, N1],
s2 uint8 [E, I/32, H]]``: the scales' dtype (uint8) tells MXFP4 from int4 (16-bit scales).
:func:`quantize_moe_weights_mxfp4` produces them from float weights, and
:mod:`cutlass_moe.mxfp4_checkpoints` from gpt-oss checkpoints.

Everything here is plain torch and works on CPU and GPU tensors.
"""

from __future__ import annotations

import torch

from .fp8 import _check_finite, _float_weights, _where
from .int4 import _as_bytes, _packed_layer_shape, unpack_int4
from .quantization import _CHUNK_ELEMENTS

#: Elements per MX block (one e8m0 scale each): the group size of MXFP4 weights.
MXFP4_BLOCK = 32
#: K (the contiguous weight dimension, H for fc1 and I for fc2) must be a multiple of this.
MXFP4_K_ALIGNMENT = 32
#: N (output rows per expert: 2I or I for fc1, H for fc2) must be a multiple of this.
MXFP4_N_ALIGNMENT = 16
#: The e2m1 magnitudes of codes 0..7 (codes 8..15 are their negatives).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: The largest e2m1 magnitude.
E2M1_MAX = 6.0
#: The exponent of the largest e2m1 power of two (4 = 2^2): OCP's ``emax_elem``.
E2M1_EMAX = 2
#: The e8m0 exponent bias: code ``x`` is ``2^(x - 127)``.
E8M0_BIAS = 127
#: The e8m0 NaN code.
E8M0_NAN = 255

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Rounding thresholds between consecutive e2m1 magnitudes, and whether a tie (the exact
#: midpoint) rounds up: ties go to the code with an even mantissa bit (an even code).
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
              (3.5, True), (5.0, False))


def _describe(x: object) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


# ------------------------------------------------------------------ the codes


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of e2m1 codes ``0..15`` (one code per element, not packed): code bits
    ``s e e m`` -> ``(-1)^s (m/2)`` for ``e == 0``, ``(-1)^s (1 + m/2) 2^(e-1)`` otherwise.

    Args:
        codes: any integer tensor of values ``0..15`` (``unpack_int4`` of packed bytes).

    Raises:
        ValueError: ``codes`` is not an integer tensor or holds a value outside ``0..15``.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _INT_DTYPES:
        raise ValueError(f"e2m1_to_float: codes must be an integer tensor of e2m1 codes 0..15, "
                         f"got {_describe(codes)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
        raise ValueError(f"e2m1_to_float: codes holds {bad}; e2m1 codes are 0..15")
    bits = codes.to(torch.int32)
    exponent, mantissa = (bits >> 1) & 0x3, (bits & 0x1).to(torch.float32)
    magnitude = torch.where(exponent == 0, mantissa / 2,
                            torch.ldexp(1 + mantissa / 2, (exponent - 1).to(torch.float32)))
    return torch.where(bits >= 8, -magnitude, magnitude)


def e8m0_to_float(x: torch.Tensor) -> torch.Tensor:
    """The float32 values ``2^(x - 127)`` of e8m0 codes (``x = 255``: NaN), built from their
    bits (exact: ``x = 0`` is the float32 subnormal ``2^-127``).

    Args:
        x: ``uint8`` codes (``int8`` is read as its bytes), any shape and device.

    Raises:
        ValueError: ``x`` is not a uint8/int8 tensor.
    """
    x = _as_bytes(x, "e8m0_to_float", "x", "e8m0 codes").to(torch.int32)
    # x >= 1: the float32 whose biased exponent field is x; x = 0: bit 22 (2^22 * 2^-149).
    bits = torch.where(x == 0, torch.full_like(x, 1 << 22), x << 23)
    bits = torch.where(x == E8M0_NAN, torch.full_like(x, 0x7FC00000), bits)
    return bits.view(torch.float32)


# ------------------------------------------------------------------ dequantisation


def dequantize_mxfp4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``value * scale`` rounded once to ``dtype``: the weights the MXFP4 kernels compute with.

    Args:
        packed: the kernel layout, ``uint8 [N, K/2]`` or ``[E, N, K/2]`` (int8 is read as its
            bytes), low nibble first.
        scales: e8m0 ``uint8 [K/32, N]`` or ``[E, K/32, N]`` (as ``packed``).
        dtype: result dtype; default float32 (which is exact, see the module docstring).

    Returns:
        ``[N, K]`` or ``[E, N, K]`` of ``dtype`` on ``packed``'s device. A NaN scale code (255)
        gives NaN elements.

    Raises:
        ValueError: a dtype or shape does not match the above (the message names the argument).
    """
    func = "dequantize_mxfp4"
    packed = _as_bytes(packed, func, "packed", "packed e2m1 pairs")
    scales = _as_bytes(scales, func, "scales", "e8m0 codes")
    if packed.dim() not in (2, 3):
        raise ValueError(f"{func}: packed must be [N, K/2] or [E, N, K/2], got shape "
                         f"{list(packed.shape)}")
    n, k = packed.shape[-2], 2 * packed.shape[-1]
    lead = list(packed.shape[:-2])
    want = (f"[E, K/32, N] = [{lead[0]}, {k // MXFP4_BLOCK}, {n}]" if lead
            else f"[K/32, N] = [{k // MXFP4_BLOCK}, {n}]")
    if k % MXFP4_BLOCK:
        raise ValueError(f"{func}: packed [.., N, K/2] = {list(packed.shape)}: K = {k} must be "
                         f"a multiple of {MXFP4_BLOCK} (one e8m0 scale per {MXFP4_BLOCK} "
                         "elements)")
    if list(scales.shape) != [*lead, k // MXFP4_BLOCK, n]:
        raise ValueError(f"{func}: scales must be {want} for packed {list(packed.shape)}, got "
                         f"{list(scales.shape)}")
    dtype = torch.float32 if dtype is None else dtype

    def one(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        values = e2m1_to_float(unpack_int4(p)).unflatten(-1, (-1, MXFP4_BLOCK))  # [N, K/32, 32]
        return (values * e8m0_to_float(s).t().unsqueeze(-1)).flatten(-2)

    if packed.dim() == 3:
        out = torch.empty(*lead, n, k, dtype=dtype, device=packed.device)
        for e in range(lead[0]):
            out[e] = one(packed[e], scales[e])
        return out
    return one(packed, scales).to(dtype)


# ------------------------------------------------------------------ quantisation


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8 0..15) of ``v`` (finite): round to nearest, ties to even, magnitudes
    above 6 saturate to 6; the sign bit only for a nonzero result (never -0)."""
    mag = v.abs()
    index = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for midpoint, tie_up in _MIDPOINTS:
        index += (mag >= midpoint) if tie_up else (mag > midpoint)
    return torch.where((v < 0) & (index > 0), index | 8, index)


def quantize_mxfp4(
    w: torch.Tensor,
    *,
    name: str = "weights",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization of ``w [N, K]`` or ``[E, N, K]`` (K a multiple of 32) into the kernel
    layout, by the OCP MX v1.0 conversion rule (section 6.3).

    Each block of 32 consecutive elements of a row gets a shared power-of-two scale ::

        X = 2^(floor(log2(max(|w|))) - 2)        (2 = emax of e2m1: 4 = 2^2)

    stored as the e8m0 code ``x = log2(X) + 127``, clamped to ``0..254`` (so never NaN), and
    each element becomes the e2m1 code of ``w / X`` (exact: a power-of-two scaling), rounded to
    the nearest e2m1 value with ties to the even code (``0.25 -> 0``, ``0.75 -> 1``,
    ``2.5 -> 2``, ``5 -> 4``, ...) and saturated to ``+-6``: with this rule ``max(|w|) / X``
    lies in ``[4, 8)``, so the block's largest values may be clipped to 6 (OCP's known
    behaviour; error below ``2X``). Elsewhere the error is at most half an e2m1 step:
    ``X/4`` for ``|w/X| < 2``, ``X/2`` below 4, ``X`` up to 6. Results that round to 0 are
    stored as +0 (code 0). An all-zero block gets ``x = 127`` (scale 1).

    Args:
        w: floating-point weights ``[N, K]`` or ``[E, N, K]`` (K contiguous), any device.
        name: what ``w`` is called in error messages (e.g. ``"fc1_expert_weights"``).

    Returns:
        ``(packed uint8 [.., N, K/2], scales uint8 [.., K/32, N])``, contiguous, on ``w``'s
        device. :func:`dequantize_mxfp4` inverts them.

    Raises:
        ValueError: ``w`` is not a 2-D/3-D floating-point tensor, ``K`` is not a multiple of 32,
            or a block holds NaN or inf (the message names the expert, row and k range, and how
            many other rows do).
    """
    func = "quantize_mxfp4"
    w = _float_weights(func, w, name, (2, 3))
    k = w.shape[-1]
    if k % MXFP4_BLOCK:
        raise ValueError(f"{func}: {name} {list(w.shape)}: K = {k} must be a multiple of "
                         f"{MXFP4_BLOCK} (MX blocks of {MXFP4_BLOCK} elements)")
    blocks = k // MXFP4_BLOCK
    rows_w = w.reshape(-1, k)
    grouped = rows_w.reshape(-1, blocks, MXFP4_BLOCK)
    amax = grouped.abs().amax(dim=-1)
    _check_finite(func, "MXFP4", name, w, rows_w, MXFP4_BLOCK, amax)
    # floor(log2(amax)) exactly: frexp gives amax = m * 2^e with m in [0.5, 1).
    _, exponent = torch.frexp(amax.to(torch.float64))
    shared = exponent.to(torch.int64) - 1 - E2M1_EMAX
    if bool((shared > E8M0_BIAS).any()):  # only float64 weights reach 2^130
        row, block = torch.nonzero(shared > E8M0_BIAS)[0].tolist()
        where = _where(name, w.shape, row, block * MXFP4_BLOCK, (block + 1) * MXFP4_BLOCK - 1)
        raise ValueError(f"{func}: {where} holds {float(amax[row, block]):.6g}, beyond MXFP4's "
                         "range (the largest scale is 2^127)")
    shared = shared.clamp_min(-E8M0_BIAS)  # tinier blocks: the smallest scale, 2^-127
    shared = torch.where(amax == 0, torch.zeros_like(shared), shared)
    codes = (shared + E8M0_BIAS).to(torch.uint8)  # [rows, K/32]
    packed = torch.empty(rows_w.shape[0], k // 2, dtype=torch.uint8, device=w.device)
    inverse = torch.ldexp(torch.ones((), dtype=torch.float64, device=w.device),
                          (-shared).to(torch.float64)).unsqueeze(-1)  # 1/X, exact
    step = max(1, _CHUNK_ELEMENTS // k)
    for begin in range(0, rows_w.shape[0], step):
        end = begin + step
        scaled = grouped[begin:end].to(torch.float64) * inverse[begin:end]
        q = _round_e2m1(scaled).flatten(-2)
        packed[begin:end] = q[:, 0::2] | (q[:, 1::2] << 4)
    lead = w.shape[:-1]
    scales = codes.view(*lead, blocks).transpose(-1, -2).contiguous()
    return packed.view(*lead, k // 2), scales


# ------------------------------------------------------------------ a whole MoE layer


def check_mxfp4_layer(
    fc1_weights: torch.Tensor,
    fc2_weights: torch.Tensor,
    quant_scales: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> None:
    """Checks an MXFP4 MoE layer against the kernel layout.

    ``fc1_weights`` ``uint8 [E, N1, H/2]``, ``fc2_weights`` ``uint8 [E, H, I/2]`` (int8 is
    accepted), ``quant_scales`` ``[s1 uint8 [E, H/32, N1], s2 uint8 [E, I/32, H]]``; ``H`` and
    ``I`` multiples of 32, ``N1`` and ``H`` multiples of 16. Only shapes and dtypes are read.

    Raises:
        ValueError: the first rule broken, naming the tensor.
    """
    func = "check_mxfp4_layer"
    num_experts, n1, hidden, inter = _packed_layer_shape(
        func, fc1_weights, fc2_weights, "packed e2m1 pairs", MXFP4_K_ALIGNMENT,
        MXFP4_N_ALIGNMENT)
    if not isinstance(quant_scales, (list, tuple)) or len(quant_scales) != 2:
        got = (f"{len(quant_scales)} tensors" if isinstance(quant_scales, (list, tuple))
               else _describe(quant_scales))
        raise ValueError(f"{func}: quant_scales must be [fc31_scales, fc2_scales] (MXFP4 weights "
                         f"have no zero points), got {got}")
    for s, (label, k, n) in zip(quant_scales, (("fc31_scales", hidden, n1),
                                               ("fc2_scales", inter, hidden))):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.uint8:
            raise ValueError(f"{func}: {label} must be uint8 (e8m0 codes), got {_describe(s)}")
        want = [num_experts, k // MXFP4_BLOCK, n]
        if list(s.shape) != want:
            raise ValueError(f"{func}: {label} must be [E, K/32, N] = {want}, got "
                             f"{list(s.shape)}")


def quantize_moe_weights_mxfp4(
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Quantises both expert weights of an MoE layer to MXFP4 (:func:`quantize_mxfp4`) for
    ``use_w4_group_scaling=True`` with uint8 scales.

    Args:
        fc1_expert_weights: ``[E, 2I, H]`` (rows up, then gate) or ``[E, I, H]``, floating point.
        fc2_expert_weights: ``[E, H, I]``, floating point.

    Returns:
        ``(fc1 uint8 [E, N1, H/2], fc2 uint8 [E, H, I/2], [s1 uint8 [E, H/32, N1],
        s2 uint8 [E, I/32, H]])``.

    Raises:
        ValueError: as :func:`quantize_mxfp4`, or the layer breaks :func:`check_mxfp4_layer`'s
            rules (e.g. ``N1`` not a multiple of 16).
    """
    p1, s1 = quantize_mxfp4(fc1_expert_weights, name="fc1_expert_weights")
    p2, s2 = quantize_mxfp4(fc2_expert_weights, name="fc2_expert_weights")
    check_mxfp4_layer(p1, p2, [s1, s2])
    return p1, p2, [s1, s2]

