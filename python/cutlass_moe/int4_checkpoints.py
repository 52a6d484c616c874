"""Int4 checkpoint importers: GPTQ, AWQ (GEMM) and compressed-tensors (``pack-quantized``)
expert weights into the W4A16 kernel layout of :mod:`cutlass_moe.int4`.

Each converter takes one linear layer's tensors as they are stored in the checkpoint and returns
an :class:`Int4Weight` ``(packed uint8 [N, K/2], scales [K/G, N], zeros [K/G, N] or None)``
whose :func:`cutlass_moe.int4.dequantize_int4` is exactly the weight the format defines (the
nibbles are moved, never requantised; only a requested ``dtype`` rounds the scales).
:func:`load_int4_experts` reads every expert of an MoE layer from a state dict and assembles the
tensors :func:`cutlass_moe.cutlass_fused_moe` takes with ``use_w4_group_scaling=True``.

Format facts used (a linear layer ``W [N, K]``: ``N = out_features``, ``K = in_features``; an
int32 word holds 8 nibbles, nibble ``i`` in bits ``4i..4i+3``):

GPTQ (AutoGPTQ / GPTQModel, ``quant_method: "gptq"``):
    ``qweight`` int32 ``[K/8, N]``: nibble ``i`` of word ``[r, n]`` is ``q[n, 8r + i]``
    (unsigned 0..15). ``qzeros`` int32 ``[K/G, N/8]``: nibble ``i`` of word ``[g, c]`` is the
    zero point of column ``8c + i``. ``scales`` ``[K/G, N]`` (float16). ``g_idx`` int32 ``[K]``:
    the group of each input element. ``W = (q - z) * s``. The zero point's storage depends on
    ``checkpoint_format`` (quantize_config.json): ``"gptq"`` (v1, the default and what most
    checkpoints are) stores ``z - 1``; ``"gptq_v2"`` (GPTQModel) stores ``z``. Symmetric
    checkpoints have ``z = 8`` everywhere (v1 words ``0x77777777``). v1 is read the way
    GPTQModel converts it to v2: each word plus ``0x11111111`` modulo 2^32, which is the exact
    inverse of its v2-to-v1 writer (a word minus ``0x11111111``, so ``z = 0`` borrows from the
    next nibble) and, wherever no stored nibble is 15, the same as adding 1 to each nibble.
    (AutoGPTQ's own writer cannot store ``z = 0`` below a word's top nibble: it ORs ``-1`` into
    the word; such words are corrupt in every reader.) Act-order (``desc_act=True``)
    checkpoints whose ``g_idx`` is not ``arange(K) // G`` are refused: see
    :func:`gptq_to_int4`.

AWQ (AutoAWQ ``version: "gemm"``, ``quant_method: "awq"``):
    ``qweight`` int32 ``[K, N/8]`` packed along N in AutoAWQ's interleaved order: nibble ``i``
    of word ``[k, c]`` is ``q[8c + ORDER[i], k]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``
    (so column ``8c + j`` sits in nibble ``[0, 4, 1, 5, 2, 6, 3, 7][j]``). ``qzeros`` int32
    ``[K/G, N/8]``, same order, storing ``z`` itself. ``scales`` ``[K/G, N]`` (float16).
    ``W = (q - z) * s``. AutoAWQ always writes zero points (``zero_point=True``).

compressed-tensors (``format: "pack-quantized"``, int4 weights, group or channel strategy):
    ``weight_packed`` int32 ``[N, K/8]``: nibble ``i`` of word ``[n, j]`` is
    ``q[n, 8j + i] + 8`` (signed values -8..7 stored with an offset of 8). ``weight_scale``
    ``[N, K/G]`` (channel strategy: ``[N, 1]``). ``weight_shape`` ``[2]`` = ``(N, K)``.
    Asymmetric schemes add ``weight_zero_point``: signed zero points -8..7, int32
    ``[N/8, K/G]`` packed along N (nibble ``i`` of word ``[c, g]`` is ``zp[8c + i, g] + 8``;
    compressed-tensors >= 0.9), or unpacked ``[N, K/G]`` signed integers (older versions).
    ``W = (q - zp) * s``, i.e. with the offsets ``(nibble - (zp + 8)) * s``: kernel zeros are
    ``zp + 8``, and a symmetric scheme (no zero point) is the kernel's ``z = 8``.
    ``weight_g_idx`` (activation ordering "group") must be ``arange(K) // G``, as for GPTQ.

Every converter maps zeros that are all 8 to ``None`` (the symmetric kernels): the dequantised
weights are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._expert_tensors import read_expert_layers, stack_experts
from .int4 import (
    INT4_SYMMETRIC_ZERO,
    _check_layer,
    group_size_of,
)

#: AutoAWQ's nibble order: nibble ``i`` of a packed word holds column ``8c + AWQ_ORDER[i]``.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: ``checkpoint_format`` values of GPTQ checkpoints (quantize_config.json).
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
#: ``fmt`` values of :func:`load_int4_experts`.
FORMATS = ("gptq", "awq", "compressed-tensors")

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_NIBBLES_PER_WORD = 8


class Int4Weight(NamedTuple):
    """One linear layer in the kernel layout of :mod:`cutlass_moe.int4`."""

    packed: torch.Tensor  #: uint8 [N, K/2]
    scales: torch.Tensor  #: [K/G, N]
    zeros: torch.Tensor | None  #: [K/G, N] (integers 0..15) or None (symmetric, z = 8)

    @property
    def group_size(self) -> int:
        """``G = K / scales.shape[0]``."""
        return 2 * self.packed.shape[-1] // self.scales.shape[-2]


# ------------------------------------------------------------------ shared pieces


def _shape(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
    return type(t).__name__


def _int32_matrix(name: str, t: object, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
        raise ValueError(f"{name} must be int32 {what}, got {_shape(t)}")
    return t


def _word_nibbles(words: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., 8]``: nibble ``i`` (bits ``4i..4i+3``) of each int32 word, in order."""
    out = torch.empty(*words.shape, _NIBBLES_PER_WORD, dtype=torch.uint8, device=words.device)
    for i in range(_NIBBLES_PER_WORD):  # one word-sized temporary at a time
        out[..., i] = (words >> (4 * i)) & 0xF  # arithmetic shift; the mask drops the sign
    return out


