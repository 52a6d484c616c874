"""W8A16 on a GPU: fp16/bf16 activations x int8 expert weights with per-channel scales.

Two baselines (docs/architecture.md, "Correctness"):
- ``reference_moe`` on the dequantised weights ``q * scale`` (float32, unrounded): what the
  kernels compute, so the bf16 tolerance applies to both activation dtypes (1e-2);
  recorded under ``<dtype>_x_int8``;
- the unquantised fp16/bf16 layer the weights came from: the end-to-end error of int8
  weight-only quantisation, recorded under ``int8_vs_unquantized_<dtype>`` and bounded by
  ``UNQUANTIZED_BOUND``.

Weights are N(0, 1/fan_in); every output buffer is poisoned with NaN before the run.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch

from _helpers import (
    captured_graph,
    check_over_tile_groups,
    clamped_swiglu_params,
    descriptors,
    random_tokens,
    record_error,
    rel_l2,
)
from cutlass_moe import (
    ActivationType,
    _ext,
    autotune,
    cutlass_fused_moe,
    reference_moe,
    swap_w13_to_w31,
    tactics,
)
from cutlass_moe.quantization import (
    dequantize,
    quantize_int8_per_channel,
    quantize_moe_weights_int8,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
#: int8 weight-only against the dequantised reference: the bf16 tolerance for both dtypes.
TOLERANCE = 1e-2
#: int8 against the unquantised layer. Per-channel symmetric int8 of N(0, 1/fan_in) rows: the
#: step is max|row|/127 ~ 4 sigma/127 (the maximum of 1e3-1e4 normal samples is ~3.5-4.5 sigma),
#: the rounding error is uniform with std step/sqrt(12) ~ 0.9 % of sigma per weight; two GEMMs
#: and SwiGLU make that ~1.4-1.5 % of the output (measured on CPU: 1.37-1.46 % for H=1024-2048,
#: I=512-1408), plus the 16-bit rounding of activations and intermediates (<= 0.4 % for bf16).
#: 3e-2 leaves a 2x margin and still catches a wrong scale, row order or dtype (>= 10 %).
UNQUANTIZED_BOUND = 3e-2
GATED = (ActivationType.Swiglu, ActivationType.Geglu)


class Layer(NamedTuple):
    fc: tuple[torch.Tensor, torch.Tensor]  # the unquantised fp16/bf16 weights
    q: tuple[torch.Tensor, torch.Tensor]  # int8, kernel layout
    scales: list[torch.Tensor]  # [fc31_scale [E, N1], fc2_scale [E, H]], activation dtype
    deq: tuple[torch.Tensor, torch.Tensor]  # float32 q * scale


@functools.lru_cache(maxsize=2)
def _layer(num_experts, hidden, inter, gated, dtype, seed=0):
    """A layer's weights on the GPU, cached so parametrised runs that differ only in tokens
    share them (at most two alive, to bound memory: Mixtral's slice is ~3.5 GB)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n1 = 2 * inter if gated else inter
    fc1 = torch.randn(num_experts, n1, hidden, device=DEVICE, dtype=dtype, generator=gen)
    fc2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=dtype, generator=gen)
    fc1.mul_(hidden**-0.5)
    fc2.mul_(inter**-0.5)
    q1, q2, scales = quantize_moe_weights_int8(fc1, fc2)
    assert scales[0].dtype == scales[1].dtype == dtype
    deq = (dequantize(q1, scales[0], torch.float32), dequantize(q2, scales[1], torch.float32))
    return Layer((fc1, fc2), (q1, q2), scales, deq)


def _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed):
    """Random ``x [T, H]`` and softmax/top-k routing (distinct ids per row)."""
    return random_tokens(num_tokens, hidden, num_experts, top_k, dtype, 2000 + seed, DEVICE)


def _run(x, ids, scales, layer, out_dtype=None, **kwargs):
    """Runs the int8 layer with a NaN-poisoned ``output=``; checks it is returned and written."""
    out_dtype = out_dtype or x.dtype
    output = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=out_dtype, device=DEVICE)
    result = cutlass_fused_moe(x, ids, scales, *layer.q, out_dtype, output=output,
                               quant_scales=layer.scales, use_int8_woq_per_channel=True,
                               **kwargs)
    assert isinstance(result, list) and result[0] is output
    assert not output.isnan().any(), "some output elements were not written"
    return output


