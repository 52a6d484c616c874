"""A CPU stand-in for the compiled ``cutlass_moe._C`` with the documented binding API.

It follows include/cutlass_moe/runner.h: pointers arrive as integers, the runner reads the
tensors behind them (host memory here), computes the layer with ``reference_moe`` and writes the
output, so CPU tests can check that the Python layer passes every pointer, size and option in
the documented order. Like the real runner, an int8-weight runner needs ``fc1_scales`` and
``fc2_scales`` and computes with the dequantised weights ``q * scale`` (scales read in the
activation dtype). It also records every call.
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
        self.calls: list[dict[str, Any]] = []

    def all_tactics(self, gemm: int) -> list[dict[str, Any]]:
        return tactic_descriptors(gemm)

    def tactics(self, gemm: int) -> list[dict[str, Any]]:
        return [d for d in tactic_descriptors(gemm) if d["runnable"]]

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
                clamped_relu2_limit=0) -> None:
        args = dict(locals())
        del args["self"]
        self.calls.append(args)
        act_dtype, weight_dtype, out_dtype = (ENUM_TO_DTYPE[d] for d in self.dtypes)
        if weight_dtype == torch.int8 and (fc1_scales == 0 or fc2_scales == 0):
            raise ValueError("int8 weights need fc1 and fc2 per-channel scales")
        n1 = 2 * inter_size if activation in GATED_ENUMS else inter_size
        t, h, i, e, k = num_tokens, hidden_size, inter_size, num_experts, top_k
        x = _tensor_at(input, (t, h), act_dtype)
        ids = _tensor_at(token_selected_experts, (t, k), torch.int32)
        scales = _tensor_at(token_final_scales, (t, k), torch.float32)
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

    def run_gemm_profile(self, *args: Any) -> None:
        raise NotImplementedError


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
                    "bf16_int8_bf16": {"gemm1": 23, "gemm2": 23}},
    }
    return module