def _bytes_along_rows(words: torch.Tensor) -> torch.Tensor:
    """Words ``[R, C]`` whose nibble ``i`` is element ``8r + i`` of column ``c`` -> the kernel
    layout ``uint8 [C, 4R]`` of those elements (``k = 8r + i``): byte ``b`` of a word holds
    ``k = 8r + 2b`` (low nibble) and ``8r + 2b + 1`` (high nibble), which is byte ``4r + b`` of
    the kernel row."""
    out = torch.empty(words.shape[1], words.shape[0], 4, dtype=torch.uint8, device=words.device)
    for b in range(4):
        out[..., b] = ((words >> (8 * b)) & 0xFF).t()
    return out.view(words.shape[1], 4 * words.shape[0])


def _scale_dtype(name: str, scales: object, dtype: torch.dtype | None) -> torch.dtype:
    if not isinstance(scales, torch.Tensor) or scales.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got {_shape(scales)}")
    if dtype is not None and dtype not in _SCALE_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    return scales.dtype if dtype is None else dtype


def _check_g_idx(name: str, g_idx: object, k: int, group_size: int, option: str) -> None:
    """A ``g_idx`` other than ``arange(K) // G`` is a K permutation (act-order): refused."""
    if g_idx is None:
        return
    if not isinstance(g_idx, torch.Tensor) or g_idx.dtype not in _INT_DTYPES or (
            list(g_idx.shape) != [k]):
        raise ValueError(f"{name} must be an integer [K] = [{k}] tensor, got {_shape(g_idx)}")
    plain = torch.arange(k, device=g_idx.device) // group_size
    if not torch.equal(g_idx.to(torch.int64), plain):
        first = int(torch.nonzero(g_idx.to(torch.int64) != plain)[0, 0])
        raise NotImplementedError(
            f"{name} is not arange(K) // G (element {first} is in group {int(g_idx[first])}, "
            f"not {first // group_size}): the checkpoint was quantised with {option} "
            "(activation order), whose groups follow a permutation of K. The int4 kernels read "
            "groups of G consecutive input elements; serving it would need the weights' K "
            "reordered by that permutation and every expert's activations permuted the same "
            "way before each GEMM (a per-expert gather the fused MoE does not do). Quantise "
            f"without {option} (or with static groups), or dequantise to 16-bit weights.")


