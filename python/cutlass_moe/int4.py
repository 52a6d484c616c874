"""Int4 group-wise weight-only quantization (W4A16) of MoE expert weights: the kernel layout,
packing, quantisation and dequantisation.

Kernel layout (the fixed contract of the W4A16 kernels). A linear layer's weight ``W [N, K]``
(``N`` output rows, ``K`` the contiguous input dimension) is stored as:

- ``packed``: ``torch.uint8 [N, K/2]``; byte ``j`` of row ``n`` holds ``k = 2j`` in its LOW
  nibble and ``k = 2j+1`` in its HIGH nibble; nibble values ``q`` are unsigned, ``0..15``;
- ``scales``: ``[K/G, N]`` (N contiguous, one row per K-group of ``G`` elements), in the
  activation dtype (float16/bfloat16) for the kernels;
- ``zeros`` (optional, "asymmetric"): like ``scales``; usually integers ``0..15``, but any value
  is allowed. Without zeros ("symmetric") the zero point is ``8``.

The weight the kernels compute with is ::

    W[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n]

formed in float32 (exact for integer zeros: a 5-bit integer times a 16-bit float) and rounded
once to the activation dtype (:func:`dequantize_int4`).

The group size ``G`` is a multiple of 32 that divides ``K`` (32, 64 and 128 are the usual ones)
or ``K`` itself ("per-channel": ``scales [1, N]``). It is never passed separately: it is
``K / scales.shape[-2]`` (:func:`group_size_of`). The kernels further need ``K % 32 == 0`` and
``N % 8 == 0`` (:data:`INT4_K_ALIGNMENT`, :data:`INT4_N_ALIGNMENT`).

An MoE layer (:func:`cutlass_moe.cutlass_fused_moe` with ``use_w4_group_scaling=True``) takes
fc1 weights ``uint8 [E, N1, H/2]`` (rows up, then gate, for gated activations; ``N1 = 2I`` or
``I``), fc2 weights ``uint8 [E, H, I/2]``, and ``quant_scales=[s1 [E, H/G1, N1], s2 [E, I/G2,
H]]`` or, asymmetric, ``[s1, s2, z1, z2]`` with zeros shaped like their scales.
:func:`quantize_moe_weights_int4` produces them from float weights, and
:mod:`cutlass_moe.int4_checkpoints` from GPTQ, AWQ and compressed-tensors checkpoints.

Everything here is plain torch and works on CPU and GPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .quantization import _BITS_AS_INT, _CHUNK_ELEMENTS, _FLOAT_DTYPES

#: K (the contiguous weight dimension, H for fc1 and I for fc2) must be a multiple of this.
INT4_K_ALIGNMENT = 32
#: N (output rows per expert: 2I or I for fc1, H for fc2) must be a multiple of this.
INT4_N_ALIGNMENT = 8
#: A group size other than K (per-channel) must be a multiple of this.
INT4_GROUP_MULTIPLE = 32
#: The zero point of symmetric int4 weights: ``q = signed value + 8``.
INT4_SYMMETRIC_ZERO = 8
#: Largest nibble value.
INT4_MAX = 15

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _describe(x: object) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


# ------------------------------------------------------------------ nibbles


def pack_int4(q: torch.Tensor, *, name: str = "q") -> torch.Tensor:
    """Packs int4 values ``q [..., K]`` (integers ``0..15``) two per byte: ``uint8 [..., K/2]``
    with ``k = 2j`` in the low nibble of byte ``j`` and ``k = 2j+1`` in its high nibble.

    Args:
        q: any integer dtype (typically uint8), at least 1-D, with an even last dimension and
            every value in ``0..15``; any device.
        name: what ``q`` is called in error messages.

    Returns:
        A new contiguous ``uint8 [..., K/2]`` tensor on ``q``'s device. Inverse:
        :func:`unpack_int4`.

    Raises:
        ValueError: ``q`` is not an integer tensor, is 0-D, has an odd last dimension or holds
            a value outside ``0..15`` (the message names ``name`` and the offending value).
    """
    if not isinstance(q, torch.Tensor) or q.dtype not in _INT_DTYPES:
        raise ValueError(f"pack_int4: {name} must be an integer tensor of values 0..15 "
                         f"(typically uint8), got {_describe(q)}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: {name} [..., K] must have an even K (two values per "
                         f"byte), got shape {list(q.shape)}")
    if q.numel():
        low, high = int(q.min()), int(q.max())
        if low < 0 or high > INT4_MAX:
            bad = low if low < 0 else high
            raise ValueError(f"pack_int4: {name} holds {bad}; int4 values must lie in 0..15 "
                             "(add 8 to signed values in -8..7)")
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _as_bytes(packed: object, where: str, name: str, what: str = "packed int4 pairs"
              ) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor) or packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"{where}: {name} must be a uint8 tensor of {what} (int8 is read as its "
                         f"bytes), got {_describe(packed)}")
    return packed.view(torch.uint8) if packed.dtype == torch.int8 else packed


def _packed_layer_shape(func: str, fc1_weights: object, fc2_weights: object, what: str,
                       k_alignment: int, n_alignment: int) -> tuple[int, int, int, int]:
    """``(E, N1, H, I)`` of an MoE layer's packed 4-bit weights (int4 or MXFP4: two codes per
    byte along K) ``fc1 [E, N1, H/2]`` and ``fc2 [E, H, I/2]``, checked: uint8 (or int8) bytes,
    3-D, matching E and H, H and I multiples of ``k_alignment`` and N1 of ``n_alignment``.
    ValueErrors start with ``func``."""
    w1 = _as_bytes(fc1_weights, func, "fc1_weights", what)
    w2 = _as_bytes(fc2_weights, func, "fc2_weights", what)
    for label, w in (("fc1_weights [E, N1, H/2]", w1), ("fc2_weights [E, H, I/2]", w2)):
        if w.dim() != 3:
            raise ValueError(f"{func}: {label} must be 3-D, got {list(w.shape)}")
    num_experts, n1, hidden, inter = w1.shape[0], w1.shape[1], 2 * w1.shape[2], 2 * w2.shape[2]
    if w2.shape[0] != num_experts or w2.shape[1] != hidden:
        raise ValueError(f"{func}: fc2_weights must be [E, H, I/2] = [{num_experts}, {hidden}, "
                         f"I/2] for fc1_weights {list(w1.shape)}, got {list(w2.shape)}")
    for label, size, align in (("H", hidden, k_alignment), ("I", inter, k_alignment),
                               ("N1 (fc1's rows)", n1, n_alignment)):
        if size % align:
            raise ValueError(f"{func}: {label} = {size} must be a multiple of {align}")
    return num_experts, n1, hidden, inter


def unpack_int4(packed: torch.Tensor, *, name: str = "packed") -> torch.Tensor:
    """The int4 values ``uint8 [..., K]`` (``0..15``) of ``packed [..., K/2]``: the inverse of
    :func:`pack_int4` (``k = 2j`` from the low nibble of byte ``j``, ``k = 2j+1`` from its
    high nibble).

    Args:
        packed: ``uint8 [..., K/2]`` (``int8`` is accepted and read as its bytes), at least
            1-D, any device.
        name: what ``packed`` is called in error messages.

    Raises:
        ValueError: ``packed`` is not a uint8/int8 tensor or is 0-D.
    """
    packed = _as_bytes(packed, "unpack_int4", name)
    if packed.dim() == 0:
        raise ValueError(f"unpack_int4: {name} must be [..., K/2], got a 0-d tensor")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------ groups


def _check_group(k: int, group_size: int, name: str, what: str) -> None:
    if group_size == k:
        return
    if group_size % INT4_GROUP_MULTIPLE or k % group_size:
        raise ValueError(
            f"{name}: {what} group size G = {group_size} is not supported for K = {k}: G must "
            f"be a multiple of {INT4_GROUP_MULTIPLE} that divides K (32, 64, 128, ...), or K "
            "itself (per-channel)")


def group_size_of(k: int, scales: torch.Tensor, *, name: str = "scales") -> int:
    """The group size ``G = K / scales.shape[-2]`` of int4 ``scales [..., K/G, N]``.

    Args:
        k: the weight's ``K`` (its input dimension, twice the packed last dimension).
        scales: ``[..., K/G, N]`` (only the shape is read).
        name: what ``scales`` is called in error messages (e.g. ``"fc2 scales"``).

    Returns:
        ``G``: a multiple of 32 dividing ``K``, or ``K`` (per-channel, ``scales [..., 1, N]``).

    Raises:
        ValueError: ``scales`` is not a tensor of at least 2 dimensions, its group count is 0 or
            does not divide ``K``, or the resulting ``G`` is neither a multiple of 32 nor ``K``
            (the message names ``name``, its shape and ``K``).
    """
    if not isinstance(scales, torch.Tensor) or scales.dim() < 2:
        got = list(scales.shape) if isinstance(scales, torch.Tensor) else _describe(scales)
        raise ValueError(f"{name} must be [..., K/G, N] (one row per group of G input "
                         f"elements), got {got}")
    groups = scales.shape[-2]
    if k <= 0 or groups == 0 or k % groups:
        raise ValueError(
            f"{name} [..., K/G, N] = {list(scales.shape)}: {groups} groups do not divide K = {k} "
            "into whole groups")
    group_size = k // groups
    _check_group(k, group_size, f"{name} [..., K/G, N] = {list(scales.shape)}",
                 f"K / {groups} groups:")
    return group_size


# ------------------------------------------------------------------ dequantisation


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(q - z) * s``: the weights the int4 kernels compute with (for references).

    Args:
        packed: the kernel layout, ``uint8 [N, K/2]`` or ``[E, N, K/2]`` (int8 is read as its
            bytes).
        scales: ``[K/G, N]`` or ``[E, K/G, N]`` (as ``packed``), any float dtype; ``G`` is
            ``K / scales.shape[-2]`` (:func:`group_size_of`).
        zeros: optional, shaped like ``scales``; ``None`` means symmetric (``z = 8``).
        dtype: result dtype; default ``scales.dtype``. The value is formed in float32
            (float64 when ``scales``, ``zeros`` or ``dtype`` is float64) and rounded once.

    Returns:
        ``[N, K]`` or ``[E, N, K]`` of ``dtype`` on ``packed``'s device (K contiguous, like
        16-bit expert weights).

    Raises:
        ValueError: a dtype or shape does not match the above (the message names the argument).
    """
    packed = _as_bytes(packed, "dequantize_int4", "packed")
    if packed.dim() not in (2, 3):
        raise ValueError(f"dequantize_int4: packed must be [N, K/2] or [E, N, K/2], got shape "
                         f"{list(packed.shape)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_int4: scales must be a float tensor, got "
                         f"{_describe(scales)}")
    n, k = packed.shape[-2], 2 * packed.shape[-1]
    lead = list(packed.shape[:-2])
    if scales.dim() != packed.dim() or list(scales.shape[:-2]) != lead or scales.shape[-1] != n:
        want = f"[E, K/G, N] = [{lead[0]}, K/G, {n}]" if lead else f"[K/G, N] = [K/G, {n}]"
        raise ValueError(f"dequantize_int4: scales must be {want} for packed "
                         f"{list(packed.shape)}, got {list(scales.shape)}")
    group = group_size_of(k, scales, name="dequantize_int4: scales")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype not in _FLOAT_DTYPES + _INT_DTYPES:
            raise ValueError(f"dequantize_int4: zeros must be a tensor, got {_describe(zeros)}")
        if zeros.shape != scales.shape:
            raise ValueError(f"dequantize_int4: zeros must have the shape of scales "
                             f"{list(scales.shape)}, got {list(zeros.shape)}")
    dtype = scales.dtype if dtype is None else dtype
    wide = torch.float64 in (dtype, scales.dtype, zeros.dtype if zeros is not None else None)
    compute = torch.float64 if wide else torch.float32
    if packed.dim() == 3:  # one expert at a time: float temporaries of one [N, K] matrix
        out = torch.empty(*lead, n, k, dtype=dtype, device=packed.device)
        for e in range(lead[0]):
            out[e] = _dequantize_2d(packed[e], scales[e], None if zeros is None else zeros[e],
                                    group, compute)
        return out
    return _dequantize_2d(packed, scales, zeros, group, compute).to(dtype)


