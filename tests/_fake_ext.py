"""A CPU stand-in for the compiled ``cutlass_moe._C`` with the documented binding API.

It follows include/cutlass_moe/runner.h: pointers arrive as integers, the runner reads the
tensors behind them (host memory here), computes the layer with ``reference_moe`` and writes the
output, so CPU tests can check that the Python layer passes every pointer, size and option in
the documented order. Like the real runner, an int8-weight runner needs ``fc1_scales`` and
``fc2_scales`` and computes with the dequantised weights ``q * scale`` (scales read in the
activation dtype). An int4 runner (weight ``DType`` 4) reads packed uint8 ``[E, N, K/2]`` weights,
group-wise scales ``[E, K/G, N]`` and optional zeros at the given group sizes (required, > 0)
and computes with ``(q - z) * s`` (z = 8 without zeros), dequantised here independently of
:mod:`cutlass_moe.int4` so that tests cross-check the two. It exposes int4 tactics named as the
real build names them (``sm80_<act>_int4_...``, ``sm80_decode[_gated]_<act>_int4_...``,
``sm80_decode_mma[_gated]_<act>_int4_...``) and records every call, profiling calls included.
FP8 (``DType`` 5) and MXFP4 (``DType`` 6) runners read float8_e4m3fn ``[E, N, K]`` weights with
float32 scales ``[E, K/G, N]``, and packed uint8 ``[E, N, K/2]`` e2m1 weights with uint8 e8m0
scales ``[E, K/32, N]`` (group size 32 required), decode both codes themselves (bit fields, not
cutlass_moe.fp8 / cutlass_moe.mxfp4), refuse zero points, and expose the tensor-core tactics
``sm80_<act>_fp8_...`` / ``sm80_<act>_mxfp4_...`` on int4's tiles plus the decode tactics
``sm80_decode[_gated]_<act>_<fmt>_...`` (as the build since the fp8/mxfp4 decode kernels). Each
format's decode tactics include those that ``cutlass_moe.tactics.DEFAULT_DECODE`` names, so CPU
tests see the measured decode defaults (and int4's tensor-core decode tactics, candidates only).
"""

from __future__ import annotations

import ctypes
import math
import types
from typing import Any, ClassVar

import torch

from cutlass_moe import _ext
from cutlass_moe.activation import is_gated
from cutlass_moe.reference import reference_moe

#: The stream handle the CPU fixtures (conftest's fake_cpu) hand to the runner.
FAKE_STREAM = 0xC0FFEE

ENUM_TO_DTYPE = {v: k for k, v in _ext._DTYPE_TO_ENUM.items()}
#: The C++ DType of int4 weights (int4_spec: kInt4 = 4).
INT4_ENUM = _ext.PACKED_WEIGHT_FORMATS[_ext.INT4]
#: The C++ DTypes of fp8 and mxfp4 weights (fp8_spec: kFp8E4m3 = 5, kMxfp4 = 6).
FP8_ENUM = 5
MXFP4_ENUM = 6
#: Weight format of a runner's weight DType (formats named by a tag).
ENUM_TO_FORMAT = {INT4_ENUM: "int4", FP8_ENUM: "fp8", MXFP4_ENUM: "mxfp4"}
_ACT_NAMES = {0: "fp16", 1: "bf16", 2: "fp32"}
# C++ Activation value -> ActivationType (4 -> Swiglu, which SwigluBias also runs as).
ENUM_TO_ACTIVATION = {v: _ext.activation_from_enum(v) for v in set(_ext._ACTIVATION_TO_ENUM.values())}
GATED_ENUMS = {v for v, act in ENUM_TO_ACTIVATION.items() if is_gated(act)}