def _finish(name: str, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            dtype: torch.dtype) -> Int4Weight:
    """Scales (and zeros) in ``dtype``, contiguous; zeros that are all 8 become None."""
    if zeros is not None and bool((zeros == INT4_SYMMETRIC_ZERO).all()):
        zeros = None
    scales = scales.to(dtype).contiguous()
    if zeros is not None:
        zeros = zeros.to(dtype).contiguous()
    return Int4Weight(packed.contiguous(), scales, zeros)


# ------------------------------------------------------------------ GPTQ


def gptq_to_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
    name: str = "gptq",
) -> Int4Weight:
    """One 4-bit GPTQ linear layer in the kernel layout (format facts: module docstring).

    Args:
        qweight: int32 ``[K/8, N]``.
        qzeros: int32 ``[K/G, N/8]``; ``None`` means symmetric (``z = 8``).
        scales: ``[K/G, N]``, floating point (float16 in GPTQ checkpoints).
        g_idx: optional integer ``[K]``; must be ``arange(K) // G``.
        checkpoint_format: ``"gptq"`` (v1: qzeros store ``z - 1``) or ``"gptq_v2"`` (store
            ``z``): the ``checkpoint_format`` of quantize_config.json (absent means ``"gptq"``).
        dtype: dtype of the returned scales and zeros; default ``scales.dtype``. Converting
            rounds the scales (float16 to bfloat16 keeps 8 of 11 significant bits).
        name: what the layer is called in error messages (e.g. its state-dict prefix).

    Returns:
        :class:`Int4Weight` ``(packed [N, K/2], scales [K/G, N], zeros [K/G, N] or None)``;
        ``zeros`` is None when every zero point is 8 (symmetric checkpoints).

    Raises:
        ValueError: a tensor's dtype or shape, the group size (``G = K / scales.shape[0]`` must
            be a multiple of 32 dividing K, or K) or ``checkpoint_format`` is wrong.
        NotImplementedError: ``g_idx`` is not ``arange(K) // G``: an act-order (``desc_act``)
            checkpoint, whose groups follow a permutation of K that the kernels would have to
            apply to the activations of every expert.
    """
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be 'gptq' (v1, zero points stored minus 1) or "
                         f"'gptq_v2', got {checkpoint_format!r}")
    qweight = _int32_matrix(f"{name}.qweight", qweight, "[K/8, N] (8 nibbles per word along K)")
    k, n = _NIBBLES_PER_WORD * qweight.shape[0], qweight.shape[1]
    dtype = _scale_dtype(f"{name}.scales", scales, dtype)
    if scales.dim() != 2 or scales.shape[1] != n:
        raise ValueError(f"{name}.scales must be [K/G, N] = [K/G, {n}] for qweight "
                         f"{list(qweight.shape)}, got {list(scales.shape)}")
    group_size = group_size_of(k, scales, name=f"{name}.scales")
    _check_g_idx(f"{name}.g_idx", g_idx, k, group_size, "desc_act=True")
    zeros = None
    if qzeros is not None:
        want = [scales.shape[0], n // _NIBBLES_PER_WORD]
        if (not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32
                or list(qzeros.shape) != want or n % _NIBBLES_PER_WORD):
            raise ValueError(f"{name}.qzeros must be int32 [K/G, N/8] = {want}, got "
                             f"{_shape(qzeros)}")
        if checkpoint_format == "gptq":  # v1: each word + 0x11111111 (mod 2^32), as GPTQModel
            qzeros = (qzeros.to(torch.int64) + 0x11111111) & 0xFFFFFFFF
        zeros = _word_nibbles(qzeros).view(scales.shape[0], n)
    return _finish(name, _bytes_along_rows(qweight), scales, zeros, dtype)


# ------------------------------------------------------------------ AWQ


def awq_to_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    name: str = "awq",
) -> Int4Weight:
    """One 4-bit AWQ (GEMM format) linear layer in the kernel layout (format facts: module
    docstring).

    Args:
        qweight: int32 ``[K, N/8]``, AutoAWQ's interleaved nibble order.
        qzeros: int32 ``[K/G, N/8]``, same order.
        scales: ``[K/G, N]``, floating point (float16 in AWQ checkpoints).
        dtype: dtype of the returned scales and zeros; default ``scales.dtype`` (converting
            rounds the scales).
        name: what the layer is called in error messages.

    Returns:
        :class:`Int4Weight`; ``zeros`` is None when every zero point is 8.

    Raises:
        ValueError: a tensor's dtype or shape, or the group size, is wrong.
    """
    qweight = _int32_matrix(f"{name}.qweight", qweight,
                            "[K, N/8] (8 nibbles per word along N, AWQ order)")
    k, n = qweight.shape[0], _NIBBLES_PER_WORD * qweight.shape[1]
    dtype = _scale_dtype(f"{name}.scales", scales, dtype)
    if scales.dim() != 2 or scales.shape[1] != n:
        raise ValueError(f"{name}.scales must be [K/G, N] = [K/G, {n}] for qweight "
                         f"{list(qweight.shape)}, got {list(scales.shape)}")
    if k % 2:
        raise ValueError(f"{name}.qweight [K, N/8] = {list(qweight.shape)}: K must be even")
    group_size_of(k, scales, name=f"{name}.scales")
    want = [scales.shape[0], qweight.shape[1]]
    if (not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32
            or list(qzeros.shape) != want):
        raise ValueError(f"{name}.qzeros must be int32 [K/G, N/8] = {want}, got {_shape(qzeros)}")
    # Nibble i of a word holds column 8c + AWQ_ORDER[i]: column j of each 8 is nibble where[j].
    where = torch.tensor([AWQ_ORDER.index(j) for j in range(_NIBBLES_PER_WORD)],
                         device=qweight.device)
    q = _word_nibbles(qweight).index_select(-1, where).view(k, n)  # [K, N]
    zeros = _word_nibbles(qzeros).index_select(-1, where.to(qzeros.device))
    q_t = q.t()
    packed = q_t[:, 0::2] | (q_t[:, 1::2] << 4)
    return _finish(name, packed, scales, zeros.view(want[0], n), dtype)


