"""FP8 (e4m3) group-scaled weight-only quantization of MoE expert weights: the kernel layout,
the e4m3 code, quantisers (group-wise and DeepSeek-style 128x128 blocks) and dequantisation.

Kernel layout (the fixed contract of the FP8 weight-only kernels, the int4 family's
group-scaled mainloop; :mod:`cutlass_moe.int4` for the shared conventions). A linear layer's
weight ``W [N, K]`` (``N`` output rows, ``K`` the contiguous input dimension) is stored as:

- ``weights``: ``torch.float8_e4m3fn [N, K]`` (K contiguous);
- ``scales``: ``torch.float32 [K/G, N]`` (N contiguous, one row per K-group of ``G``
  elements). No zero points.

The weight the kernels compute with is ::

    W[n, k] = round_to_act_dtype(float32(v[n, k]) * s[k // G, n])

``v`` is the e4m3 value (exact in float32); the product is formed in float32 (where it rounds
when ``v``'s 4 and ``s``'s 24 significant bits need more than 24) and rounded once more to the
activation dtype (:func:`dequantize_fp8`).

e4m3 ("fn": finite, no infinities): code bits ``s eeee mmm``, bias 7; value
``(-1)^s * (m/8) * 2^-6`` for ``e == 0`` (subnormals) and ``(-1)^s * (1 + m/8) * 2^(e-7)``
otherwise; the largest finite magnitude is ``448`` (``0x7E``); ``0x7F`` and ``0xFF`` are NaN
and must not appear in weights: the quantisers here never produce them and the importers
(:mod:`cutlass_moe.fp8_checkpoints`) refuse them (:func:`check_no_fp8_nan`).

The group size ``G`` is a multiple of 32 that divides ``K`` or ``K`` itself ("per-channel",
``scales [1, N]``; per-tensor scales are expanded to that). It is never passed separately: it is
``K / scales.shape[-2]`` (:func:`cutlass_moe.int4.group_size_of`). DeepSeek-V3 / Qwen3-FP8
store 128x128 *block* scales ``weight_scale_inv [ceil(N/128), ceil(K/128)]``;
:func:`expand_block_scales` turns them into ``[K/128, N]`` (column ``n`` takes block
``n // 128``; ``G = 128``). The kernels further need ``K % 32 == 0`` and ``N % 8 == 0``.

An MoE layer (:func:`cutlass_moe.cutlass_fused_moe` with ``use_fp8_woq_group_scaling=True``,
16-bit activations) takes fc1 weights ``float8_e4m3fn [E, N1, H]`` (rows up, then gate, for
gated activations), fc2 weights ``[E, H, I]``, and ``quant_scales=[s1 float32 [E, H/G1, N1],
s2 float32 [E, I/G2, H]]``. :func:`quantize_moe_weights_fp8` produces them from float weights.

Everything here is plain torch and works on CPU and GPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .int4 import _check_group, _pair, group_size_of
from .quantization import _BITS_AS_INT, _CHUNK_ELEMENTS, _FLOAT_DTYPES

#: The e4m3 ("fn") dtype of FP8 expert weights.
FP8_DTYPE = torch.float8_e4m3fn
#: The largest finite e4m3 magnitude.
FP8_E4M3_MAX = 448.0
#: K (the contiguous weight dimension, H for fc1 and I for fc2) must be a multiple of this.
FP8_K_ALIGNMENT = 32
#: N (output rows per expert: 2I or I for fc1, H for fc2) must be a multiple of this.
FP8_N_ALIGNMENT = 8
#: A group size other than K (per-channel) must be a multiple of this.
FP8_GROUP_MULTIPLE = 32
#: The block shape (rows of N, columns of K) of DeepSeek-V3 / Qwen3-FP8 ``weight_scale_inv``.
DEEPSEEK_BLOCK = (128, 128)
#: The bit pattern (low 7 bits) of the e4m3fn NaN codes 0x7F and 0xFF.
_NAN_BITS = 0x7F



def _describe(x: object) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _shape(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    return type(x).__name__


# ------------------------------------------------------------------ the e4m3 code


def e4m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of e4m3fn codes, decoded bit by bit (independently of torch's
    float8 conversion): ``s eeee mmm`` -> ``(-1)^s (m/8) 2^-6`` (``e == 0``) or
    ``(-1)^s (1 + m/8) 2^(e-7)``; ``0x7F`` and ``0xFF`` are NaN.

    Args:
        codes: ``uint8`` (the bytes) or ``float8_e4m3fn`` (read as its bytes), any shape and
            device.

    Returns:
        ``float32`` of ``codes``' shape (exact: every e4m3 value is a float32).

    Raises:
        ValueError: ``codes`` is neither uint8 nor float8_e4m3fn.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.uint8, FP8_DTYPE):
        raise ValueError(f"e4m3_to_float: codes must be uint8 (e4m3 bytes) or float8_e4m3fn, "
                         f"got {_describe(codes)}")
    bits = codes.view(torch.uint8).to(torch.int32)
    sign = torch.where(bits >= 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, (bits & 0x7).to(torch.float32)
    normal = torch.ldexp(1.0 + mantissa / 8, (exponent - 7).to(torch.float32))
    subnormal = torch.ldexp(mantissa / 8, torch.full_like(mantissa, -6.0))
    value = sign * torch.where(exponent == 0, subnormal, normal)
    return torch.where((bits & 0x7F) == _NAN_BITS, torch.full_like(value, float("nan")), value)


def check_no_fp8_nan(weights: torch.Tensor, name: str = "weights") -> None:
    """ValueError if the float8_e4m3fn ``weights`` hold a NaN code (0x7F/0xFF), naming
    ``name``, the first offending index and how many there are."""
    if not isinstance(weights, torch.Tensor) or weights.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must be float8_e4m3fn, got {_shape(weights)}")
    bad = (weights.view(torch.uint8) & 0x7F) == _NAN_BITS
    if bool(bad.any()):
        first = [int(i) for i in torch.nonzero(bad)[0]]
        count = int(bad.sum())
        raise ValueError(
            f"{name} {list(weights.shape)} holds the e4m3 NaN code (0x7F/0xFF) at {first}"
            f"{f' and {count - 1} more places' if count > 1 else ''}; FP8 weights must be "
            "finite (check the checkpoint, or the conversion that produced it)")


# ------------------------------------------------------------------ dequantisation


def dequantize_fp8(
    weights: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``round_to_dtype(float32(v) * s)``: the weights the FP8 kernels compute with (for
    references).

    Args:
        weights: the kernel layout, ``float8_e4m3fn [N, K]`` or ``[E, N, K]``.
        scales: ``[K/G, N]`` or ``[E, K/G, N]`` (as ``weights``), float32 for the kernels (any
            float dtype is accepted); ``G`` is ``K / scales.shape[-2]``.
        dtype: result dtype; default ``scales.dtype``. The product is formed in float32 (as in
            the kernels; float64 when ``scales`` or ``dtype`` is float64, which is exact) and
            then rounded to ``dtype``.

    Returns:
        ``[N, K]`` or ``[E, N, K]`` of ``dtype`` on ``weights``' device. NaN codes give NaN.

    Raises:
        ValueError: a dtype or shape does not match the above (the message names the argument).
    """
    if not isinstance(weights, torch.Tensor) or weights.dtype != FP8_DTYPE:
        raise ValueError(f"dequantize_fp8: weights must be float8_e4m3fn, got "
                         f"{_describe(weights)}")
    if weights.dim() not in (2, 3):
        raise ValueError(f"dequantize_fp8: weights must be [N, K] or [E, N, K], got shape "
                         f"{list(weights.shape)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_fp8: scales must be a float tensor (float32), got "
                         f"{_describe(scales)}")
    n, k = weights.shape[-2:]
    lead = list(weights.shape[:-2])
    if scales.dim() != weights.dim() or list(scales.shape[:-2]) != lead or scales.shape[-1] != n:
        want = f"[E, K/G, N] = [{lead[0]}, K/G, {n}]" if lead else f"[K/G, N] = [K/G, {n}]"
        raise ValueError(f"dequantize_fp8: scales must be {want} for weights "
                         f"{list(weights.shape)}, got {list(scales.shape)}")
    group = group_size_of(k, scales, name="dequantize_fp8: scales")
    dtype = scales.dtype if dtype is None else dtype
    compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32

    def one(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = w.to(compute).unflatten(-1, (-1, group))  # [N, K/G, G]
        return (v * s.to(compute).t().unsqueeze(-1)).flatten(-2)

    if weights.dim() == 3:  # one expert at a time: float temporaries of one [N, K] matrix
        out = torch.empty(*lead, n, k, dtype=dtype, device=weights.device)
        for e in range(lead[0]):
            out[e] = one(weights[e], scales[e])
        return out
    return one(weights, scales).to(dtype)


# ------------------------------------------------------------------ quantisation helpers


def _where(name: str, shape: Sequence[int], row: int, k0: int, k1: int) -> str:
    """``"expert 3, row 17, k 128..255 of fc1 [E, N, K] = [...]"`` (or ``[N, K]``)."""
    if len(shape) == 3:
        e, n = divmod(row, shape[1])
        return f"expert {e}, row {n}, k {k0}..{k1} of {name} [E, N, K] = {list(shape)}"
    return f"row {row}, k {k0}..{k1} of {name} [N, K] = {list(shape)}"


def _check_finite(func: str, fmt: str, name: str, w: torch.Tensor, rows_w: torch.Tensor,
                  group_size: int, amax: torch.Tensor) -> None:
    """ValueError naming the first ``[row, group]`` of ``amax [rows, K/G]`` that is not finite
    (the group holds NaN or inf), and how many other rows have one."""
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        row, group = torch.nonzero(bad)[0].tolist()
        values = rows_w[row, group * group_size:(group + 1) * group_size]
        what = "NaN" if bool(torch.isnan(values).any()) else "inf"
        others = int(bad.any(dim=1).sum()) - 1
        more = f" (and {others} more row{'s' if others > 1 else ''})" if others else ""
        where = _where(name, w.shape, row, group * group_size, (group + 1) * group_size - 1)
        raise ValueError(f"{func}: {where} holds {what}{more}; {fmt} weights need finite values "
                         "(check the checkpoint, or the conversion that produced it)")


def _float_weights(func: str, w: object, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{func}: {name} must be float16/bfloat16/float32/float64 weights, got "
                         f"{_describe(w)}")
    if w.dim() not in dims or w.shape[-1] == 0 or w.shape[-2] == 0:
        want = " or ".join(["[N, K]", "[E, N, K]", "[..., N, K]"][:len(dims)])
        raise ValueError(f"{func}: {name} must be {want} with N, K >= 1, got shape "
                         f"{list(w.shape)}")
    return w.detach()


def _stored_scale(func: str, where: Callable[..., str], exact: torch.Tensor,
                  amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``exact`` (float64, ``amax / 448``) rounded to the nearest ``scale_dtype`` value, raised
    by one representable step where ``stored * 448 < amax`` (so nothing saturates), and 1 where
    ``amax == 0``. ``where(*index)`` names the group of an overflowing scale."""
    scale = exact.to(scale_dtype)
    overflow = ~torch.isfinite(scale)
    if bool(overflow.any()):
        index = tuple(int(i) for i in torch.nonzero(overflow)[0])
        raise ValueError(f"{func}: the scale of {where(*index)} ({float(exact[index]):.6g}) "
                         f"overflows {scale_dtype}; pass a wider scale_dtype")
    bits = scale.view(_BITS_AS_INT[scale_dtype])  # scales are >= 0: next value up is bits + 1
    low = scale.to(torch.float64) * FP8_E4M3_MAX < amax
    scale = torch.where(low, (bits + 1).view(scale_dtype), scale)
    return torch.where(amax == 0, torch.ones((), dtype=scale_dtype, device=scale.device), scale)


def _to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of finite ``values`` to float8_e4m3fn (never a NaN
    code: ``|values| > 448`` become +-448)."""
    return values.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def _check_scale_dtype(func: str, scale_dtype: object) -> torch.dtype:
    if scale_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{func}: scale_dtype must be float32 (the kernels'), float16, bfloat16 "
                         f"or float64, got {scale_dtype}")
    return scale_dtype


# ------------------------------------------------------------------ group-wise quantisation


def quantize_fp8_groupwise(
    w: torch.Tensor,
    group_size: int | None = 128,
    scale_dtype: torch.dtype = torch.float32,
    *,
    name: str = "weights",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise FP8 (e4m3) quantization of ``w [N, K]`` or ``[E, N, K]`` into the kernel
    layout.

    Each row is cut into ``K/G`` groups of ``G`` consecutive elements; each group gets the
    scale ::

        s = max(|w|) / 448                       (rounded to scale_dtype, see below)
        v = e4m3(clamp(w / s, -448, 448))        (round to nearest, ties to even)

    The scale is rounded to the nearest ``scale_dtype`` value and raised by one representable
    step where that went below ``max(|w|) / 448`` (so ``|w / s| <= 448`` and nothing
    saturates; the clamp only guards the float32 division); an all-zero group gets ``s = 1``.
    ``w / s`` is formed in float32 (float64 for float64 input or scales). Hence, element-wise,
    ``|w - v * s| <= 2^-4 |w| + 2^-10 s`` (e4m3 keeps 4 significant bits; below ``2^-6`` its
    subnormal step is ``2^-9``), up to the float32 rounding of the division. The NaN codes are
    never produced.

    Args:
        w: floating-point weights ``[N, K]`` or ``[E, N, K]`` (K contiguous), any device.
        group_size: ``G``: a multiple of 32 dividing ``K``, or ``None`` or ``K`` for
            per-channel scales (one group per row).
        scale_dtype: dtype of the returned scales; float32 is what the kernels take.
        name: what ``w`` is called in error messages (e.g. ``"fc1_expert_weights"``).

    Returns:
        ``(weights, scales)``: ``float8_e4m3fn [.., N, K]`` and ``[.., K/G, N]`` of
        ``scale_dtype`` (positive, finite), contiguous, on ``w``'s device.
        :func:`dequantize_fp8` inverts them.

    Raises:
        ValueError: ``w`` is not a 2-D/3-D floating-point tensor with ``N, K >= 1``,
            ``group_size`` is not supported for ``K``, ``scale_dtype`` is not a float dtype, a
            group holds NaN or inf (the message names the expert, row and k range, and how many
            other rows do), or a scale overflows ``scale_dtype``.
    """
    func = "quantize_fp8_groupwise"
    w = _float_weights(func, w, name, (2, 3))
    k = w.shape[-1]
    group_size = k if group_size is None else group_size
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"{func}: group_size must be a positive int or None (per-channel), got "
                         f"{group_size!r}")
    _check_group(k, group_size, f"{func}: group_size for {name} {list(w.shape)}", "the")
    scale_dtype = _check_scale_dtype(func, scale_dtype)
    compute = torch.float64 if torch.float64 in (w.dtype, scale_dtype) else torch.float32
    groups = k // group_size
    rows_w = w.reshape(-1, k)
    grouped = rows_w.reshape(-1, groups, group_size)
    amax = grouped.abs().amax(dim=-1)  # exact in w's dtype
    _check_finite(func, "FP8", name, w, rows_w, group_size, amax)
    amax = amax.to(torch.float64)
    shape = list(w.shape)

    def where(row: int, group: int) -> str:
        return _where(name, shape, row, group * group_size, (group + 1) * group_size - 1)

    scale = _stored_scale(func, where, amax / FP8_E4M3_MAX, amax, scale_dtype)
    out = torch.empty(rows_w.shape[0], k, dtype=FP8_DTYPE, device=w.device)
    scale_c = scale.to(compute).unsqueeze(-1)
    step = max(1, _CHUNK_ELEMENTS // k)
    for begin in range(0, rows_w.shape[0], step):
        end = begin + step
        chunk = grouped[begin:end].to(compute) / scale_c[begin:end]
        out[begin:end] = _to_e4m3(chunk).flatten(-2)
    lead = w.shape[:-1]
    scales = scale.view(*lead, groups).transpose(-1, -2).contiguous()
    return out.view(w.shape), scales


# ------------------------------------------------------------------ 128x128 block scales


def _block_pair(block: object) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block must be a pair of positive ints (rows of N, columns of K), got "
                         f"{block!r}")
    return int(block[0]), int(block[1])


def expand_block_scales(
    scale_inv: torch.Tensor,
    n: int,
    k: int,
    block: tuple[int, int] = DEEPSEEK_BLOCK,
    *,
    group_size: int | None = None,
    name: str = "scale_inv",
) -> torch.Tensor:
    """Block scales (DeepSeek-V3 / Qwen3-FP8 ``weight_scale_inv``, compressed-tensors'
    ``block`` strategy) -> the kernels' per-(K-group, column) scales.

    A weight ``[N, K]`` quantised in blocks of ``block = (bn, bk)`` has one scale per block,
    ``scale_inv [ceil(N/bn), ceil(K/bk)]`` (the last block row/column may be partial), and
    ``W[n, k] = v[n, k] * scale_inv[n // bn, k // bk]``. The kernels' scales are per column and
    K-group: ``out[g, n] = scale_inv[n // bn, (g * G) // bk]``, an exact copy.

    Args:
        scale_inv: ``[.., ceil(N/bn), ceil(K/bk)]``, float (float32 in checkpoints; other float
            dtypes are converted to float32, exactly for 16-bit ones).
        n, k: the weight's ``N`` and ``K``.
        block: ``(bn, bk)``; DeepSeek's is ``(128, 128)``.
        group_size: the kernels' ``G``; default ``bk``, which needs ``K % bk == 0``. Any
            multiple of 32 dividing both ``bk`` and ``K`` expresses the same weights (e.g.
            ``32`` for a ``K`` that is a multiple of 32 but not of 128), with more scale rows.
        name: what ``scale_inv`` is called in error messages.

    Returns:
        ``float32 [.., K/G, N]``, contiguous, on ``scale_inv``'s device.

    Raises:
        ValueError: ``scale_inv``'s dtype or shape does not match ``N``, ``K`` and ``block``;
            ``K`` is not a multiple of ``G`` (the message says which group sizes would do);
            ``G`` does not divide ``bk`` or is not a multiple of 32.
    """
    func = "expand_block_scales"
    bn, bk = _block_pair(block)
    for label, v in (("n", n), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{func}: {label} must be a positive int, got {v!r}")
    if not isinstance(scale_inv, torch.Tensor) or scale_inv.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{func}: {name} must be a float tensor (float32), got "
                         f"{_describe(scale_inv)}")
    rows, cols = -(-n // bn), -(-k // bk)
    if scale_inv.dim() < 2 or tuple(scale_inv.shape[-2:]) != (rows, cols):
        raise ValueError(
            f"{func}: {name} must be [..., ceil(N/{bn}), ceil(K/{bk})] = [..., {rows}, {cols}] "
            f"for a [{n}, {k}] weight, got {list(scale_inv.shape)}")
    group = bk if group_size is None else group_size
    if (not isinstance(group, int) or isinstance(group, bool) or group <= 0
            or group % FP8_GROUP_MULTIPLE or bk % group or k % group):
        finest = math.gcd(bk, k)  # every usable G divides it
        hint = (f"; group_size={finest} expresses the same weights"
                if finest % FP8_GROUP_MULTIPLE == 0 else
                f"; no multiple of {FP8_GROUP_MULTIPLE} divides both, so these weights cannot be "
                "served as they are (dequantise, or requantise group-wise)")
        need = f" (K must be a multiple of {bk} for the default G = {bk})" if (
            group_size is None) else ""
        raise ValueError(
            f"{func}: {name} ({bn}x{bk} blocks) of a [{n}, {k}] weight: the kernels' group size "
            f"G = {group!r} must be a multiple of {FP8_GROUP_MULTIPLE} dividing both the block "
            f"width {bk} and K = {k}{need}{hint}")
    scale = scale_inv.to(torch.float32)
    col = torch.arange(n, device=scale.device) // bn  # block row of each output column n
    kgroup = torch.arange(k // group, device=scale.device) * group // bk  # block of each group
    picked = scale.index_select(-2, col)  # [.., N, ceil(K/bk)]
    picked = picked.index_select(-1, kgroup)  # [.., N, K/G]
    return picked.transpose(-1, -2).contiguous()


def quantize_fp8_blockwise(
    w: torch.Tensor,
    block: tuple[int, int] = DEEPSEEK_BLOCK,
    *,
    name: str = "weights",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 block quantization as DeepSeek-V3 / Qwen3-FP8 checkpoints store it.

    ``w [.., N, K]`` is cut into ``bn x bk`` blocks (the last block row/column partial when
    ``N``/``K`` are not multiples); each block gets ``scale_inv = max(|w|) / 448`` (a float32,
    raised by one step where rounding went below that; 1 for an all-zero block), and
    ``v = e4m3(clamp(w / scale_inv, -448, 448))`` (round to nearest even, float32 division).
    ``W = v * scale_inv`` (per block), with the error bound of :func:`quantize_fp8_groupwise`.

    Args:
        w: floating-point ``[N, K]`` or ``[E, N, K]``, any device.
        block: ``(bn, bk)``; default ``(128, 128)``.
        name: what ``w`` is called in error messages.

    Returns:
        ``(weights float8_e4m3fn [.., N, K], scale_inv float32 [.., ceil(N/bn), ceil(K/bk)])``
        (the checkpoint's ``weight`` and ``weight_scale_inv``; :func:`expand_block_scales`
        gives the kernel's scales).

    Raises:
        ValueError: a bad ``w`` or ``block``, or a block holding NaN or inf (naming the expert,
            row and k range).
    """
    func = "quantize_fp8_blockwise"
    bn, bk = _block_pair(block)
    w = _float_weights(func, w, name, (2, 3))
    *lead, n, k = w.shape
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.abs(), (0, cols * bk - k, 0, rows * bn - n))
    blocks = padded.reshape(*lead, rows, bn, cols, bk)
    amax = blocks.amax(dim=(-3, -1))  # [.., rows, cols]
    if not bool(torch.isfinite(amax).all()):
        rows_w = w.reshape(-1, k)
        bad = ~torch.isfinite(rows_w)
        row, kk = torch.nonzero(bad)[0].tolist()
        what = "NaN" if bool(torch.isnan(rows_w[row, kk])) else "inf"
        others = int(bad.any(dim=1).sum()) - 1
        more = f" (and {others} more row{'s' if others > 1 else ''})" if others else ""
        raise ValueError(f"{func}: {_where(name, w.shape, row, kk, kk)} holds {what}{more}; FP8 "
                         "weights need finite values (check the checkpoint, or the conversion "
                         "that produced it)")
    amax = amax.to(torch.float64)
    shape = list(w.shape)

    def where(*index: int) -> str:
        r, c = index[-2:]
        prefix = f"expert {index[0]}, " if len(index) == 3 else ""
        return (f"{prefix}rows {r * bn}..{min(n, (r + 1) * bn) - 1}, k "
                f"{c * bk}..{min(k, (c + 1) * bk) - 1} of {name} {shape}")

    scale = _stored_scale(func, where, amax / FP8_E4M3_MAX, amax, torch.float32)
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    per_element = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)
    per_element = per_element[..., :k]
    out = _to_e4m3(w.to(compute) / per_element.to(compute))
    return out.contiguous(), scale.contiguous()


# ------------------------------------------------------------------ a whole MoE layer


def check_fp8_layer(
    fc1_weights: torch.Tensor,
    fc2_weights: torch.Tensor,
    quant_scales: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> tuple[int, int]:
    """Checks an FP8 MoE layer against the kernel layout; returns ``(G1, G2)``.

    ``fc1_weights`` ``float8_e4m3fn [E, N1, H]``, ``fc2_weights`` ``[E, H, I]``,
    ``quant_scales`` ``[s1 float32 [E, H/G1, N1], s2 float32 [E, I/G2, H]]``; ``H`` and ``I``
    multiples of 32, ``N1`` and ``H`` multiples of 8; group sizes multiples of 32 dividing K,
    or K. Only shapes and dtypes are read (the weights' values are not scanned for NaN codes:
    :func:`check_no_fp8_nan` does that).

    Raises:
        ValueError: the first rule broken, naming the tensor.
    """
    func = "check_fp8_layer"
    for label, w in (("fc1_weights [E, N1, H]", fc1_weights), ("fc2_weights [E, H, I]",
                                                               fc2_weights)):
        if not isinstance(w, torch.Tensor) or w.dtype != FP8_DTYPE:
            raise ValueError(f"{func}: {label.split()[0]} must be float8_e4m3fn, got "
                             f"{_describe(w)}")
        if w.dim() != 3:
            raise ValueError(f"{func}: {label} must be 3-D, got {list(w.shape)}")
    num_experts, n1, hidden = fc1_weights.shape
    inter = fc2_weights.shape[2]
    if fc2_weights.shape[0] != num_experts or fc2_weights.shape[1] != hidden:
        raise ValueError(f"{func}: fc2_weights must be [E, H, I] = [{num_experts}, {hidden}, I] "
                         f"for fc1_weights {list(fc1_weights.shape)}, got "
                         f"{list(fc2_weights.shape)}")
    for label, size, align in (("H", hidden, FP8_K_ALIGNMENT), ("I", inter, FP8_K_ALIGNMENT),
                               ("N1 (fc1's rows)", n1, FP8_N_ALIGNMENT)):
        if size % align:
            raise ValueError(f"{func}: {label} = {size} must be a multiple of {align}")
    if not isinstance(quant_scales, (list, tuple)) or len(quant_scales) != 2:
        got = (f"{len(quant_scales)} tensors" if isinstance(quant_scales, (list, tuple))
               else _describe(quant_scales))
        raise ValueError(f"{func}: quant_scales must be [fc31_scales, fc2_scales] (FP8 weights "
                         f"have no zero points), got {got}")
    groups = []
    for s, (label, k, n) in zip(quant_scales, (("fc31_scales", hidden, n1),
                                               ("fc2_scales", inter, hidden))):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            raise ValueError(f"{func}: {label} must be float32, got {_describe(s)}")
        if s.dim() != 3 or s.shape[0] != num_experts or s.shape[2] != n:
            raise ValueError(f"{func}: {label} must be [E, K/G, N] = [{num_experts}, {k}/G, "
                             f"{n}], got {list(s.shape)}")
        groups.append(group_size_of(k, s, name=f"{func}: {label}"))
    return groups[0], groups[1]


def quantize_moe_weights_fp8(
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    group_size: int | None | tuple[int | None, int | None] = 128,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Quantises both expert weights of an MoE layer for ``use_fp8_woq_group_scaling=True``.

    Args:
        fc1_expert_weights: ``[E, 2I, H]`` (rows up, then gate) or ``[E, I, H]``, floating point.
        fc2_expert_weights: ``[E, H, I]``, floating point.
        group_size: ``G`` for both GEMMs, or a pair ``(G1, G2)``; ``None`` is per-channel (see
            :func:`quantize_fp8_groupwise`).

    Returns:
        ``(fc1 float8_e4m3fn, fc2 float8_e4m3fn, [s1 float32 [E, H/G1, N1], s2 float32
        [E, I/G2, H]])``.

    Raises:
        ValueError: as :func:`quantize_fp8_groupwise`, or the layer breaks
            :func:`check_fp8_layer`'s rules (e.g. ``H`` not a multiple of 32).
    """
    g1, g2 = _pair(group_size)
    q1, s1 = quantize_fp8_groupwise(fc1_expert_weights, g1, name="fc1_expert_weights")
    q2, s2 = quantize_fp8_groupwise(fc2_expert_weights, g2, name="fc2_expert_weights")
    check_fp8_layer(q1, q2, [s1, s2])
    return q1, q2, [s1, s2]