def _dequantize_2d(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group: int, compute: torch.dtype) -> torch.Tensor:
    """``(q - z) * s`` of one ``[N, K/2]`` matrix, in ``compute``."""
    q = unpack_int4(packed).to(compute).unflatten(-1, (-1, group))  # [N, K/G, G]
    s = scales.to(compute).t().unsqueeze(-1)  # [N, K/G, 1]
    z = (torch.full((), INT4_SYMMETRIC_ZERO, dtype=compute, device=packed.device)
         if zeros is None else zeros.to(compute).t().unsqueeze(-1))
    return ((q - z) * s).flatten(-2)


# ------------------------------------------------------------------ quantisation


def _where(name: str, shape: torch.Size, row: int, group: int, group_size: int) -> str:
    """``"expert 3, row 17, k 128..255 of fc1 [E, N, K] = [...]"`` (or ``[N, K]``)."""
    ks = f"k {group * group_size}..{(group + 1) * group_size - 1}"
    if len(shape) == 3:
        e, n = divmod(row, shape[1])
        return f"expert {e}, row {n}, {ks} of {name} [E, N, K] = {list(shape)}"
    return f"row {row}, {ks} of {name} [N, K] = {list(shape)}"


def _check_groups(name: str, w: torch.Tensor, rows_w: torch.Tensor, group_size: int,
                  hi: torch.Tensor, lo: torch.Tensor) -> None:
    """ValueError naming the first group holding NaN or inf (its scale would be NaN/inf)."""
    bad = ~(torch.isfinite(hi) & torch.isfinite(lo))
    if bool(bad.any()):
        where = torch.nonzero(bad)
        row, group = where[0].tolist()
        values = rows_w[row, group * group_size:(group + 1) * group_size]
        what = "NaN" if bool(torch.isnan(values).any()) else "inf"
        others = int(bad.any(dim=1).sum()) - 1
        more = f" (and {others} more row{'s' if others > 1 else ''})" if others else ""
        raise ValueError(
            f"quantize_int4_groupwise: {_where(name, w.shape, row, group, group_size)} holds "
            f"{what}{more}; int4 weights need finite values (check the checkpoint, or the "
            "conversion that produced it)")


