"""The int4 (W4A16) kernels through the C++ runner directly, on a GPU: every compiled int4
tactic of each GEMM against ``reference_moe`` on weights dequantised here.

The packed layout is rebuilt in this file from its description (docs/architecture.md,
"int4 weights"): byte j of a row holds nibble 2j in its low half and 2j+1 in its high half;
weight (n, k) = (q - z) * s with s, z per K-group of G elements and output column n, z = 8
without zero points; the dequantised weight is rounded once to the activation dtype. Inputs are
random (never zeros); outputs and workspaces start as NaN bytes. Relative L2 bounds: bf16 1e-2,
fp16 2e-3.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import random_routing, record_error, rel_l2
from cutlass_moe import ActivationType, _ext, reference_moe

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
INT4 = 4  # DType::kInt4
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is available")
    return _ext.load_extension()


def _runner(ext, dtype):
    enum = _ext.dtype_to_enum(dtype)
    return ext.MoeRunner(enum, INT4, enum)


def _quantised(num_experts, n, k, group, asym, dtype, gen):
    """Random packed weights [E, N, K/2], scales [E, K/G, N], zeros or None, and the
    dequantised float32 weights [E, N, K] (rounded once to ``dtype``)."""
    q = torch.randint(0, 16, (num_experts, n, k), generator=gen, device=DEVICE, dtype=torch.int32)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
    groups = k // group
    # |w| ~ 1/sqrt(K): q - z spans about +-8.
    scales = (torch.rand(num_experts, groups, n, generator=gen, device=DEVICE) + 0.5)
    scales = (scales / (8 * k**0.5)).to(dtype)
    zeros = None
    z = torch.full((num_experts, groups, n), 8.0, device=DEVICE)
    if asym:  # integer zero points, or (asym == "fraction") quarter-integer ones
        zeros = torch.randint(0, 16, (num_experts, groups, n), generator=gen, device=DEVICE)
        zeros = (zeros + (0.25 if asym == "fraction" else 0.0)).to(dtype)
        z = zeros.float()
    s_full = scales.float().repeat_interleave(group, dim=1).transpose(1, 2)  # [E, N, K]
    z_full = z.repeat_interleave(group, dim=1).transpose(1, 2)
    w = ((q.float() - z_full) * s_full).to(dtype).float()
    return packed.contiguous(), scales.contiguous(), zeros, w


def _run(runner, x, ids, route, fc1, fc2, act, t1, t2, g1, g2):
    num_tokens, hidden = x.shape
    (p1, s1, z1, _), (p2, s2, z2, _) = fc1, fc2
    inter = p2.shape[2] * 2
    experts = p1.shape[0]
    enum = _ext.activation_to_enum(act)
    size = runner.workspace_size(num_tokens, hidden, inter, experts, ids.shape[1], enum, t1, t2,
                                 False)
    workspace = torch.full((max(size, 1),), 0xFF, dtype=torch.uint8, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    runner.run_moe(
        num_tokens, hidden, inter, experts, ids.shape[1], 0, enum, x.data_ptr(), ids.data_ptr(),
        route.data_ptr(), p1.data_ptr(), p2.data_ptr(), 0, 0, 0, 0, 0, out.data_ptr(),
        workspace.data_ptr(), size, t1, t2, torch.cuda.current_stream().cuda_stream,
        fc1_scales=s1.data_ptr(), fc2_scales=s2.data_ptr(),
        fc1_zeros=0 if z1 is None else z1.data_ptr(), fc2_zeros=0 if z2 is None else z2.data_ptr(),
        fc1_group_size=g1, fc2_group_size=g2)
    torch.cuda.synchronize()
    return out


def _case(dtype, num_tokens, hidden, inter, experts, top_k, act, g1, g2, asym, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    gated = act in (ActivationType.Swiglu, ActivationType.Geglu)
    n1 = 2 * inter if gated else inter
    fc1 = _quantised(experts, n1, hidden, g1 or hidden, asym, dtype, gen)
    fc2 = _quantised(experts, hidden, inter, g2 or inter, asym, dtype, gen)
    x = torch.randn(num_tokens, hidden, generator=gen, device=DEVICE).to(dtype)
    ids, route = random_routing(num_tokens, experts, top_k, DEVICE, gen)
    ref = reference_moe(x, ids, route, fc1[3], fc2[3], act)
    return x, ids, route, fc1, fc2, ref


def _names(runner, gemm, decode=None):
    out = []
    for d in runner.tactics(gemm):
        if d["weight_dtype"] != "int4":
            continue
        if decode is not None and bool(d.get("decode", False)) != decode:
            continue
        out.append((d["name"], bool(d.get("gated", False))))
    return out


def _check_pairs(runner, dtype, case, act, g1, g2, gemm1, gemm2, plain1, plain2, label):
    """Each GEMM1 tactic of ``gemm1`` ((name, gated) pairs; gated ones only for a gated ``act``)
    with ``plain2``, and ``plain1`` with each GEMM2 tactic of ``gemm2``, against the case's
    reference; the failures, labelled."""
    x, ids, route, fc1, fc2, ref = case
    gated_act = act in (ActivationType.Swiglu, ActivationType.Geglu)
    pairs = [(t1, plain2) for t1, gated in gemm1 if gated_act or not gated]
    pairs += [(plain1, t2) for t2 in gemm2]
    failures = []
    for t1, t2 in pairs:
        out = _run(runner, x, ids, route, fc1, fc2, act, t1, t2, g1, g2)
        err = record_error(f"int4_{str(dtype)[6:]}", rel_l2(out.float(), ref))
        if not err <= TOLERANCE[dtype]:
            failures.append(f"{label} {act.name} {t1} + {t2}: {err:.3g}")
    return failures


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asym", [False, True])
def test_every_int4_tactic(ext, dtype, asym):
    """Each GEMM1 tactic (with a fixed GEMM2) and each GEMM2 tactic (with a fixed GEMM1), on
    shapes with K and N residues per tile (H = 160, I = 96: K % 64 == 32), groups 32 and 64,
    few and many rows per expert, a gated and a plain activation."""
    runner = _runner(ext, dtype)
    g1_list = _names(runner, 1)
    g2_list = _names(runner, 2)
    if not g1_list or not g2_list:
        pytest.skip("no int4 tactic in this build")
    plain1 = next(n for n, gated in g1_list if not gated)
    plain2 = g2_list[0][0]
    failures = []
    for num_tokens, top_k in ((1, 2), (7, 3), (300, 2)):
        for act in (ActivationType.Swiglu, ActivationType.Gelu):
            for g1, g2 in ((32, 32), (160, 96), (32, 96)):
                case = _case(dtype, num_tokens, 160, 96, 6, top_k, act, g1, g2, asym,
                             seed=num_tokens * 31 + g1 + g2)
                failures += _check_pairs(runner, dtype, case, act, g1, g2, g1_list,
                                         [t2 for t2, _ in g2_list], plain1, plain2,
                                         f"T={num_tokens} G={g1}/{g2}")
    assert not failures, "\n".join(failures[:20])


def test_int4_large_and_empty(ext):
    """T = 4096 over 8 experts with one expert empty, and all tokens on one expert (k = E)."""
    dtype = torch.bfloat16
    runner = _runner(ext, dtype)
    names1 = [n for n, g in _names(runner, 1, decode=False) if not g]
    names2 = [n for n, _ in _names(runner, 2, decode=False)]
    if not names1:
        pytest.skip("no int4 tactic in this build")
    x, ids, route, fc1, fc2, _ = _case(dtype, 4096, 256, 128, 8, 2, ActivationType.Swiglu, 64,
                                       128, True, seed=5)
    ids = torch.where(ids == 3, torch.full_like(ids, 4), ids)  # expert 3 gets no row
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % 8, ids[:, 1])
    ids[:, 1] = torch.where(ids[:, 1] == 3, torch.full_like(ids[:, 1], 5), ids[:, 1])
    ids[:, 0] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 1] + 2) % 8, ids[:, 0])
    ref = reference_moe(x, ids, route, fc1[3], fc2[3], ActivationType.Swiglu)
    for t1 in names1:
        for t2 in names2[:1] + names2[-1:]:
            out = _run(runner, x, ids, route, fc1, fc2, ActivationType.Swiglu, t1, t2, 64, 128)
            assert rel_l2(out.float(), ref) <= TOLERANCE[dtype], (t1, t2)
    # k = E = 4: every token on every expert.
    x, ids, route, fc1, fc2, _ = _case(dtype, 33, 128, 64, 4, 4, ActivationType.Swiglu, 128, 64,
                                       False, seed=6)
    ref = reference_moe(x, ids, route, fc1[3], fc2[3], ActivationType.Swiglu)
    out = _run(runner, x, ids, route, fc1, fc2, ActivationType.Swiglu, names1[0], names2[0], 128,
               64)
    assert rel_l2(out.float(), ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_decode_tactics_long_k(ext, dtype):
    """Every int4 decode tactic on K long enough that each warp of a K-split block walks several
    batches of 128-long chunks (H = 1056 = 8 x 128 + 32: also a lone 32-long slice), groups of
    32 to 352 and per-channel scales, with and without zero points (integer, and quarter-integer
    ones, which take the fp32 conversion), 1 to 160 tokens, SwiGLU and ReLU (non-negative GEMM2
    inputs, where a per-group error of the zero point's term does not average out); and groups
    of whole 128-long chunks without zero points (H = 1152, I = 384: G = 128 and per-channel),
    where the tensor-core decode kernels scale each chunk's sums instead of the weights."""
    runner = _runner(ext, dtype)
    decode1 = _names(runner, 1, decode=True)
    decode2 = [n for n, _ in _names(runner, 2, decode=True)]
    if not decode1 or not decode2:
        pytest.skip("no int4 decode tactic in this build")
    plain1 = next(n for n, gated in _names(runner, 1, decode=False) if not gated)
    plain2 = _names(runner, 2, decode=False)[0][0]
    failures = []
    swiglu, relu = ActivationType.Swiglu, ActivationType.Relu
    cases = ((1, 1056, 288, (96, 288), False, swiglu), (5, 1056, 288, (32, 96), True, swiglu),
             (40, 1056, 288, (1056, 32), False, swiglu), (160, 1056, 288, (352, 96), True, relu),
             (3, 1152, 384, (128, 384), False, relu), (40, 1152, 384, (1152, 128), False, swiglu),
             (9, 1152, 384, (128, 128), True, relu), (6, 1152, 384, (64, 128), "fraction", relu))
    for num_tokens, hidden, inter, (g1, g2), asym, act in cases:
        case = _case(dtype, num_tokens, hidden, inter, 4, 2, act, g1, g2, asym,
                     seed=num_tokens + g1)
        failures += _check_pairs(runner, dtype, case, act, g1, g2, decode1, decode2, plain1,
                                 plain2, f"T={num_tokens} H={hidden} G={g1}/{g2} asym={asym}")
    assert not failures, "\n".join(failures[:20])


def test_int4_bad_group_size_raises(ext):
    runner = _runner(ext, torch.bfloat16)
    names1 = _names(runner, 1)
    names2 = _names(runner, 2)
    if not names1:
        pytest.skip("no int4 tactic in this build")
    x, ids, route, fc1, fc2, _ = _case(torch.bfloat16, 4, 128, 64, 4, 2, ActivationType.Gelu, 64,
                                       64, False, seed=7)
    plain1 = next(n for n, g in names1 if not g)
    for g1, g2 in ((48, 64), (64, 0), (256, 64)):
        with pytest.raises(ValueError, match="group_size"):
            _run(runner, x, ids, route, fc1, fc2, ActivationType.Gelu, plain1, names2[0][0],
                 g1, g2)