# ------------------------------------------------------------------ compressed-tensors


def _weight_shape(name: str, weight_shape: object) -> tuple[int, int]:
    values = (weight_shape.flatten().tolist() if isinstance(weight_shape, torch.Tensor)
              else list(weight_shape)
              if isinstance(weight_shape, Sequence) and not isinstance(weight_shape, str)
              else None)
    if values is None or len(values) != 2 or not all(
            isinstance(v, (int, float)) and v == int(v) and v > 0 for v in values):
        got = values if values is not None else type(weight_shape).__name__
        raise ValueError(f"{name} must be (N, K), got {got}")
    return int(values[0]), int(values[1])


def compressed_tensors_to_int4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    weight_shape: torch.Tensor | Sequence[int] | None = None,
    weight_g_idx: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    name: str = "compressed-tensors",
) -> Int4Weight:
    """One 4-bit compressed-tensors ``pack-quantized`` linear layer (group or channel strategy)
    in the kernel layout (format facts: module docstring).

    Args:
        weight_packed: int32 ``[N, K/8]``.
        weight_scale: ``[N, K/G]`` (channel strategy: ``[N, 1]``), floating point.
        weight_zero_point: ``None`` (symmetric), int32 ``[N/8, K/G]`` (packed along N), or
            ``[N, K/G]`` unpacked signed integers -8..7 (any integer or float dtype).
        weight_shape: ``(N, K)`` (a tensor or sequence); default ``(N, 8 * weight_packed
            .shape[1])``. K must fill the packed words (``K == 8 * weight_packed.shape[1]``).
        weight_g_idx: optional integer ``[K]``; must be ``arange(K) // G``.
        dtype: dtype of the returned scales and zeros; default ``weight_scale.dtype``
            (converting rounds the scales).
        name: what the layer is called in error messages.

    Returns:
        :class:`Int4Weight`; ``zeros`` (``zp + 8``) is None when there is no zero point or
        every zero point is 0.

    Raises:
        ValueError: a tensor's dtype, shape or values, or the group size, is wrong.
        NotImplementedError: ``weight_g_idx`` is not ``arange(K) // G`` (activation ordering
            "group"; see :func:`gptq_to_int4`).
    """
    weight_packed = _int32_matrix(f"{name}.weight_packed", weight_packed,
                                  "[N, K/8] (8 nibbles per word along K)")
    n, words = weight_packed.shape
    k = _NIBBLES_PER_WORD * words
    if weight_shape is not None:
        shape = _weight_shape(f"{name}.weight_shape", weight_shape)
        if shape != (n, k):
            raise ValueError(
                f"{name}.weight_shape {list(shape)} does not match weight_packed "
                f"{list(weight_packed.shape)} (which holds [N, 8 * {words}] = [{n}, {k}]): K "
                "must fill whole packed words")
    dtype = _scale_dtype(f"{name}.weight_scale", weight_scale, dtype)
    if weight_scale.dim() != 2 or weight_scale.shape[0] != n:
        raise ValueError(f"{name}.weight_scale must be [N, K/G] = [{n}, K/G] (channel: "
                         f"[{n}, 1]), got {list(weight_scale.shape)}")
    scales = weight_scale.t()
    group_size = group_size_of(k, scales, name=f"{name}.weight_scale (transposed)")
    _check_g_idx(f"{name}.weight_g_idx", weight_g_idx, k, group_size,
                 'actorder="group"')
    groups = scales.shape[0]
    zeros = None
    if weight_zero_point is not None:
        zp = weight_zero_point
        packed_shape = [-(-n // _NIBBLES_PER_WORD), groups]
        if isinstance(zp, torch.Tensor) and zp.dtype == torch.int32 and (
                list(zp.shape) == packed_shape and list(zp.shape) != [n, groups]):
            # Packed along N: nibble i of word [c, g] is zp[8c + i, g] + 8.
            zeros = _word_nibbles(zp).permute(0, 2, 1).reshape(-1, groups)[:n].t()
        elif isinstance(zp, torch.Tensor) and list(zp.shape) == [n, groups] and (
                zp.dtype in _INT_DTYPES or zp.dtype in _SCALE_DTYPES):
            signed = zp.to(torch.float64)
            bad = (signed != signed.round()) | (signed < -8) | (signed > 7)
            if bool(bad.any()):
                value = float(signed[bad][0])
                raise ValueError(f"{name}.weight_zero_point holds {value}; unpacked int4 zero "
                                 "points must be integers in -8..7")
            zeros = (signed + INT4_SYMMETRIC_ZERO).t()
        else:
            raise ValueError(
                f"{name}.weight_zero_point must be int32 [ceil(N/8), K/G] = {packed_shape} "
                f"(packed along N) or [N, K/G] = {[n, groups]} (unpacked), got {_shape(zp)}")
    return _finish(name, _bytes_along_rows(weight_packed.t()), scales, zeros, dtype)


# ------------------------------------------------------------------ a whole MoE layer


@dataclass(frozen=True)
class Int4Experts:
    """The int4 tensors of one MoE layer, as :func:`cutlass_moe.cutlass_fused_moe` takes them
    with ``use_w4_group_scaling=True``: ``fc1`` rows are ``[up; gate]``."""

    fc1_weights: torch.Tensor  #: uint8 [E, N1, H/2] (N1 = 2I rows up then gate, or I)
    fc2_weights: torch.Tensor  #: uint8 [E, H, I/2]
    fc1_scales: torch.Tensor  #: [E, H/G1, N1]
    fc2_scales: torch.Tensor  #: [E, I/G2, H]
    fc1_zeros: torch.Tensor | None  #: [E, H/G1, N1] or None (symmetric)
    fc2_zeros: torch.Tensor | None  #: [E, I/G2, H] or None (symmetric)
    fc1_group_size: int  #: G1
    fc2_group_size: int  #: G2

    @property
    def quant_scales(self) -> list[torch.Tensor]:
        """``[fc31_scales, fc2_scales]``, or with zeros ``[s1, s2, z1, z2]``."""
        if self.fc1_zeros is None:
            return [self.fc1_scales, self.fc2_scales]
        return [self.fc1_scales, self.fc2_scales, self.fc1_zeros, self.fc2_zeros]


_TENSORS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                           "weight_g_idx"),
}
_REQUIRED = {"gptq": 3, "awq": 3, "compressed-tensors": 2}


