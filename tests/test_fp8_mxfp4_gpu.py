"""The FP8 (e4m3) and MXFP4 (e2m1 + e8m0) weight-only kernels on a GPU: every compiled fp8 and
mxfp4 tactic through the C++ runner directly, then the public call, CUDA-graph capture and a
gpt-oss checkpoint, against ``reference_moe`` on weights dequantised HERE from the format
definitions (/work/fp8_spec.md; docs/architecture.md):

- fp8: ``w = round_to_dtype(float32(v) * s)``, ``v`` the e4m3 value (torch's float8 -> float32
  conversion, exact), ``s`` float32 per (K-group, column);
- mxfp4: ``w = round_to_dtype(value * 2^(x - 127))``, ``value`` from the OCP e2m1 table typed in
  below, byte ``j`` holding ``k = 2j`` (low nibble) and ``2j + 1`` (high nibble), ``x`` the e8m0
  code per (32-block, column).

Inputs are random (never zeros); outputs start as NaN and workspaces as 0xFF bytes. Shapes have
K and N residues per tile (H = 160, I = 96: K % 64 == 32); T in {1, 7, 300, 4096} and 0 through
the public call; empty experts. Relative L2 bounds: bf16 1e-2, fp16 2e-3 (recorded per format
and dtype). MXFP4 scales keep every weight and product well inside fp16's range.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch

from _helpers import captured_graph, random_routing, random_tokens, record_error, rel_l2
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
#: C++ DType values of the two weight formats (kFp8E4m3 = 5, kMxfp4 = 6).
WEIGHT_ENUM = {"fp8": 5, "mxfp4": 6}
FORMATS = ["fp8", "mxfp4"]
#: OCP MX v1.0 FP4 (E2M1) values of codes 0..15.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
GATED = (ActivationType.Swiglu, ActivationType.Geglu)


class Weights(NamedTuple):
    """One GEMM's weights in the kernel layout and their dequantised float32 values."""

    weights: torch.Tensor  # fp8 [E, N, K] or uint8 [E, N, K/2]
    scales: torch.Tensor  # float32 [E, K/G, N] or uint8 [E, K/32, N]
    group: int
    deq: torch.Tensor  # float32 [E, N, K], rounded once to the activation dtype


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is available")
    return _ext.load_extension()


def _fp8(num_experts, n, k, group, dtype, gen):
    """Random e4m3 codes (no NaN) of moderate magnitude (|v| in [2^-3, 2^4]) and float32 scales
    making |w| ~ 1/sqrt(K)."""
    sign = torch.randint(0, 2, (num_experts, n, k), generator=gen, device=DEVICE) * 0x80
    exponent = torch.randint(4, 12, (num_experts, n, k), generator=gen, device=DEVICE)
    mantissa = torch.randint(0, 8, (num_experts, n, k), generator=gen, device=DEVICE)
    codes = (sign | (exponent << 3) | mantissa).to(torch.uint8)  # exponent <= 11: never NaN
    weights = codes.view(torch.float8_e4m3fn)
    groups = k // group
    scales = (torch.rand(num_experts, groups, n, generator=gen, device=DEVICE) + 0.5) / (
        4 * k**0.5)
    s_full = scales.repeat_interleave(group, dim=1).transpose(1, 2)  # [E, N, K]
    deq = (weights.to(torch.float32) * s_full).to(dtype).float()
    return Weights(weights.contiguous(), scales.contiguous(), group, deq)