def _tensor_at(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor viewing host memory at ``ptr`` (shares it; None for a null pointer)."""
    if ptr == 0:
        return None
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    buffer = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


#: (tile_m, tile_n, warp_m, warp_n, stages) of the fake int4 build's tensor-core tactics (those
#: of tools/generate_kernels.py's full int4 list).
INT4_TILES = ((16, 64, 16, 32, 4), (16, 128, 16, 32, 4), (16, 128, 16, 32, 6),
              (32, 128, 32, 32, 4), (64, 128, 32, 64, 3), (64, 128, 32, 64, 4),
              (128, 128, 64, 64, 3), (128, 256, 64, 64, 3))


#: The fake builds' decode tactics per weight format: (name with ``{act}``, gated, rows per
#: pass, output columns per work item), named as the real build names them. Gated ones are
#: GEMM1's (gated activations only); plain ones serve both GEMMs. Every format lists an FMA
#: decode tactic of 2 rows per pass and its gated twin, and the tactics that
#: cutlass_moe.tactics.DEFAULT_DECODE names (fp8's plain m2n8 among them); int4 also lists
#: tensor-core ``sm80_decode_mma*`` ones, candidates that DEFAULT_DECODE does not name.
DECODE_TACTICS = {
    "int4": (("sm80_decode_{act}_int4_m2n8_c2x4_u4", False, 2, 8),
             ("sm80_decode_gated_{act}_int4_m2n8_c2x4_u4", True, 2, 8),
             ("sm80_decode_{act}_int4_m1n8_c2x4_u4", False, 1, 8),
             ("sm80_decode_mma_{act}_int4_m8n32_k4_u2", False, 8, 32),
             ("sm80_decode_mma_{act}_int4_m16n32_k4_u2", False, 16, 32),
             ("sm80_decode_mma_gated_{act}_int4_m8n16_k4_u2", True, 8, 16)),
    "fp8": (("sm80_decode_{act}_fp8_m2n8_c2x4_u4", False, 2, 8),
            ("sm80_decode_gated_{act}_fp8_m2n8_c2x4_u4", True, 2, 8),
            ("sm80_decode_{act}_fp8_m1n8_c2x4_u4", False, 1, 8),
            ("sm80_decode_gated_{act}_fp8_m1n4_c1x4_u4", True, 1, 4)),
    "mxfp4": (("sm80_decode_{act}_mxfp4_m2n8_c2x4_u4", False, 2, 8),
              ("sm80_decode_gated_{act}_mxfp4_m2n8_c2x4_u4", True, 2, 8),
              ("sm80_decode_{act}_mxfp4_m1n8_c2x4_u4", False, 1, 8),
              ("sm80_decode_gated_{act}_mxfp4_m1n4_c1x4_u4", True, 1, 4)),
}


def decode_tactic_descriptors(gemm: int, act: str, fmt: str) -> list[dict[str, Any]]:
    """The fake ``fmt`` runner's decode tactics of GEMM ``gemm`` (:data:`DECODE_TACTICS`)."""
    descs = []
    for name, gated, rows, cols in DECODE_TACTICS[fmt]:
        if gated and gemm != 1:
            continue
        desc = {"name": name.format(act=act), "gemm": gemm, "tile_m": rows, "tile_n": cols,
                "tile_k": 0, "warp_m": 0, "warp_n": 0, "warp_k": 0, "stages": 0,
                "smem_bytes": 0, "threads": 128, "runnable": True, "act_dtype": act,
                "weight_dtype": fmt, "gated": gated, "split_k": 1, "decode": True}
        if gated:
            desc["activations"] = sorted(GATED_ENUMS)
        descs.append(desc)
    return descs


def _tensor_core_descriptors(gemm: int, act: str, fmt: str) -> list[dict[str, Any]]:
    """The fake group-scaled runners' tensor-core tactics (:data:`INT4_TILES`, every format)."""
    descs = []
    for tile_m, tile_n, warp_m, warp_n, stages in INT4_TILES:
        descs.append({
            "name": f"sm80_{act}_{fmt}_m{tile_m}n{tile_n}k64_w{warp_m}x{warp_n}x64_s{stages}",
            "gemm": gemm, "tile_m": tile_m, "tile_n": tile_n, "tile_k": 64, "warp_m": warp_m,
            "warp_n": warp_n, "warp_k": 64, "stages": stages, "smem_bytes": 1000 * stages,
            "threads": 32 * (tile_m // warp_m) * (tile_n // warp_n),
            # Like the real build on a 99 KB device: the largest tile does not fit.
            "runnable": (tile_m, tile_n) != (128, 256), "act_dtype": act,
            "weight_dtype": fmt, "gated": False, "split_k": 1, "decode": False,
        })
    return descs


def int4_tactic_descriptors(gemm: int, act: str = "bf16") -> list[dict[str, Any]]:
    """The fake int4 runner's tactics, named like the real ones: tensor-core tactics (no
    split-K, no fused gated ones) and the decode tactics of :data:`DECODE_TACTICS` (weight
    streaming ones, among them the default m1n8, and tensor-core ``sm80_decode_mma*`` ones;
    GEMM1 also has the gated ones, for gated activations only)."""
    return _tensor_core_descriptors(gemm, act, "int4") + decode_tactic_descriptors(gemm, act,
                                                                                   "int4")


def group_scaled_tactic_descriptors(gemm: int, act: str = "bf16", fmt: str = "fp8"
                                    ) -> list[dict[str, Any]]:
    """The fake fp8 / mxfp4 runner's tactics (``fmt``): tensor-core tactics on int4's tiles,
    named ``sm80_<act>_<fmt>_m..n..k64_w..x..x64_s<stages>``, and the decode tactics
    ``sm80_decode[_gated]_<act>_<fmt>_...`` of :data:`DECODE_TACTICS` (the gated ones GEMM1's,
    gated activations only); no split-K or fused gated tensor-core ones."""
    return _tensor_core_descriptors(gemm, act, fmt) + decode_tactic_descriptors(gemm, act, fmt)


def tactic_descriptors(gemm: int) -> list[dict[str, Any]]:
    descs = []
    for tile_m in (16, 32, 64, 128):
        for stages in (2, 3, 4):
            for tile_n in (128, 256):
                descs.append({
                    "name": f"fake_g{gemm}_m{tile_m}n{tile_n}k64_s{stages}", "gemm": gemm,
                    "tile_m": tile_m, "tile_n": tile_n, "tile_k": 64, "warp_m": min(tile_m, 64), "warp_n": 64,
                    "warp_k": 64, "stages": stages, "smem_bytes": 1000 * stages, "threads": 128,
                    "runnable": not (tile_m == 128 and tile_n == 256 and stages == 4),
                    "split_k": 1,
                })
    if gemm == 2:
        # GEMM2 split over K (decode only; never a default).
        descs.append({
            "name": "fake_g2_m16n128k64_s4_splitk4", "gemm": 2, "tile_m": 16, "tile_n": 128,
            "tile_k": 64, "warp_m": 16, "warp_n": 32, "warp_k": 64, "stages": 4,
            "smem_bytes": 4000, "threads": 128, "runnable": True, "split_k": 4,
        })
    return descs


class FakeMoeRunner:
    constructed: ClassVar[list[tuple[int, int, int]]] = []

    def __init__(self, act_dtype: int, weight_dtype: int, out_dtype: int) -> None:
        FakeMoeRunner.constructed.append((act_dtype, weight_dtype, out_dtype))
        self.dtypes = (act_dtype, weight_dtype, out_dtype)
        self.int4 = weight_dtype == INT4_ENUM
        self.format = ENUM_TO_FORMAT.get(weight_dtype, "")
        self.calls: list[dict[str, Any]] = []
        self.profile_calls: list[tuple[str, dict[str, Any]]] = []

    def all_tactics(self, gemm: int) -> list[dict[str, Any]]:
        if self.int4:
            return int4_tactic_descriptors(gemm, _ACT_NAMES[self.dtypes[0]])
        if self.format:
            return group_scaled_tactic_descriptors(gemm, _ACT_NAMES[self.dtypes[0]], self.format)
        return tactic_descriptors(gemm)

    def tactics(self, gemm: int) -> list[dict[str, Any]]:
        return [d for d in self.all_tactics(gemm) if d["runnable"]]

    def workspace_size(self, num_tokens, hidden_size, inter_size, num_experts, top_k,
                       activation, tactic1="", tactic2="", has_fc1_bias=False) -> int:
        # The most any tactic needs, whatever the names: run_moe below checks against it.
        n1 = 2 * inter_size if activation in GATED_ENUMS else inter_size
        return num_tokens * top_k * (hidden_size + n1) * 2 + 8 * (num_experts + 1) + 256

    def run_moe(self, num_tokens, hidden_size, inter_size, num_experts, top_k, expert_start,
                activation, input, token_selected_experts, token_final_scales, fc1_weights,
                fc2_weights, fc1_bias, fc2_bias, swiglu_alpha, swiglu_beta, swiglu_limit,
                output, workspace, workspace_bytes, tactic1, tactic2, stream, fc1_scales=0,
                fc2_scales=0, enable_pdl=True, situ_beta=0, situ_linear_beta=0,
                clamped_relu2_limit=0, fc1_zeros=0, fc2_zeros=0, fc1_group_size=0,
                fc2_group_size=0) -> None:
        args = dict(locals())
        del args["self"]
        self.calls.append(args)
        act_dtype, out_dtype = ENUM_TO_DTYPE[self.dtypes[0]], ENUM_TO_DTYPE[self.dtypes[2]]
        weight_dtype = (torch.uint8 if self.format else ENUM_TO_DTYPE[self.dtypes[1]])
        if weight_dtype == torch.int8 and (fc1_scales == 0 or fc2_scales == 0):
            raise ValueError("int8 weights need fc1 and fc2 per-channel scales")
        if not self.int4 and (fc1_zeros or fc2_zeros):
            raise ValueError("zeros are for int4 weights only")  # fp8_spec: must be 0
        if not self.format and (fc1_group_size or fc2_group_size):
            raise ValueError("group sizes are for int4, fp8 and mxfp4 weights only")
        n1 = 2 * inter_size if activation in GATED_ENUMS else inter_size
        t, h, i, e, k = num_tokens, hidden_size, inter_size, num_experts, top_k
        x = _tensor_at(input, (t, h), act_dtype)
        ids = _tensor_at(token_selected_experts, (t, k), torch.int32)
        scales = _tensor_at(token_final_scales, (t, k), torch.float32)
        if self.int4:
            fc1 = _int4_weights(fc1_weights, fc1_scales, fc1_zeros, fc1_group_size, e, n1, h,
                                act_dtype)
            fc2 = _int4_weights(fc2_weights, fc2_scales, fc2_zeros, fc2_group_size, e, h, i,
                                act_dtype)
            if (fc1_zeros == 0) != (fc2_zeros == 0):
                raise ValueError("int4 zeros are given for both GEMMs or for neither")
        elif self.format == "fp8":
            fc1 = _fp8_weights(fc1_weights, fc1_scales, fc1_group_size, e, n1, h, act_dtype)
            fc2 = _fp8_weights(fc2_weights, fc2_scales, fc2_group_size, e, h, i, act_dtype)
        elif self.format == "mxfp4":
            fc1 = _mxfp4_weights(fc1_weights, fc1_scales, fc1_group_size, e, n1, h, act_dtype)
            fc2 = _mxfp4_weights(fc2_weights, fc2_scales, fc2_group_size, e, h, i, act_dtype)
        else:
            fc1 = _tensor_at(fc1_weights, (e, n1, h), weight_dtype)
            fc2 = _tensor_at(fc2_weights, (e, h, i), weight_dtype)
        if weight_dtype == torch.int8:
            s1 = _tensor_at(fc1_scales, (e, n1), act_dtype)
            s2 = _tensor_at(fc2_scales, (e, h), act_dtype)
            fc1 = fc1.float() * s1.float().unsqueeze(-1)
            fc2 = fc2.float() * s2.float().unsqueeze(-1)
        b1 = _tensor_at(fc1_bias, (e, n1), act_dtype)
        b2 = _tensor_at(fc2_bias, (e, h), act_dtype)
        alpha = _tensor_at(swiglu_alpha, (e,), torch.float32)
        beta = _tensor_at(swiglu_beta, (e,), torch.float32)
        limit = _tensor_at(swiglu_limit, (e,), torch.float32)
        sbeta = _tensor_at(situ_beta, (e,), torch.float32)
        slbeta = _tensor_at(situ_linear_beta, (e,), torch.float32)
        relu2_limit = _tensor_at(clamped_relu2_limit, (1,), torch.float32)
        activation_type = ENUM_TO_ACTIVATION[activation]
        if activation_type == _ext.ActivationType.ClampedRelu2 and relu2_limit is None:
            raise ValueError("ClampedRelu2 needs clamped_relu2_limit")  # as the real runner
        out = _tensor_at(output, (t, h), out_dtype)
        ws = _tensor_at(workspace, (workspace_bytes,), torch.uint8)
        need = self.workspace_size(t, h, i, e, k, activation)
        assert workspace_bytes >= need and ws is not None
        ws.fill_(0xAB)  # proves the workspace is writable memory of that size
        result = reference_moe(
            x, ids.long() - expert_start, scales, fc1, fc2, activation_type,
            fc1_expert_biases=b1, fc2_expert_biases=b2, swiglu_alpha=alpha, swiglu_beta=beta,
            swiglu_limit=limit, clamped_relu2_limit=relu2_limit, situ_beta=sbeta,
            situ_linear_beta=slbeta,
        )
        out.copy_(result.to(out_dtype))

    def prepare_gemm_profile(self, gemm, num_tokens, hidden_size, inter_size, num_experts, top_k,
                             activation, weights, workspace, workspace_bytes, seed, stream,
                             scales=0, zeros=0, group_size=0) -> None:
        """Records the call and checks what the real runner checks (it profiles nothing)."""
        args = dict(locals())
        del args["self"]
        self.profile_calls.append(("prepare", args))
        if self.dtypes[1] == _ext.dtype_to_enum(torch.int8) and scales == 0:
            raise ValueError("int8 weights need their per-channel scales")
        if self.format:
            k = hidden_size if gemm == 1 else inter_size
            if scales == 0 or group_size <= 0 or k % group_size:
                raise ValueError(f"{self.format} weights need their scales and the GEMM's group "
                                 "size")
            if self.format == "mxfp4" and group_size != 32:
                raise ValueError("mxfp4 weights have group size 32")
            if zeros and not self.int4:
                raise ValueError("zeros are for int4 weights only")
        elif zeros or group_size:
            raise ValueError("zeros and group sizes are for int4 weights only")

    def run_gemm_profile(self, gemm, tactic, num_tokens, hidden_size, inter_size, num_experts,
                         top_k, activation, workspace, workspace_bytes, stream,
                         group_size=0) -> None:
        """Records the call; runs nothing (the CPU has no kernel to time)."""
        args = dict(locals())
        del args["self"]
        self.profile_calls.append(("run", args))
        if tactic not in {d["name"] for d in self.all_tactics(gemm)}:
            raise ValueError(f"unknown tactic {tactic}")


def _int4_weights(weights: int, scales: int, zeros: int, group_size: int, e: int, n: int,
                  k: int, act_dtype: torch.dtype) -> torch.Tensor:
    """The float32 weights ``[e, n, k]`` of packed int4 ones (the kernel layout of int4_spec),
    read from host memory and dequantised without cutlass_moe.int4: byte j of a row holds
    k = 2j in its low nibble and k = 2j + 1 in its high one; W = (q - z) * s, z = 8 when
    ``zeros`` is null; computed in float32 and rounded once to the activation dtype."""
    if scales == 0 or group_size <= 0 or k % group_size or group_size % 32 and group_size != k:
        raise ValueError(f"int4 weights need scales and a group size (got {group_size} for "
                         f"K={k})")
    packed = _tensor_at(weights, (e, n, k // 2), torch.uint8)
    groups = k // group_size
    s = _tensor_at(scales, (e, groups, n), act_dtype).float()
    z = (torch.full((), 8.0) if zeros == 0
         else _tensor_at(zeros, (e, groups, n), act_dtype).float())
    q = torch.empty(e, n, k, dtype=torch.float32)
    q[..., 0::2] = (packed & 0xF).float()
    q[..., 1::2] = (packed >> 4).float()
    # Group g of row n covers k in [g*G, (g+1)*G): expand [e, groups, n] to [e, n, k].
    s_full = s.transpose(1, 2).repeat_interleave(group_size, dim=2)
    z_full = z if zeros == 0 else z.transpose(1, 2).repeat_interleave(group_size, dim=2)
    return ((q - z_full) * s_full).to(act_dtype).float()


def _expand_groups(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scales ``[e, groups, n]`` as ``[e, n, k]`` (group g of row n covers k in [g*G, (g+1)*G))."""
    return scales.transpose(1, 2).repeat_interleave(group_size, dim=2)


def e4m3_bits_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of e4m3fn bytes from their bit fields ``s eeee mmm`` (bias 7):
    ``(m/8) * 2^-6`` for ``e == 0``, ``(1 + m/8) * 2^(e-7)`` otherwise; ValueError for the NaN
    codes 0x7F / 0xFF (which fp8_spec forbids in weights)."""
    codes = codes.to(torch.int32)
    if bool(((codes & 0x7F) == 0x7F).any()):
        raise ValueError("fp8 weights hold the e4m3fn NaN code")
    sign = torch.where(codes >= 0x80, -1.0, 1.0).double()
    exp = ((codes >> 3) & 0xF).double()
    man = (codes & 0x7).double()
    magnitude = torch.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * torch.pow(2.0, exp - 7))
    return (sign * magnitude).float()


def _fp8_weights(weights: int, scales: int, group_size: int, e: int, n: int, k: int,
                 act_dtype: torch.dtype) -> torch.Tensor:
    """The float32 weights ``[e, n, k]`` of fp8 ones (fp8_spec): e4m3 bytes ``[e, n, k]`` read
    from host memory and decoded from their bits, times float32 scales ``[e, k/G, n]``, formed
    in float32 and rounded once to the activation dtype."""
    if scales == 0 or group_size <= 0 or k % group_size or group_size % 32 and group_size != k:
        raise ValueError(f"fp8 weights need scales and a group size (got {group_size} for "
                         f"K={k})")
    values = e4m3_bits_to_float(_tensor_at(weights, (e, n, k), torch.uint8))
    s = _tensor_at(scales, (e, k // group_size, n), torch.float32)
    return (values * _expand_groups(s, group_size)).to(act_dtype).float()


#: e2m1 magnitudes of the codes 0..7 (``s e e m``: m/2 for e == 0, (1 + m/2) * 2^(e-1) else).
_E2M1 = [(m / 2 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)) for e in range(4) for m in range(2)]


def _mxfp4_weights(weights: int, scales: int, group_size: int, e: int, n: int, k: int,
                   act_dtype: torch.dtype) -> torch.Tensor:
    """The float32 weights ``[e, n, k]`` of MXFP4 ones (fp8_spec): byte j of a row holds code
    k = 2j in its low nibble, 2j + 1 in its high one; e8m0 scale x is 2^(x - 127) (255: NaN,
    refused); value * scale in float32, rounded once to the activation dtype."""
    if scales == 0 or group_size != 32:
        raise ValueError(f"mxfp4 weights need scales and group size 32 (got {group_size})")
    packed = _tensor_at(weights, (e, n, k // 2), torch.uint8).to(torch.int64)
    codes = torch.empty(e, n, k, dtype=torch.int64)
    codes[..., 0::2] = packed & 0xF
    codes[..., 1::2] = packed >> 4
    table = torch.tensor(_E2M1 + [-v for v in _E2M1], dtype=torch.float64)
    values = table[codes]
    x = _tensor_at(scales, (e, k // 32, n), torch.uint8).to(torch.float64)
    if bool((x == 255).any()):
        raise ValueError("mxfp4 scales hold the e8m0 NaN code 255")
    scale = torch.pow(2.0, x - 127)
    return (values * _expand_groups(scale, 32)).float().to(act_dtype).float()


def make_fake_extension() -> types.ModuleType:
    module = types.ModuleType("cutlass_moe._C")
    module.MoeRunner = FakeMoeRunner
    module.SPLIT_K_MAX_ROWS = 128
    module.TILE_GROUP_BYTES = 16 << 20
    module.build_info = lambda: {
        "version": "0.0.0-fake",
        "cutlass_version": "4.2.0",
        "cuda_version": "13.0",
        "archs": [80, 86, 89, 90],
        "fast_build": True,
        "tactics": {"bf16_bf16_bf16": {"gemm1": 23, "gemm2": 23},
                    "bf16_int8_bf16": {"gemm1": 23, "gemm2": 23},
                    "bf16_int4_bf16": {"gemm1": 10, "gemm2": 9},
                    "bf16_fp8_bf16": {"gemm1": 8, "gemm2": 8},
                    "bf16_mxfp4_bf16": {"gemm1": 8, "gemm2": 8}},
    }
    return module