def _read(state_dict: Mapping[str, torch.Tensor], prefix: str, experts: str, fmt: str,
          checkpoint_format: str, dtype: torch.dtype | None) -> Int4Weight:
    """One projection (``prefix`` = ``f"{experts}.{e}.{proj}"``) through its converter."""
    names = _TENSORS[fmt]
    tensors = []
    for i, tensor in enumerate(names):
        key = f"{prefix}.{tensor}"
        if key in state_dict:
            tensors.append(state_dict[key])
        elif i < _REQUIRED[fmt]:
            required = ", ".join(names[:_REQUIRED[fmt]])
            hint = ""
            if not any(str(other).startswith(experts + ".") for other in state_dict):
                hint = f"; no key starts with {experts + '.'!r} (check the prefix)"
            raise KeyError(f"load_int4_experts: {key!r} is missing from the state dict ({fmt} "
                           f"layers need {required}){hint}")
        else:
            tensors.append(None)
    if fmt == "gptq":
        return gptq_to_int4(*tensors, checkpoint_format=checkpoint_format, dtype=dtype,
                            name=prefix)
    if fmt == "awq":
        return awq_to_int4(*tensors, dtype=dtype, name=prefix)
    return compressed_tensors_to_int4(*tensors, dtype=dtype, name=prefix)