def _stored_scale(name: str, w: torch.Tensor, group_size: int, exact: torch.Tensor,
                  fits: Callable[[torch.Tensor], torch.Tensor],
                  scale_dtype: torch.dtype) -> torch.Tensor:
    """``exact`` (float64 per group) rounded to the nearest ``scale_dtype`` value, raised by one
    step where ``fits(stored)`` is False (the rounding went down too far for the error bound),
    and 1 for all-zero groups."""
    scale = exact.to(scale_dtype)
    overflow = ~torch.isfinite(scale)
    if bool(overflow.any()):
        row, group = torch.nonzero(overflow)[0].tolist()
        raise ValueError(
            f"quantize_int4_groupwise: the scale of {_where(name, w.shape, row, group, group_size)}"
            f" ({float(exact[row, group]):.6g}) overflows {scale_dtype}; pass a wider scale_dtype")
    # Scales are >= 0, so the next representable value up is the bit pattern plus one.
    bits = scale.view(_BITS_AS_INT[scale_dtype])
    scale = torch.where(fits(scale.to(torch.float64)), scale, (bits + 1).view(scale_dtype))
    return torch.where(exact == 0, torch.ones((), dtype=scale_dtype, device=scale.device), scale)


def quantize_int4_groupwise(
    w: torch.Tensor,
    group_size: int | None = 128,
    symmetric: bool = True,
    *,
    scale_dtype: torch.dtype | None = None,
    name: str = "weights",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4 quantization of ``w [N, K]`` or ``[E, N, K]`` into the kernel layout.

    Each row is cut into ``K/G`` groups of ``G`` consecutive elements; each group gets its own
    scale (and, asymmetric, zero point). ``round`` is round-to-nearest (ties to even). The scale
    is rounded to ``scale_dtype`` first and the group is quantised against the *stored* scale,
    which gives ``|w - (q - z) * s| <= s/2`` element-wise (up to float32 rounding of the
    division; the dequantised value before its rounding to a 16-bit dtype).

    Symmetric (``zeros`` is None, ``z = 8``)::

        s = max(max(w) / 7, -min(w) / 8)             (over the group; 0 counts as neither)
        q = clamp(round(w / s), -8, 7) + 8

    i.e. the largest positive value maps to at most +7 and the most negative to at least -8, so
    the full signed range is used on the side that needs it and nothing is clipped.

    Asymmetric (``zeros`` returned)::

        lo = min(min(w), 0), hi = max(max(w), 0)    (0 is always representable)
        s = (hi - lo) / 15                           (rounded UP to scale_dtype, see below)
        z = clamp(round(-lo / s), 0, 15)
        q = clamp(round(w / s) + z, 0, 15)

    The symmetric scale is rounded to the nearest ``scale_dtype`` value, and raised by one
    representable step where that rounding went down far enough to break the ``s/2`` bound
    (subnormal scales only: a normal one maps the extremes to at most 7.03 and 8.04). The
    asymmetric scale is rounded up (``(hi - lo) / s <= 15``): with a smaller one, ``z`` rounded
    by up to half a step could leave ``hi`` more than half a step beyond ``15 - z``. An all-zero
    group gets scale 1 (and ``q = z``): never 0, so nothing divides by zero and the dequantised
    group is exactly 0.

    Args:
        w: floating-point weights ``[N, K]`` or ``[E, N, K]`` (one ``[N, K]`` matrix per
            expert, K contiguous), on any device. ``K`` must be even; with a group size other
            than ``K`` it is a multiple of that group size.
        group_size: ``G``: a multiple of 32 dividing ``K`` (32, 64, 128, ...), or ``None`` or
            ``K`` for per-channel scales (one group per row).
        symmetric: symmetric (no zeros) or asymmetric (zero points) quantisation.
        scale_dtype: dtype of the returned scales and zeros. Default: ``w.dtype`` — for
            float16/bfloat16 weights that is the activation dtype the kernels want; float32
            (float64) weights keep float32 (float64) scales, for references and offline work.
            To feed the kernels from float32 weights pass the activation dtype here: the scale
            is rounded to it *before* the weights are quantised against it, which keeps the
            ``s/2`` bound (converting float32 scales afterwards would not).
        name: what ``w`` is called in error messages (e.g. ``"fc1_expert_weights"``).

    Returns:
        ``(packed, scales, zeros)``: ``packed`` ``uint8 [.., N, K/2]``; ``scales``
        ``[.., K/G, N]`` of ``scale_dtype``, positive and finite; ``zeros`` ``[.., K/G, N]`` of
        ``scale_dtype`` holding integers ``0..15`` (asymmetric) or ``None`` (symmetric). All
        contiguous, on ``w``'s device. :func:`dequantize_int4` inverts them.

    Raises:
        ValueError: ``w`` is not a 2-D/3-D floating-point tensor, ``K`` is 0 or odd,
            ``group_size`` is not supported for ``K``, ``scale_dtype`` is not a floating-point
            dtype, a group holds NaN or inf (the message names the expert, row and k range, and
            how many other rows do), or a scale overflows ``scale_dtype``.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_int4_groupwise: {name} must be float16/bfloat16/float32/"
                         f"float64 weights, got {_describe(w)}")
    if w.dim() not in (2, 3) or w.shape[-1] == 0 or w.shape[-1] % 2:
        raise ValueError(f"quantize_int4_groupwise: {name} must be [N, K] or [E, N, K] with an "
                         f"even K >= 2, got shape {list(w.shape)}")
    k = w.shape[-1]
    group_size = k if group_size is None else group_size
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"quantize_int4_groupwise: group_size must be a positive int or None "
                         f"(per-channel), got {group_size!r}")
    _check_group(k, group_size, f"quantize_int4_groupwise: group_size for {name} "
                 f"{list(w.shape)}", "the")
    scale_dtype = w.dtype if scale_dtype is None else scale_dtype
    if scale_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_int4_groupwise: scale_dtype must be float16, bfloat16, "
                         f"float32 or float64, got {scale_dtype}")
    compute = torch.float64 if torch.float64 in (w.dtype, scale_dtype) else torch.float32
    groups = k // group_size
    w = w.detach()
    rows_w = w.reshape(-1, k)
    # Per-group extremes, exact in w's dtype; the scale arithmetic in float64.
    grouped = rows_w.reshape(-1, groups, group_size)
    hi, lo = grouped.amax(dim=-1), grouped.amin(dim=-1)
    _check_groups(name, w, rows_w, group_size, hi, lo)
    pos = hi.to(torch.float64).clamp_min(0)
    neg = -(lo.to(torch.float64).clamp_max(0))
    if symmetric:
        exact = torch.maximum(pos / 7, neg / 8)
        scale = _stored_scale(name, w, group_size, exact,
                              lambda s: (s * 7.5 >= pos) & (s * 8.5 >= neg), scale_dtype)
        zero = torch.full_like(exact, INT4_SYMMETRIC_ZERO)
    else:
        span = pos + neg
        scale = _stored_scale(name, w, group_size, span / INT4_MAX,
                              lambda s: s * INT4_MAX >= span, scale_dtype)
        zero = (neg / scale.to(torch.float64)).round_().clamp_(0, INT4_MAX)
    # Rows in chunks: the division needs a temporary of `compute` per element, which for a
    # whole model layer (Mixtral fc1: 940 M weights) would be several GB next to the model.
    packed = torch.empty(rows_w.shape[0], k // 2, dtype=torch.uint8, device=w.device)
    scale_c, zero_c = scale.to(compute).unsqueeze(-1), zero.to(compute).unsqueeze(-1)
    step = max(1, _CHUNK_ELEMENTS // k)
    for begin in range(0, rows_w.shape[0], step):
        end = begin + step
        chunk = grouped[begin:end].to(compute) / scale_c[begin:end]
        chunk = chunk.round_().add_(zero_c[begin:end]).clamp_(0, INT4_MAX)
        q = chunk.to(torch.uint8).flatten(-2)
        packed[begin:end] = q[:, 0::2] | (q[:, 1::2] << 4)
    lead = w.shape[:-1]
    scales = scale.view(*lead, groups).transpose(-1, -2).contiguous()
    zeros = None if symmetric else zero.to(scale_dtype).view(*lead, groups).transpose(-1, -2)
    return (packed.view(*lead, k // 2), scales,
            None if zeros is None else zeros.contiguous())


# ------------------------------------------------------------------ a whole MoE layer


def check_int4_layer(
    fc1_weights: torch.Tensor,
    fc2_weights: torch.Tensor,
    quant_scales: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> tuple[int, int]:
    """Checks an int4 MoE layer against the kernel layout; returns ``(G1, G2)``.

    ``fc1_weights`` ``uint8 [E, N1, H/2]``, ``fc2_weights`` ``uint8 [E, H, I/2]`` (int8 is
    accepted), ``quant_scales`` ``[s1 [E, H/G1, N1], s2 [E, I/G2, H]]`` or
    ``[s1, s2, z1, z2]`` (zeros shaped like their scales), all scales and zeros of one
    float16/bfloat16 dtype; ``H`` and ``I`` multiples of 32, ``N1`` and ``H`` multiples of 8,
    group sizes as :func:`group_size_of` says. Only shapes and dtypes are read (a cheap load-time
    check; :func:`cutlass_moe.cutlass_fused_moe` checks the same, and devices, per call).

    Raises:
        ValueError: the first rule broken, naming the tensor.
    """
    return _check_layer(fc1_weights, fc2_weights, quant_scales, (torch.float16, torch.bfloat16))


def _check_layer(fc1_weights, fc2_weights, quant_scales, scale_dtypes) -> tuple[int, int]:
    num_experts, n1, hidden, inter = _packed_layer_shape(
        "check_int4_layer", fc1_weights, fc2_weights, "packed int4 pairs", INT4_K_ALIGNMENT,
        INT4_N_ALIGNMENT)
    if not isinstance(quant_scales, (list, tuple)) or len(quant_scales) not in (2, 4):
        raise ValueError("check_int4_layer: quant_scales must be [fc31_scales, fc2_scales] or "
                         "[fc31_scales, fc2_scales, fc31_zeros, fc2_zeros]")
    wanted = "/".join(str(d).removeprefix("torch.") for d in scale_dtypes)
    groups = []
    for i, (label, k, n) in enumerate((("fc31_scales", hidden, n1),
                                       ("fc2_scales", inter, hidden))):
        s = quant_scales[i]
        if not isinstance(s, torch.Tensor) or s.dtype not in scale_dtypes:
            raise ValueError(f"check_int4_layer: {label} must be {wanted} (the activation "
                             f"dtype), got {_describe(s)}")
        if s.dim() != 3 or s.shape[0] != num_experts or s.shape[2] != n:
            raise ValueError(f"check_int4_layer: {label} must be [E, K/G, N] = [{num_experts}, "
                             f"{k}/G, {n}], got {list(s.shape)}")
        groups.append(group_size_of(k, s, name=f"check_int4_layer: {label}"))
        if s.dtype != quant_scales[0].dtype:
            raise ValueError(f"check_int4_layer: {label} is {s.dtype} but fc31_scales is "
                             f"{quant_scales[0].dtype}; use one dtype")
        if len(quant_scales) == 4:
            z = quant_scales[2 + i]
            zlabel = label.replace("scales", "zeros")
            if not isinstance(z, torch.Tensor) or z.dtype != s.dtype or z.shape != s.shape:
                got = (f"{z.dtype} {list(z.shape)}" if isinstance(z, torch.Tensor)
                       else _describe(z))
                raise ValueError(f"check_int4_layer: {zlabel} must match {label} ({s.dtype} "
                                 f"{list(s.shape)}), got {got}")
    return groups[0], groups[1]


def _pair(group_size: int | None | tuple[int | None, int | None]) -> tuple:
    if isinstance(group_size, tuple):
        if len(group_size) != 2:
            raise ValueError(f"group_size must be an int, None or a pair (fc1, fc2), got "
                             f"{group_size!r}")
        return group_size
    return group_size, group_size


def quantize_moe_weights_int4(
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    group_size: int | None | tuple[int | None, int | None] = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Quantises both expert weights of an MoE layer for ``use_w4_group_scaling=True``.

    Args:
        fc1_expert_weights: ``[E, 2I, H]`` (rows up, then gate) or ``[E, I, H]``, floating point.
        fc2_expert_weights: ``[E, H, I]``, floating point.
        group_size: ``G`` for both GEMMs, or a pair ``(G1, G2)``; ``None`` is per-channel (see
            :func:`quantize_int4_groupwise`).
        symmetric: without (True) or with zero points.
        scale_dtype: see :func:`quantize_int4_groupwise` (pass the activation dtype for float32
            weights).

    Returns:
        ``(fc1_packed, fc2_packed, quant_scales)``: the kernel layout and the ``quant_scales``
        list for :func:`cutlass_moe.cutlass_fused_moe` (``[s1, s2]`` or ``[s1, s2, z1, z2]``).

    Raises:
        ValueError: as :func:`quantize_int4_groupwise`, or the layer breaks
            :func:`check_int4_layer`'s rules (e.g. ``H`` not a multiple of 32).
    """
    g1, g2 = _pair(group_size)
    p1, s1, z1 = quantize_int4_groupwise(fc1_expert_weights, g1, symmetric,
                                         scale_dtype=scale_dtype, name="fc1_expert_weights")
    p2, s2, z2 = quantize_int4_groupwise(fc2_expert_weights, g2, symmetric,
                                         scale_dtype=scale_dtype, name="fc2_expert_weights")
    quant_scales = [s1, s2] if symmetric else [s1, s2, z1, z2]
    _check_layer(p1, p2, quant_scales, _FLOAT_DTYPES)
    return p1, p2, quant_scales