def _reference(x, ids, scales, weights, **kwargs):
    only_op = ("tactics", "check_inputs", "workspace_buffer", "tune_max_num_tokens")
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in only_op}
    return reference_moe(x, ids, scales, *weights, **ref_kwargs)


def _check(x, ids, scales, layer, out_dtype=None, unquantized=False, **kwargs):
    """Output vs the dequantised reference (and, with ``unquantized``, vs the unquantised
    layer); both errors are recorded for the terminal summary."""
    out = _run(x, ids, scales, layer, out_dtype, **kwargs)
    name = str(x.dtype).removeprefix("torch.")
    ref = _reference(x, ids, scales, layer.deq, **kwargs)
    err = record_error(f"{name}_x_int8", rel_l2(out.float(), ref))
    assert err <= TOLERANCE, f"relative L2 error vs the dequantised reference {err:.3g}"
    if unquantized:
        full = _reference(x, ids, scales, layer.fc, **kwargs)
        e2e = record_error(f"int8_vs_unquantized_{name}", rel_l2(out.float(), full))
        assert e2e <= UNQUANTIZED_BOUND, f"relative L2 error vs the unquantised layer {e2e:.3g}"
    return out, ref


# ------------------------------------------------------------------ shapes x tokens

# (H, I, E, k): Qwen1.5-MoE / DeepSeek-V2-Lite's expert shape, Qwen3-30B-A3B's, and three of
# Mixtral-8x7B's eight experts (a slice: the full layer is 8 x 176 M weights).
_SHAPES = [(2048, 1408, 4, 2), (2048, 768, 4, 2), (4096, 14336, 3, 2)]
_TOKENS = [1, 7, 64, 1000]
# dtype, then shape, then T: consecutive cases share the cached layer.
_CORE_CASES = [
    pytest.param(dtype, h, i, e, k, t, id=f"{str(dtype)[6:]}-H{h}-I{i}-E{e}-k{k}-T{t}")
    for dtype in DTYPES for h, i, e, k in _SHAPES for t in _TOKENS
]