def _mxfp4(num_experts, n, k, dtype, gen):
    """Random e2m1 codes and e8m0 codes in 127-8 .. 127-5 (scales 2^-8 .. 2^-5): |w| <= 0.19,
    products and sums far inside fp16's range."""
    codes = torch.randint(0, 16, (num_experts, n, k), generator=gen, device=DEVICE,
                          dtype=torch.int32)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    x = torch.randint(119, 123, (num_experts, k // 32, n), generator=gen, device=DEVICE,
                      dtype=torch.int32)
    table = torch.tensor(E2M1, device=DEVICE)
    scale = torch.pow(2.0, (x - 127).float()).repeat_interleave(32, dim=1).transpose(1, 2)
    deq = (table[codes.long()] * scale).to(dtype).float()
    return Weights(packed.contiguous(), x.to(torch.uint8).contiguous(), 32, deq)


def _layer(fmt, num_experts, hidden, inter, gated, dtype, groups, gen):
    n1 = 2 * inter if gated else inter
    if fmt == "fp8":
        return (_fp8(num_experts, n1, hidden, groups[0] or hidden, dtype, gen),
                _fp8(num_experts, hidden, inter, groups[1] or inter, dtype, gen))
    return _mxfp4(num_experts, n1, hidden, dtype, gen), _mxfp4(num_experts, hidden, inter,
                                                                 dtype, gen)


def _runner(ext, fmt, dtype):
    enum = _ext.dtype_to_enum(dtype)
    return ext.MoeRunner(enum, WEIGHT_ENUM[fmt], enum)


def _names(runner, gemm, fmt, gated_activation=True):
    """The runnable ``fmt`` tactics of GEMM ``gemm`` (tensor-core ones first, then the
    weight-streaming decode ones); the gated decode tactics only for a gated activation."""
    descs = [d for d in runner.tactics(gemm) if d["weight_dtype"] == fmt]
    assert all(f"_{fmt}_" in d["name"] for d in descs)
    assert not any(int(d.get("split_k", 1)) > 1 for d in descs), "no split-K tactics"
    assert all(d.get("decode") for d in descs if d.get("gated")), "gated: decode tactics only"
    return [d["name"] for d in descs if gated_activation or not d.get("gated")]


def _run(runner, x, ids, route, fc1, fc2, act, t1, t2):
    """run_moe with a NaN-poisoned output and a 0xFF workspace."""
    num_tokens, hidden = x.shape
    inter = fc2.deq.shape[2]
    experts = fc1.weights.shape[0]
    enum = _ext.activation_to_enum(act)
    size = runner.workspace_size(num_tokens, hidden, inter, experts, ids.shape[1], enum, t1, t2,
                                 False)
    workspace = torch.full((max(size, 1),), 0xFF, dtype=torch.uint8, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    runner.run_moe(
        num_tokens, hidden, inter, experts, ids.shape[1], 0, enum, x.data_ptr(), ids.data_ptr(),
        route.data_ptr(), fc1.weights.data_ptr(), fc2.weights.data_ptr(), 0, 0, 0, 0, 0,
        out.data_ptr(), workspace.data_ptr(), size, t1, t2,
        torch.cuda.current_stream().cuda_stream, fc1_scales=fc1.scales.data_ptr(),
        fc2_scales=fc2.scales.data_ptr(), fc1_zeros=0, fc2_zeros=0, fc1_group_size=fc1.group,
        fc2_group_size=fc2.group)
    torch.cuda.synchronize()
    assert not out.isnan().any(), f"{t1} + {t2}: some output elements were not written"
    return out


# ------------------------------------------------------------------ every tactic, raw runner

#: fp8 group sizes (G1, G2): 5 and 3 groups of 32, per-channel, mixed; mxfp4: always 32.
_FP8_GROUPS = [(32, 32), (None, None), (32, None)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tactic(ext, fmt, dtype):
    """Each GEMM1 tactic (with a fixed GEMM2) and each GEMM2 tactic (with a fixed GEMM1), on
    H = 160, I = 96 over 6 experts, T = 1, 7 and 300, a gated and a plain activation."""
    runner = _runner(ext, fmt, dtype)
    names2 = _names(runner, 2, fmt)
    assert _names(runner, 1, fmt) and names2, f"no {fmt} tactic in this build"
    failures = []
    for groups in _FP8_GROUPS if fmt == "fp8" else [(32, 32)]:
        for act in (ActivationType.Swiglu, ActivationType.Gelu):
            names1 = _names(runner, 1, fmt, gated_activation=act in GATED)
            pairs = [(t1, names2[0]) for t1 in names1] + [(names1[0], t2) for t2 in names2[1:]]
            gen = torch.Generator(device=DEVICE).manual_seed(len(failures) + 17)
            fc1, fc2 = _layer(fmt, 6, 160, 96, act in GATED, dtype, groups, gen)
            for num_tokens, top_k in ((1, 2), (7, 3), (300, 2)):
                x = torch.randn(num_tokens, 160, generator=gen, device=DEVICE).to(dtype)
                ids, route = random_routing(num_tokens, 6, top_k, DEVICE, gen)
                ref = reference_moe(x, ids, route, fc1.deq, fc2.deq, act)
                for t1, t2 in pairs:
                    label = f"T={num_tokens} {act.name} G={groups} {t1} + {t2}"
                    try:
                        out = _run(runner, x, ids, route, fc1, fc2, act, t1, t2)
                    except (RuntimeError, ValueError, AssertionError) as exc:
                        failures.append(f"{label}: {exc}")
                        continue
                    err = record_error(f"{fmt}_{str(dtype)[6:]}", rel_l2(out.float(), ref))
                    if not err <= TOLERANCE[dtype]:
                        failures.append(f"{label}: rel err {err:.3g}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("fmt", FORMATS)
def test_large_and_empty_experts(ext, fmt):
    """T = 4096 over 8 experts with experts 3 and 6 empty, every GEMM1 tactic with the first and
    last GEMM2 tactic; then k = E (every token on every expert)."""
    dtype = torch.bfloat16
    runner = _runner(ext, fmt, dtype)
    names1, names2 = _names(runner, 1, fmt), _names(runner, 2, fmt)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    fc1, fc2 = _layer(fmt, 8, 256, 128, True, dtype, (64, 128), gen)
    x = torch.randn(4096, 256, generator=gen, device=DEVICE).to(dtype)
    logits = torch.randn(4096, 8, generator=gen, device=DEVICE)
    logits[:, [3, 6]] = float("-inf")  # never chosen
    route, ids = torch.softmax(logits, -1).topk(2, dim=-1)
    ids, route = ids.to(torch.int32), (route / route.sum(-1, keepdim=True)).float()
    assert not ((ids == 3) | (ids == 6)).any()
    ref = reference_moe(x, ids, route, fc1.deq, fc2.deq, ActivationType.Swiglu)
    for t1 in names1:
        for t2 in dict.fromkeys(names2[:1] + names2[-1:]):
            out = _run(runner, x, ids, route, fc1, fc2, ActivationType.Swiglu, t1, t2)
            err = record_error(f"{fmt}_bfloat16", rel_l2(out.float(), ref))
            assert err <= TOLERANCE[dtype], (t1, t2, err)
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    fc1, fc2 = _layer(fmt, 4, 128, 64, True, dtype, (128, 64), gen)
    x = torch.randn(33, 128, generator=gen, device=DEVICE).to(dtype)
    ids, route = random_routing(33, 4, 4, DEVICE, gen)
    ref = reference_moe(x, ids, route, fc1.deq, fc2.deq, ActivationType.Swiglu)
    out = _run(runner, x, ids, route, fc1, fc2, ActivationType.Swiglu, names1[0], names2[0])
    assert rel_l2(out.float(), ref) <= TOLERANCE[dtype]


def test_bad_group_sizes_raise(ext):
    runner = _runner(ext, "fp8", torch.bfloat16)
    names1, names2 = _names(runner, 1, "fp8"), _names(runner, 2, "fp8")
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    fc1, fc2 = _layer("fp8", 4, 128, 64, False, torch.bfloat16, (64, 64), gen)
    x = torch.randn(4, 128, generator=gen, device=DEVICE).to(torch.bfloat16)
    ids, route = random_routing(4, 4, 2, DEVICE, gen)
    for g1, g2 in ((48, 64), (64, 0), (256, 64)):
        bad1, bad2 = fc1._replace(group=g1), fc2._replace(group=g2)
        with pytest.raises(ValueError, match="group_size"):
            _run(runner, x, ids, route, bad1, bad2, ActivationType.Gelu, names1[0], names2[0])
    mx = _runner(ext, "mxfp4", torch.bfloat16)
    m1, m2 = _layer("mxfp4", 4, 128, 64, False, torch.bfloat16, (32, 32), gen)
    with pytest.raises(ValueError, match="group_size"):  # MXFP4 blocks are 32, nothing else
        _run(mx, x, ids, route, m1._replace(group=64), m2, ActivationType.Gelu,
             _names(mx, 1, "mxfp4")[0], _names(mx, 2, "mxfp4")[0])


# ------------------------------------------------------------------ the public call


def _public_kwargs(fmt):
    return ({"use_fp8_woq_group_scaling": True} if fmt == "fp8"
            else {"use_w4_group_scaling": True})


def _call(fmt, x, ids, route, fc1, fc2, output=None, **kwargs):
    output = (torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE) if output is None
              else output)
    result = cutlass_fused_moe(x, ids, route, fc1.weights, fc2.weights, x.dtype, output=output,
                               quant_scales=[fc1.scales, fc2.scales], **_public_kwargs(fmt),
                               **kwargs)
    assert isinstance(result, list) and result[0] is output
    return output


@functools.lru_cache(maxsize=8)
def _cached_layer(fmt, dtype, hidden, inter, groups, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return _layer(fmt, 8, hidden, inter, True, dtype, groups, gen)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 300, 4096])
def test_public_call(fmt, dtype, num_tokens):
    """cutlass_fused_moe with use_fp8_woq_group_scaling=True (float32 scales) or
    use_w4_group_scaling=True with uint8 (e8m0) scales, default tactics."""
    fc1, fc2 = _cached_layer(fmt, dtype, 384, 256, (128, 64), 8)
    x, ids, route = random_tokens(num_tokens, 384, 8, 2, dtype, 9000 + num_tokens, DEVICE)
    if num_tokens == 0:  # nothing to launch: an empty result of the right shape
        out = cutlass_fused_moe(x, ids, route, fc1.weights, fc2.weights, dtype,
                                quant_scales=[fc1.scales, fc2.scales], **_public_kwargs(fmt))[0]
        assert out.shape == (0, 384) and out.is_cuda and out.dtype == dtype
        return
    out = _call(fmt, x, ids, route, fc1, fc2)
    assert not out.isnan().any()
    ref = reference_moe(x, ids, route, fc1.deq, fc2.deq)
    err = record_error(f"{str(dtype)[6:]}_x_{fmt}", rel_l2(out.float(), ref))
    assert err <= TOLERANCE[dtype], f"relative L2 error vs the dequantised reference {err:.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_public_call_refuses_mixed_formats(fmt):
    fc1, fc2 = _cached_layer(fmt, torch.bfloat16, 384, 256, (128, 64), 8)
    other1, _ = _cached_layer("mxfp4" if fmt == "fp8" else "fp8", torch.bfloat16, 384, 256,
                              (128, 64), 8)
    x, ids, route = random_tokens(4, 384, 8, 2, torch.bfloat16, 1, DEVICE)
    with pytest.raises(ValueError):
        cutlass_fused_moe(x, ids, route, fc1.weights, fc2.weights, torch.bfloat16,
                          quant_scales=[other1.scales, fc2.scales], **_public_kwargs(fmt))


def test_gpt_oss_checkpoint_end_to_end():
    """A gpt-oss layer written here (interleaved gate/up rows, blocks and scales as stored,
    biases), imported with load_mxfp4_experts and run with gpt-oss's clamped SwiGLU
    (alpha 1.702, beta 1, limit 7): matches the reference on the chosen values."""
    from cutlass_moe.mxfp4_checkpoints import load_mxfp4_experts

    dtype, experts_n, hidden, inter = torch.bfloat16, 4, 256, 128
    gen = torch.Generator(device=DEVICE).manual_seed(10)
    gate, up = (_mxfp4(experts_n, inter, hidden, dtype, gen) for _ in range(2))
    down = _mxfp4(experts_n, hidden, inter, dtype, gen)
    b_gate, b_up = (torch.randn(experts_n, inter, generator=gen, device=DEVICE) * 0.1
                    for _ in range(2))
    b_down = torch.randn(experts_n, hidden, generator=gen, device=DEVICE) * 0.1

    def as_blocks(w):  # kernel bytes [E, N, K/2] -> gpt-oss [E, N, K/32, 16]; scales [E, N, K/32]
        return (w.weights.view(w.weights.shape[0], w.weights.shape[1], -1, 16),
                w.scales.transpose(1, 2).contiguous())

    (gb, gs), (ub, us), (db, ds) = as_blocks(gate), as_blocks(up), as_blocks(down)
    interleave = torch.stack([torch.arange(inter), torch.arange(inter) + inter], 1).flatten()
    prefix = "model.layers.0.mlp.experts"
    state = {f"{prefix}.gate_up_proj_blocks": torch.cat([gb, ub], 1)[:, interleave],
             f"{prefix}.gate_up_proj_scales": torch.cat([gs, us], 1)[:, interleave],
             f"{prefix}.gate_up_proj_bias": torch.cat([b_gate, b_up], 1)[:, interleave]
             .to(torch.bfloat16),
             f"{prefix}.down_proj_blocks": db, f"{prefix}.down_proj_scales": ds,
             f"{prefix}.down_proj_bias": b_down.to(torch.bfloat16)}
    experts = load_mxfp4_experts(state, prefix, bias_dtype=dtype)
    swiglu = {"swiglu_alpha": torch.full((experts_n,), 1.702, device=DEVICE),
              "swiglu_beta": torch.ones(experts_n, device=DEVICE),
              "swiglu_limit": torch.full((experts_n,), 7.0, device=DEVICE)}
    fc1_deq = torch.cat([up.deq, gate.deq], dim=1)
    b1 = torch.cat([b_up, b_gate], 1).to(dtype)
    for num_tokens in (3, 200):
        x, ids, route = random_tokens(num_tokens, hidden, experts_n, 2, dtype, num_tokens,
                                      DEVICE)
        out = cutlass_fused_moe(x, ids, route, experts.fc1_weights, experts.fc2_weights, dtype,
                                quant_scales=experts.quant_scales, use_w4_group_scaling=True,
                                fc1_expert_biases=experts.fc1_bias,
                                fc2_expert_biases=experts.fc2_bias, **swiglu)[0]
        ref = reference_moe(x, ids, route, fc1_deq, down.deq, ActivationType.Swiglu, b1,
                            b_down.to(dtype), **swiglu)
        err = record_error("bfloat16_x_mxfp4_gpt_oss", rel_l2(out.float(), ref))
        assert err <= TOLERANCE[dtype], err


# ------------------------------------------------------------------ graphs


@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_capture_matches_eager(fmt):
    dtype = torch.bfloat16
    fc1, fc2 = _cached_layer(fmt, dtype, 384, 256, (64, 128), 11)
    x, ids, route = random_tokens(64, 384, 8, 2, dtype, 64, DEVICE)
    static = (x.clone(), ids.clone(), route.clone())
    static_out = torch.empty(64, 384, dtype=dtype, device=DEVICE)

    def call():
        _call(fmt, *static, fc1, fc2, output=static_out)

    graph = captured_graph(call)
    for seed in (65, 66):
        x, ids, route = random_tokens(64, 384, 8, 2, dtype, seed, DEVICE)
        for dst, src in zip(static, (x, ids, route)):
            dst.copy_(src)
        static_out.fill_(float("nan"))
        graph.replay()
        eager = _call(fmt, x, ids, route, fc1, fc2)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        assert torch.equal(_call(fmt, x, ids, route, fc1, fc2), eager), "not repeatable"