def load_int4_experts(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    num_experts: int,
    fmt: str,
    *,
    gate: str | None = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
    checkpoint_format: str | None = None,
    dtype: torch.dtype | None = None,
) -> Int4Experts:
    """Reads the int4 experts of one MoE layer and assembles the kernel's tensors.

    Expert ``e``'s projections are read from ``f"{prefix}.{e}.{proj}.{tensor}"``, e.g.
    ``model.layers.3.mlp.experts.5.up_proj.qweight`` (GPTQ/AWQ: ``qweight``, ``qzeros``,
    ``scales``, GPTQ also ``g_idx``; compressed-tensors: ``weight_packed``, ``weight_scale``,
    ``weight_zero_point``, ``weight_shape``, ``weight_g_idx``), converted with
    :func:`gptq_to_int4`, :func:`awq_to_int4` or :func:`compressed_tensors_to_int4`, and stacked:

    - fc1: rows ``[up; gate]`` — weights ``[E, 2I, H/2]``, scales/zeros ``[E, H/G1, 2I]``
      (columns up then gate); without ``gate`` (non-gated experts) just up, ``[E, I, H/2]``;
    - fc2: ``down`` — weights ``[E, H, I/2]``, scales/zeros ``[E, I/G2, H]``.

    If any projection of any expert has zero points, every projection gets them (``z = 8``
    materialised for the symmetric ones): the kernels take zeros for both GEMMs or for neither.

    Args:
        state_dict: a mapping from names to tensors (a ``state_dict()``, a dict of safetensors
            tensors, ...).
        prefix: the experts' prefix, without the expert index (a trailing ``.`` is ignored).
        num_experts: ``E``: experts ``0..E-1`` are read.
        fmt: ``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` (``"compressed_tensors"`` and
            ``"pack-quantized"`` are accepted too).
        gate, up, down: the projections' names (Mixtral: ``gate="w1", up="w3", down="w2"``);
            ``gate=None`` for non-gated experts.
        checkpoint_format: GPTQ only: ``"gptq"`` (the default) or ``"gptq_v2"``, from
            quantize_config.json.
        dtype: dtype of the scales and zeros; default: the checkpoint's (which must then be the
            same for every projection). Pass the activation dtype to convert.

    Returns:
        :class:`Int4Experts` (``.quant_scales`` is the list for ``cutlass_fused_moe``).

    Raises:
        KeyError: a required tensor is missing (the message names its key).
        ValueError: an unknown ``fmt`` or ``checkpoint_format``, a tensor's dtype or shape,
            projections or experts that disagree in shape, group size or scale dtype, or a
            layer that breaks the kernels' alignment (H and I multiples of 32, N multiples of 8);
            each message names the tensor.
        NotImplementedError: an act-order checkpoint (see :func:`gptq_to_int4`).
    """
    aliases = {"compressed_tensors": "compressed-tensors", "pack-quantized": "compressed-tensors"}
    fmt = aliases.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    if checkpoint_format is not None and fmt != "gptq":
        raise ValueError(f"checkpoint_format applies to fmt='gptq' only, got "
                         f"checkpoint_format={checkpoint_format!r} with fmt={fmt!r}")
    checkpoint_format = "gptq" if checkpoint_format is None else checkpoint_format
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if dtype is not None and dtype not in _SCALE_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    prefix = prefix.rstrip(".")
    fc1_parts = [up, gate] if gate is not None else [up]

    def same_dtype(layer: Int4Weight, ref: Int4Weight, where: str, name0: str) -> None:
        if layer.scales.dtype != ref.scales.dtype:
            raise ValueError(
                f"load_int4_experts: {where} has {layer.scales.dtype} scales but {name0} "
                f"has {ref.scales.dtype}; pass dtype= to convert them to one dtype")

    # Every expert of a projection alike; up and gate alike (they share fc1's tensors).
    layers = read_expert_layers(
        "load_int4_experts", prefix, num_experts, fc1_parts, down,
        lambda where: _read(state_dict, where, prefix, fmt, checkpoint_format, dtype),
        lambda layer: (("weights", layer.packed), ("scales", layer.scales)), same_dtype)
    down_dtype = layers[down][0].scales.dtype
    if down_dtype != layers[up][0].scales.dtype:
        raise ValueError(
            f"load_int4_experts: {prefix}.0.{down} has {down_dtype} scales but {prefix}.0.{up} "
            f"has {layers[up][0].scales.dtype}; pass dtype= to convert them to one dtype")
    asymmetric = any(layer.zeros is not None for ls in layers.values() for layer in ls)

    def zeros_of(layer: Int4Weight) -> torch.Tensor:
        if layer.zeros is not None:
            return layer.zeros
        return torch.full_like(layer.scales, INT4_SYMMETRIC_ZERO)

    fc1_weights, fc2_weights = stack_experts(layers, fc1_parts, down, lambda x: x.packed)
    fc1_scales, fc2_scales = stack_experts(layers, fc1_parts, down, lambda x: x.scales, dim=-1)
    fc1_zeros = fc2_zeros = None
    if asymmetric:
        fc1_zeros, fc2_zeros = stack_experts(layers, fc1_parts, down, zeros_of, dim=-1)
    quant = [fc1_scales, fc2_scales] + ([fc1_zeros, fc2_zeros] if asymmetric else [])
    try:
        g1, g2 = _check_layer(fc1_weights, fc2_weights, quant, _SCALE_DTYPES)
    except ValueError as exc:
        raise ValueError(f"load_int4_experts: the experts under {prefix!r} do not make an int4 "
                         f"MoE layer: {exc}") from None
    return Int4Experts(fc1_weights, fc2_weights, fc1_scales, fc2_scales, fc1_zeros, fc2_zeros,
                       g1, g2)