@pytest.mark.parametrize("dtype,hidden,inter,num_experts,top_k,num_tokens", _CORE_CASES)
def test_shapes_and_tokens(dtype, hidden, inter, num_experts, top_k, num_tokens):
    layer = _layer(num_experts, hidden, inter, True, dtype)
    x, ids, scales = _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed=num_tokens)
    out, _ = _check(x, ids, scales, layer, unquantized=True)
    assert out.shape == (num_tokens, hidden)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tokens(dtype):
    layer = _layer(4, 2048, 768, True, dtype)
    x, ids, scales = _tokens(0, 2048, 4, 2, dtype, seed=0)
    out = cutlass_fused_moe(x, ids, scales, *layer.q, dtype, quant_scales=layer.scales,
                            use_int8_woq_per_channel=True)[0]
    assert out.shape == (0, 2048) and out.is_cuda


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_float32(dtype):
    layer = _layer(4, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(200, 2048, 4, 2, dtype, seed=3)
    out, _ = _check(x, ids, scales, layer, out_dtype=torch.float32, unquantized=True)
    assert out.dtype == torch.float32


# ------------------------------------------------------------------ every int8 tactic


def _activations_of(desc):
    if "activations" in desc:
        return [a for a in (ActivationType.Swiglu, ActivationType.Relu)
                if tactics.supports_activation(desc, a)]
    return [ActivationType.Swiglu, ActivationType.Relu]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemm", [1, 2])
def test_every_int8_tactic(dtype, gemm):
    """Each runnable int8 tactic of one GEMM, the other GEMM on its default, forced through
    ``tactics=(name1, name2)``: gated and plain activations, decode- and prefill-sized T."""
    runner = _ext.get_runner(dtype, torch.int8, dtype)
    descs = descriptors(runner, gemm)
    assert descs, f"no runnable int8 GEMM{gemm} tactic"
    assert all("_int8_" in str(d["name"]) for d in descs)
    failures = []
    for desc in descs:
        for activation in _activations_of(desc):
            layer = _layer(4, 2048, 768, activation in GATED, dtype, seed=1)
            other = [d for d in descriptors(runner, 3 - gemm)
                     if tactics.supports_activation(d, activation)]
            other_name = tactics.default_tactic(other, 300 * 2 / 4)
            names = (desc["name"], other_name) if gemm == 1 else (other_name, desc["name"])
            # A GEMM2 split over K runs up to SPLIT_K_MAX_ROWS rows (64 tokens x k=2 here), and
            # is refused above.
            split = int(desc.get("split_k", 1)) > 1
            if split:
                x, ids, scales = _tokens(300, 2048, 4, 2, dtype, seed=300)
                with pytest.raises(ValueError, match="splits GEMM2 over K"):
                    _run(x, ids, scales, layer, tactics=names, activation_type=activation)
            for num_tokens in (1, 64) if split else (1, 300):
                x, ids, scales = _tokens(num_tokens, 2048, 4, 2, dtype, seed=num_tokens)
                try:
                    out = _run(x, ids, scales, layer, tactics=names, activation_type=activation)
                    ref = reference_moe(x, ids, scales, *layer.deq, activation)
                    err = record_error(f"{str(dtype)[6:]}_x_int8", rel_l2(out.float(), ref))
                except (RuntimeError, ValueError, AssertionError) as exc:  # report every one
                    failures.append(f"{names} {activation.name} T={num_tokens}: {exc}")
                    continue
                if not err <= TOLERANCE:
                    failures.append(f"{names} {activation.name} T={num_tokens}: rel err {err:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("gemm", [1, 2])
def test_every_int8_tactic_over_several_tile_groups(gemm):
    """Every unsplit int8 tactic on experts of about 1300 rows and K = 8192: several tile groups
    per expert, the last one partial (src/grouped_gemm/tile_order.cuh)."""
    dtype, num_experts, k, num_tokens = torch.bfloat16, 2, 8192, 2600
    runner = _ext.get_runner(dtype, torch.int8, dtype)
    swiglu = ActivationType.Swiglu
    layer = _layer.__wrapped__(num_experts, k, k, True, dtype, seed=31)  # not kept in the cache
    x, ids, scales = _tokens(num_tokens, k, num_experts, 1, dtype, seed=31)
    rows = int(torch.bincount(ids.flatten(), minlength=num_experts).min())
    ref = reference_moe(x, ids, scales, *layer.deq)
    other = tactics.default_tactic(
        [d for d in descriptors(runner, 3 - gemm) if tactics.supports_activation(d, swiglu)],
        num_tokens / num_experts)

    def run(name):
        return _run(x, ids, scales, layer, tactics=(name, other) if gemm == 1 else (other, name))

    failures = check_over_tile_groups(descriptors(runner, gemm), run, ref, rows, k,
                                      f"{str(dtype)[6:]}_x_int8", TOLERANCE)
    assert not failures, "\n".join(failures)


def test_16bit_tactics_are_refused_for_int8_weights():
    dtype = torch.bfloat16
    layer = _layer(4, 2048, 768, True, dtype)
    x, ids, scales = _tokens(8, 2048, 4, 2, dtype, seed=2)
    names = tuple(str(_ext.get_runner(dtype, dtype, dtype).tactics(g)[0]["name"]) for g in (1, 2))
    with pytest.raises(ValueError, match="not a runnable GEMM1 tactic.*available: sm80_bf16_int8_"):
        _run(x, ids, scales, layer, tactics=names)


# ------------------------------------------------------------------ activations, biases, ranks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [ActivationType.Swiglu, ActivationType.Geglu,
                                        ActivationType.Relu, ActivationType.Identity],
                         ids=lambda a: a.name)
def test_activations_with_biases(dtype, activation):
    layer = _layer(4, 2048, 768, activation in GATED, dtype, seed=4)
    x, ids, scales = _tokens(257, 2048, 4, 2, dtype, seed=4)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    b1 = torch.randn(layer.q[0].shape[:2], device=DEVICE, generator=gen).to(dtype) * 0.5
    b2 = torch.randn(layer.q[1].shape[:2], device=DEVICE, generator=gen).to(dtype) * 0.5
    _check(x, ids, scales, layer, activation_type=activation, unquantized=True)
    _check(x, ids, scales, layer, activation_type=activation, fc1_expert_biases=b1,
           fc2_expert_biases=b2, unquantized=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fc2_bias_only_on_tp_rank0(dtype):
    layer = _layer(4, 2048, 768, True, dtype, seed=4)
    x, ids, scales = _tokens(64, 2048, 4, 2, dtype, seed=6)
    b2 = torch.randn(layer.q[1].shape[:2], device=DEVICE).to(dtype)
    rank0, _ = _check(x, ids, scales, layer, fc2_expert_biases=b2, tp_size=2, tp_rank=0)
    rank1, _ = _check(x, ids, scales, layer, fc2_expert_biases=b2, tp_size=2, tp_rank=1)
    plain = _run(x, ids, scales, layer)
    assert torch.equal(rank1, plain)
    assert rel_l2(rank0.float(), plain.float()) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamped_swiglu(dtype):
    layer = _layer(4, 2048, 768, True, dtype, seed=4)
    x, ids, scales = _tokens(300, 2048, 4, 2, dtype, seed=7)
    x = x * 3  # so that the limit clamps
    clamp = clamped_swiglu_params(4, torch.Generator(device=DEVICE).manual_seed(7))
    out, _ = _check(x, ids, scales, layer, unquantized=True, **clamp)
    assert rel_l2(out.float(), _reference(x, ids, scales, layer.deq)) > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ep_rank", [0, 1, 3])
def test_expert_parallel_and_out_of_range_ids(dtype, ep_rank):
    ep_size, local = 4, 4
    layer = _layer(local, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(500, 2048, local * ep_size, 4, dtype, seed=8 + ep_rank)
    ids[0, 0] = -1
    ids[1, 1] = local * ep_size  # one past the last global expert
    ids[2, 2] = 2**31 - 1
    ids[4, :] = -7  # no valid choice at all: a zero row
    out, _ = _check(x, ids, scales, layer, ep_size=ep_size, ep_rank=ep_rank, unquantized=True)
    assert torch.all(out[4] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixtral_slice_as_an_expert_parallel_rank(dtype):
    """Three local experts of a 4-rank layer with Mixtral's shape and top-2 routing."""
    layer = _layer(3, 4096, 14336, True, dtype)
    x, ids, scales = _tokens(300, 4096, 12, 2, dtype, seed=9)
    _check(x, ids, scales, layer, ep_size=4, ep_rank=2, unquantized=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_edge_cases(dtype):
    layer = _layer(4, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(300, 2048, 4, 2, dtype, seed=10)
    one = ids.clone()
    one[:, 0] = 2  # every token to expert 2 ...
    one[:, 1] = 3  # ... and 3: experts 0 and 1 get no rows
    _check(x, one, scales, layer)
    dup = ids.clone()
    dup[:, 1] = dup[:, 0]  # duplicate ids in a row
    _check(x, dup, scales, layer)
    _check(x, ids[:, :1].contiguous(), torch.ones_like(scales[:, :1]), layer)  # k = 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_order_with_quantized_gate_first_weights(dtype):
    """A gate-first ("w13") checkpoint quantised as is, then converted with swap_w13_to_w31
    (weights dim=-2, fc31 scales dim=-1), matches an explicit gate/up reference."""
    num_experts, hidden, inter = 4, 1024, 512
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    gate, up = ((torch.randn(num_experts, inter, hidden, device=DEVICE, generator=gen)
                 * hidden**-0.5).to(dtype) for _ in range(2))
    down = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=gen)
            * inter**-0.5).to(dtype)
    q13, s13 = quantize_int8_per_channel(torch.cat([gate, up], dim=1))
    q2, s2 = quantize_int8_per_channel(down)
    q31, s31 = swap_w13_to_w31(q13), swap_w13_to_w31(s13, dim=-1)
    g_deq, u_deq = dequantize(q13, s13, torch.float32).split(inter, dim=1)
    d_deq = dequantize(q2, s2, torch.float32)
    x, ids, scales = _tokens(96, hidden, num_experts, 2, dtype, seed=11)
    expected = torch.zeros(96, hidden, device=DEVICE)
    for e in range(num_experts):
        for j in range(2):
            rows = (ids[:, j] == e).nonzero().squeeze(1)
            xe = x[rows].float()
            h = torch.nn.functional.silu(xe @ g_deq[e].t()) * (xe @ u_deq[e].t())
            expected[rows] += scales[rows, j, None] * (h @ d_deq[e].t())
    layer = Layer((gate, down), (q31, q2), [s31, s2], (None, None))
    out = _run(x, ids, scales, layer)
    assert rel_l2(out.float(), expected) <= TOLERANCE
    swapped = Layer(layer.fc, (q13, q2), [s13, s2], layer.deq)
    assert rel_l2(_run(x, ids, scales, swapped).float(), expected) > 0.1


# ------------------------------------------------------------------ determinism, graphs, compile


@pytest.mark.parametrize("dtype", DTYPES)
def test_determinism_and_allocated_output(dtype):
    layer = _layer(4, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(333, 2048, 4, 2, dtype, seed=12)
    kwargs = {"quant_scales": layer.scales, "use_int8_woq_per_channel": True}
    first = cutlass_fused_moe(x, ids, scales, *layer.q, dtype, **kwargs)[0]
    second = cutlass_fused_moe(x, ids, scales, *layer.q, dtype, **kwargs)[0]
    assert first.dtype == dtype and first.shape == x.shape
    assert torch.equal(first, second), "results differ between identical calls"


def test_cuda_graph_capture_and_replay():
    dtype = torch.bfloat16
    layer = _layer(4, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(64, 2048, 4, 2, dtype, seed=13)
    static_x, static_ids, static_scales = x.clone(), ids.clone(), scales.clone()
    static_out = torch.empty(64, 2048, dtype=dtype, device=DEVICE)
    kwargs = {"quant_scales": layer.scales, "use_int8_woq_per_channel": True}

    graph = captured_graph(lambda: cutlass_fused_moe(static_x, static_ids, static_scales,
                                                     *layer.q, dtype, output=static_out,
                                                     **kwargs))
    for seed in (14, 15):
        x, ids, scales = _tokens(64, 2048, 4, 2, dtype, seed=seed)
        static_x.copy_(x)
        static_ids.copy_(ids)
        static_scales.copy_(scales)
        static_out.fill_(float("nan"))
        graph.replay()
        eager = cutlass_fused_moe(x, ids, scales, *layer.q, dtype, **kwargs)[0]
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)


class _Int8Block(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.register_buffer("q1", layer.q[0])
        self.register_buffer("q2", layer.q[1])
        self.register_buffer("s1", layer.scales[0])
        self.register_buffer("s2", layer.scales[1])

    def forward(self, x, ids, scales):
        out = cutlass_fused_moe(x * 2, ids, scales, self.q1, self.q2, x.dtype,
                                quant_scales=[self.s1, self.s2],
                                use_int8_woq_per_channel=True)[0]
        return out + x


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layer = _layer(4, 2048, 1408, True, torch.bfloat16)
    block = _Int8Block(layer)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        for seed, num_tokens in ((16, 64), (17, 200)):
            x, ids, scales = _tokens(num_tokens, 2048, 4, 2, torch.bfloat16, seed=seed)
            torch.testing.assert_close(compiled(x, ids, scales), block(x, ids, scales))


# ------------------------------------------------------------------ tuning


@pytest.mark.parametrize("dtype", DTYPES)
def test_autotune_records_int8_entries(fresh_tuner, dtype):
    """Inside autotune() an int8 call profiles the int8 tactics (with the real scales) and
    records them under quant "int8_per_channel"; a later call in the bucket uses the cache;
    the same shape with 16-bit weights gets entries of its own."""
    layer = _layer(8, 512, 256, True, dtype, seed=20)
    with autotune():
        for num_tokens in (1, 40):
            x, ids, scales = _tokens(num_tokens, 512, 8, 2, dtype, seed=num_tokens)
            _check(x, ids, scales, layer, tune_max_num_tokens=64)
            for gemm in (1, 2):
                selection = fresh_tuner.last_selection(gemm)
                assert selection.source == "tuned" and "_int8_" in selection.tactic
    entries = fresh_tuner.entries()
    tag = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    assert {(k.gemm, k.bucket) for k in entries} == {(g, b) for g in (1, 2) for b in (1, 64)}
    assert {(k.shape.quant, k.shape.dtypes) for k in entries} == {
        ("int8_per_channel", f"{tag}_int8_{tag}")}
    assert all("_int8_" in tactic for tactic, _ in entries.values())

    x, ids, scales = _tokens(50, 512, 8, 2, dtype, seed=50)
    _check(x, ids, scales, layer, tune_max_num_tokens=64)
    assert fresh_tuner.last_selection(1).source == "cache"

    with autotune():  # the unquantised layer of the same shape: separate entries
        cutlass_fused_moe(x, ids, scales, *layer.fc, dtype, tune_max_num_tokens=64)
    assert fresh_tuner.last_selection(1).source == "tuned"
    assert "_int8_" not in fresh_tuner.last_selection(1).tactic
    assert len(fresh_tuner.entries()) == 6
