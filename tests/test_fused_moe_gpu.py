"""cutlass_fused_moe on a GPU against reference_moe (float32); docs/architecture.md, "Correctness".

Every output buffer is poisoned with NaN before the run; inputs are random (never zeros) and
weights are drawn from N(0, 1/fan_in). Thresholds (relative L2): fp16 2e-3, bf16 1e-2.
"""

from __future__ import annotations

import functools

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
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe, tactics, validation

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16]
GATED = (ActivationType.Swiglu, ActivationType.Geglu)
ALL_ACTIVATIONS = [ActivationType.Swiglu, ActivationType.Geglu, ActivationType.Gelu,
                   ActivationType.Relu, ActivationType.Silu, ActivationType.Identity]


@functools.lru_cache(maxsize=2)
def _weights(num_experts, hidden, inter, gated, dtype, seed=0):
    """``(fc1, fc2)`` on the GPU, N(0, 1/fan_in); cached so parametrised runs that differ only
    in tokens share them (at most two sets alive, to bound memory)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n1 = 2 * inter if gated else inter
    fc1 = torch.randn(num_experts, n1, hidden, device=DEVICE, dtype=dtype, generator=gen)
    fc2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=dtype, generator=gen)
    return fc1.mul_(hidden**-0.5), fc2.mul_(inter**-0.5)


def _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed):
    """Random ``x [T, H]`` and softmax/top-k routing (distinct ids per row)."""
    return random_tokens(num_tokens, hidden, num_experts, top_k, dtype, 1000 + seed, DEVICE)


def _run(x, ids, scales, fc1, fc2, out_dtype=None, **kwargs):
    """Runs with a NaN-poisoned ``output=`` and checks it is returned and fully written."""
    out_dtype = out_dtype or x.dtype
    output = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=out_dtype, device=DEVICE)
    result = cutlass_fused_moe(x, ids, scales, fc1, fc2, out_dtype, output=output, **kwargs)
    assert isinstance(result, list) and result[0] is output
    assert not output.isnan().any(), "some output elements were not written"
    return output


def _reference(x, ids, scales, fc1, fc2, **kwargs):
    only_op = ("tactics", "check_inputs", "workspace_buffer", "enable_pdl")
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in only_op}
    return reference_moe(x, ids, scales, fc1, fc2, **ref_kwargs)


def _check(x, ids, scales, fc1, fc2, out_dtype=None, tol=None, **kwargs):
    out = _run(x, ids, scales, fc1, fc2, out_dtype, **kwargs)
    ref = _reference(x, ids, scales, fc1, fc2, **kwargs)
    err = record_error(x.dtype, rel_l2(out.float(), ref))
    assert err <= (tol or TOLERANCE[x.dtype]), f"relative L2 error {err:.3g}"
    return out, ref


# ------------------------------------------------------------------ the core cross product

_CORE_EK = [(1, 1)] + [(e, k) for e in (8, 60, 128) for k in (1, 2, 4, 8)]
_CORE_T = [0, 1, 7, 64, 1000, 4096]
# dtype, then E, then k, then T: consecutive cases share cached weights.
_CORE_CASES = [
    pytest.param(dtype, e, k, t, id=f"{str(dtype)[6:]}-E{e}-k{k}-T{t}")
    for dtype in DTYPES for e, k in _CORE_EK for t in _CORE_T
]


@pytest.mark.parametrize("dtype,num_experts,top_k,num_tokens", _CORE_CASES)
def test_core_cross_product(dtype, num_experts, top_k, num_tokens):
    hidden, inter = 2048, 1408
    fc1, fc2 = _weights(num_experts, hidden, inter, True, dtype)
    x, ids, scales = _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed=num_tokens)
    out, _ = _check(x, ids, scales, fc1, fc2)
    assert out.shape == (num_tokens, hidden)


_SHAPE_CASES = [
    pytest.param(dtype, h, i, e, k, t, id=f"{str(dtype)[6:]}-H{h}-I{i}-E{e}-k{k}-T{t}")
    for dtype in DTYPES
    for h, i in ((2048, 768), (2880, 2880))
    for e, k in ((8, 2), (60, 4), (128, 8))
    for t in (1, 64, 1000)
]


@pytest.mark.parametrize("dtype,hidden,inter,num_experts,top_k,num_tokens", _SHAPE_CASES)
def test_other_shapes(dtype, hidden, inter, num_experts, top_k, num_tokens):
    fc1, fc2 = _weights(num_experts, hidden, inter, True, dtype)
    x, ids, scales = _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed=num_tokens)
    _check(x, ids, scales, fc1, fc2)


# ------------------------------------------------------------------ routing edge cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("expert", [0, 5, 7])
def test_all_tokens_to_one_expert(dtype, expert):
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(1000, 2048, 8, 2, dtype, seed=1)
    ids[:, 0] = expert
    ids[:, 1] = (expert + 1 + torch.arange(1000, device=DEVICE) % 7) % 8  # never == expert
    _check(x, ids, scales, fc1, fc2)
    _check(x, ids[:, :1].contiguous(), torch.ones_like(scales[:, :1]), fc1, fc2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_with_no_tokens(dtype):
    fc1, fc2 = _weights(60, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(300, 2048, 60, 4, dtype, seed=2)
    ids = (ids % 15) * 4  # only experts 0, 4, ..., 56 (duplicates possible)
    _check(x, ids, scales, fc1, fc2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicate_ids_in_a_row(dtype):
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(257, 2048, 8, 4, dtype, seed=3)
    ids[:, 1] = ids[:, 0]
    ids[::3, :] = 6
    _check(x, ids, scales, fc1, fc2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ep_rank", [0, 1, 3])
def test_expert_parallel_and_out_of_range_ids(dtype, ep_rank):
    ep_size, local = 4, 8
    fc1, fc2 = _weights(local, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(500, 2048, local * ep_size, 4, dtype, seed=4 + ep_rank)
    ids[0, 0] = -1
    ids[1, 1] = local * ep_size  # one past the last global expert
    ids[2, 2] = 2**31 - 1
    ids[3, 3] = -(2**31)
    ids[4, :] = -7  # no valid choice at all: a zero row
    out, _ = _check(x, ids, scales, fc1, fc2, ep_size=ep_size, ep_rank=ep_rank)
    assert torch.all(out[4] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ids_all_on_other_ranks_give_zeros(dtype):
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(64, 2048, 8, 2, dtype, seed=5)
    out = _run(x, ids + 8, scales, fc1, fc2, ep_size=2, ep_rank=0)
    assert torch.all(out == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int64_ids_and_noncontiguous_input(dtype):
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(100, 2048, 8, 2, dtype, seed=6)
    ids64 = ids.long()
    ids64[0, 0] = 2**32 + 1  # out of range: must not alias expert 1
    x_strided = torch.empty(2048, 100, device=DEVICE, dtype=dtype).t()
    x_strided.copy_(x)
    _check(x_strided, ids64, scales.to(dtype), fc1, fc2)


# ------------------------------------------------------------------ activations and biases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS, ids=lambda a: a.name)
def test_activations_with_biases(dtype, activation):
    fc1, fc2 = _weights(8, 2048, 768, activation in GATED, dtype, seed=7)
    x, ids, scales = _tokens(257, 2048, 8, 2, dtype, seed=7)
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    b1 = torch.randn(fc1.shape[:2], device=DEVICE, generator=gen).to(dtype) * 0.5
    b2 = torch.randn(fc2.shape[:2], device=DEVICE, generator=gen).to(dtype) * 0.5
    _check(x, ids, scales, fc1, fc2, activation_type=activation)
    _check(x, ids, scales, fc1, fc2, activation_type=activation, fc1_expert_biases=b1,
           fc2_expert_biases=b2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fc2_bias_only_on_tp_rank0(dtype):
    fc1, fc2 = _weights(8, 2048, 768, True, dtype, seed=9)
    x, ids, scales = _tokens(64, 2048, 8, 2, dtype, seed=9)
    b2 = torch.randn(fc2.shape[:2], device=DEVICE).to(dtype)
    rank0, _ = _check(x, ids, scales, fc1, fc2, fc2_expert_biases=b2, tp_size=2, tp_rank=0)
    rank1, _ = _check(x, ids, scales, fc1, fc2, fc2_expert_biases=b2, tp_size=2, tp_rank=1)
    plain = _run(x, ids, scales, fc1, fc2)
    assert torch.equal(rank1, plain)
    assert rel_l2(rank0.float(), plain.float()) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamped_swiglu(dtype):
    fc1, fc2 = _weights(8, 2048, 768, True, dtype, seed=10)
    x, ids, scales = _tokens(300, 2048, 8, 2, dtype, seed=10)
    x = x * 3  # so that the limit clamps
    clamp = clamped_swiglu_params(8, torch.Generator(device=DEVICE).manual_seed(10))
    out, _ = _check(x, ids, scales, fc1, fc2, **clamp)
    assert rel_l2(out.float(), _reference(x, ids, scales, fc1, fc2)) > 0.05
    _check(x, ids, scales, fc1, fc2, swiglu_limit=clamp["swiglu_limit"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_order_against_explicit_reference(dtype):
    """fc1 rows are [up | gate]: out = down @ (silu(gate @ x) * (up @ x))."""
    num_experts, hidden, inter = 4, 1024, 512
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    gate = (torch.randn(num_experts, inter, hidden, device=DEVICE, generator=gen)
            * hidden**-0.5).to(dtype)
    up = (torch.randn(num_experts, inter, hidden, device=DEVICE, generator=gen)
          * hidden**-0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=gen)
            * inter**-0.5).to(dtype)
    x, ids, scales = _tokens(96, hidden, num_experts, 2, dtype, seed=11)
    expected = torch.zeros(96, hidden, device=DEVICE)
    for e in range(num_experts):
        for j in range(2):
            rows = (ids[:, j] == e).nonzero().squeeze(1)
            xe = x[rows].float()
            h = torch.nn.functional.silu(xe @ gate[e].float().t()) * (xe @ up[e].float().t())
            expected[rows] += scales[rows, j, None] * (h @ down[e].float().t())
    w31 = torch.cat([up, gate], dim=1)
    out = _run(x, ids, scales, w31, down.contiguous())
    assert rel_l2(out.float(), expected) <= TOLERANCE[dtype]
    swapped = _run(x, ids, scales, torch.cat([gate, up], dim=1), down.contiguous())
    assert rel_l2(swapped.float(), expected) > 0.1


# ------------------------------------------------------------------ fused gated GEMM1


def _gemm1_tactics(dtype, activation, rows_per_expert):
    """``(fused gated, plain)`` default GEMM1 tactics for ``activation``."""
    runner = _ext.get_runner(dtype, dtype, dtype)
    act = activation
    descs = [d for d in descriptors(runner, 1) if tactics.supports_activation(d, act)]
    fused = tactics.default_tactic([d for d in descs if d.get("gated")], rows_per_expert)
    plain = tactics.default_tactic([d for d in descs if not d.get("gated")], rows_per_expert)
    return fused, plain


def test_gated_activation_defaults_to_the_fused_gemm1():
    dtype = torch.bfloat16
    runner = _ext.get_runner(dtype, dtype, dtype)
    # The CUTLASS fused gated tactics (the weight-streaming decode family has gated ones too).
    gated = [d for d in descriptors(runner, 1) if d.get("gated") and not d.get("decode")]
    assert gated, "no fused gated GEMM1 tactic in this build"
    assert all(d["name"].startswith("sm80_gated_") for d in gated)
    assert not any(d.get("gated") for d in descriptors(runner, 2))
    fused, plain = _gemm1_tactics(dtype, ActivationType.Swiglu, 2.0)
    assert fused.startswith("sm80_gated_") and not plain.startswith("sm80_gated_")
    swiglu = ActivationType.Swiglu
    descs = [d for d in descriptors(runner, 1) if tactics.supports_activation(d, swiglu)]
    assert tactics.default_tactic(descs, 2.0) == fused  # decode: fused
    assert not tactics.default_tactic(descs, 256.0).startswith("sm80_gated_")  # prefill: plain
    # Not offered for activations it does not fuse.
    relu = ActivationType.Relu
    assert not any(tactics.supports_activation(d, relu) for d in gated)


_GATED_CASES = ["swiglu", "geglu", "bias", "clamped", "bias-clamped"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _GATED_CASES)
@pytest.mark.parametrize("num_tokens", [1, 333])
def test_fused_gated_gemm1_matches_reference_and_plain(dtype, case, num_tokens):
    """Fused and plain GEMM1 on shapes with K and N residues in every tile (H=2056, I=776),
    uneven experts, biases and per-expert clamped SwiGLU: both match the reference."""
    num_experts, hidden, inter, top_k = 12, 2056, 776, 3
    activation = ActivationType.Geglu if case == "geglu" else ActivationType.Swiglu
    fc1, fc2 = _weights(num_experts, hidden, inter, True, dtype, seed=21)
    x, ids, scales = _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed=21)
    gen = torch.Generator(device=DEVICE).manual_seed(22)
    kwargs = {"activation_type": activation}
    if "bias" in case:
        kwargs["fc1_expert_biases"] = (
            torch.randn(fc1.shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
    if "clamped" in case:
        x = x * 3  # so that the limits clamp
        kwargs.update(clamped_swiglu_params(num_experts, gen))
    fused, plain = _gemm1_tactics(dtype, activation, num_tokens * top_k / num_experts)
    act = activation
    gemm2 = tactics.default_tactic(
        [d for d in _ext.get_runner(dtype, dtype, dtype).tactics(2)
         if tactics.supports_activation(d, act)], num_tokens * top_k / num_experts)
    out_fused, _ = _check(x, ids, scales, fc1, fc2, tactics=(fused, gemm2), **kwargs)
    out_plain, _ = _check(x, ids, scales, fc1, fc2, tactics=(plain, gemm2), **kwargs)
    # The two paths round the same intermediates: they agree far more closely than either
    # agrees with the float32 reference's bound.
    assert rel_l2(out_fused.float(), out_plain.float()) <= TOLERANCE[dtype]
    if "clamped" in case:
        unclamped = reference_moe(x, ids, scales, fc1, fc2, activation_type=activation,
                                  fc1_expert_biases=kwargs.get("fc1_expert_biases"))
        assert rel_l2(out_fused.float(), unclamped) > 0.05, "the clamp had no effect"


def test_fused_gated_gemm1_refuses_a_plain_activation():
    dtype = torch.bfloat16
    fc1, fc2 = _weights(8, 2048, 1408, False, dtype)
    x, ids, scales = _tokens(4, 2048, 8, 2, dtype, seed=23)
    fused, _ = _gemm1_tactics(dtype, ActivationType.Swiglu, 1.0)
    with pytest.raises(ValueError, match="not a runnable GEMM1 tactic"):
        _run(x, ids, scales, fc1, fc2, activation_type=ActivationType.Relu,
             tactics=(fused, ""))


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_float32(dtype):
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(200, 2048, 8, 2, dtype, seed=12)
    out, _ = _check(x, ids, scales, fc1, fc2, out_dtype=torch.float32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_allocated_output_and_determinism(dtype):
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(333, 2048, 8, 2, dtype, seed=13)
    first = cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype)[0]
    second = cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype)[0]
    assert first.dtype == dtype and first.shape == x.shape and first.device == x.device
    assert torch.equal(first, second), "results differ between identical calls"
    assert rel_l2(first.float(), reference_moe(x, ids, scales, fc1, fc2)) <= TOLERANCE[dtype]


def test_zero_tokens():
    fc1, fc2 = _weights(8, 2048, 1408, True, torch.bfloat16)
    x, ids, scales = _tokens(0, 2048, 8, 2, torch.bfloat16, seed=0)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)[0]
    assert out.shape == (0, 2048) and out.is_cuda


def test_workspace_buffer():
    dtype = torch.bfloat16
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(128, 2048, 8, 2, dtype, seed=14)
    buffer = torch.empty(512 << 20, dtype=torch.uint8, device=DEVICE)
    _check(x, ids, scales, fc1, fc2, workspace_buffer=buffer)
    with pytest.raises(ValueError, match="workspace_buffer has 1 bytes"):
        _run(x, ids, scales, fc1, fc2, workspace_buffer=buffer[:1])


# ------------------------------------------------------------------ every tactic


def _activations_of(desc):
    """Activations to check a tactic with: those it declares, else a gated and a plain one."""
    if "activations" in desc:
        return [a for a in ALL_ACTIVATIONS
                if tactics.supports_activation(desc, a)]
    return [ActivationType.Swiglu, ActivationType.Relu]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemm", [1, 2])
def test_every_tactic(dtype, gemm):
    runner = _ext.get_runner(dtype, dtype, dtype)
    descs = descriptors(runner, gemm)
    assert descs, f"no runnable GEMM{gemm} tactic"
    failures = []
    for desc in descs:
        for activation in _activations_of(desc):
            gated = activation in GATED
            fc1, fc2 = _weights(8, 2048, 1408, gated, dtype, seed=15)
            other = [d for d in descriptors(runner, 3 - gemm)
                     if tactics.supports_activation(d, activation)]
            other_name = tactics.default_tactic(other, 300 * 2 / 8)
            names = (desc["name"], other_name) if gemm == 1 else (other_name, desc["name"])
            # A GEMM2 split over K runs up to SPLIT_K_MAX_ROWS rows (64 tokens x k=2 here).
            split = int(desc.get("split_k", 1)) > 1
            for num_tokens in (1, 64) if split else (1, 300):
                x, ids, scales = _tokens(num_tokens, 2048, 8, 2, dtype, seed=num_tokens)
                try:
                    out = _run(x, ids, scales, fc1, fc2, tactics=names, activation_type=activation)
                    err = record_error(dtype, rel_l2(
                        out.float(), reference_moe(x, ids, scales, fc1, fc2, activation)))
                except (RuntimeError, ValueError) as exc:  # collect: report every bad tactic
                    failures.append(f"{names} {activation.name} T={num_tokens}: {exc}")
                    continue
                if not err <= TOLERANCE[dtype]:
                    failures.append(f"{names} {activation.name} T={num_tokens}: rel err {err:.3g}")
            if split:
                failures += _split_refusal_failures(names, fc1, fc2, dtype, activation)
    assert not failures, "\n".join(failures)


# Tile groups (src/grouped_gemm/tile_order.cuh): see _helpers.check_over_tile_groups.
_GROUPS_E, _GROUPS_K, _GROUPS_T = 2, 8192, 2600


@pytest.mark.parametrize("gemm", [1, 2])
def test_every_tactic_over_several_tile_groups(gemm):
    dtype = torch.bfloat16
    runner = _ext.get_runner(dtype, dtype, dtype)
    swiglu = ActivationType.Swiglu
    gen = torch.Generator(device=DEVICE).manual_seed(31)
    fc1 = torch.randn(_GROUPS_E, 2 * _GROUPS_K, _GROUPS_K, device=DEVICE, dtype=dtype,
                      generator=gen).mul_(_GROUPS_K**-0.5)
    fc2 = torch.randn(_GROUPS_E, _GROUPS_K, _GROUPS_K, device=DEVICE, dtype=dtype,
                      generator=gen).mul_(_GROUPS_K**-0.5)
    x, ids, scales = _tokens(_GROUPS_T, _GROUPS_K, _GROUPS_E, 1, dtype, seed=31)
    rows = int(torch.bincount(ids.flatten(), minlength=_GROUPS_E).min())
    ref = reference_moe(x, ids, scales, fc1, fc2)
    descs = [d for d in descriptors(runner, gemm) if tactics.supports_activation(d, swiglu)]
    other = tactics.default_tactic(
        [d for d in descriptors(runner, 3 - gemm) if tactics.supports_activation(d, swiglu)],
        _GROUPS_T / _GROUPS_E)

    def run(name):
        return _run(x, ids, scales, fc1, fc2,
                    tactics=(name, other) if gemm == 1 else (other, name))

    failures = check_over_tile_groups(descs, run, ref, rows, _GROUPS_K, dtype, TOLERANCE[dtype])
    assert not failures, "\n".join(failures)


def _split_refusal_failures(names, fc1, fc2, dtype, activation):
    """A split-K GEMM2 tactic forced on a call above SPLIT_K_MAX_ROWS must be refused."""
    x, ids, scales = _tokens(300, fc1.shape[2], fc1.shape[0], 2, dtype, seed=300)
    try:
        _run(x, ids, scales, fc1, fc2, tactics=names, activation_type=activation)
    except ValueError as exc:
        return [] if "splits GEMM2 over K" in str(exc) else [f"{names} T=300: {exc}"]
    return [f"{names} T=300: a split-K tactic ran on 600 rows"]


# ------------------------------------------------------------------ split-K GEMM2, PDL


def _split_tactics(dtype, weight_dtype=None):
    descs = _ext.get_runner(dtype, weight_dtype or dtype, dtype).tactics(2)
    return [d for d in descs if int(d.get("split_k", 1)) > 1]


_SPLIT_CASES = [
    # hidden, inter, E, k, T: K and N residues in every tile; I = 16 leaves trailing K slices
    # empty at 4 and 8 splits (slices are rounded up to 16 elements).
    pytest.param(2056, 776, 12, 3, 42, id="H2056-I776-E12-k3-T42"),
    pytest.param(2056, 776, 12, 3, 1, id="H2056-I776-E12-k3-T1"),
    pytest.param(512, 16, 8, 2, 5, id="H512-I16-E8-k2-T5"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter,num_experts,top_k,num_tokens", _SPLIT_CASES)
def test_split_k_gemm2_matches_unsplit_and_reference(dtype, hidden, inter, num_experts, top_k,
                                                     num_tokens):
    splits = _split_tactics(dtype)
    assert splits, "no split-K GEMM2 tactic compiled"
    assert {int(d["split_k"]) for d in splits} == {2, 4, 8}
    assert num_tokens * top_k <= _ext.load_extension().SPLIT_K_MAX_ROWS
    fc1, fc2 = _weights(num_experts, hidden, inter, True, dtype, seed=21)
    x, ids, scales = _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed=22)
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    b2 = torch.randn(num_experts, hidden, device=DEVICE, dtype=dtype, generator=gen)
    runner = _ext.get_runner(dtype, dtype, dtype)
    gemm1 = tactics.default_tactic(descriptors(runner, 1), 1)
    unsplit = tactics.default_tactic(descriptors(runner, 2), 1)
    for out_dtype in (dtype, torch.float32):
        base, _ref = _check(x, ids, scales, fc1, fc2, out_dtype, tactics=(gemm1, unsplit),
                           fc2_expert_biases=b2)
        for desc in splits:
            names = (gemm1, str(desc["name"]))
            out, _ = _check(x, ids, scales, fc1, fc2, out_dtype, tactics=names,
                            fc2_expert_biases=b2)
            # Same products, summed in a different (fixed) order: close to the unsplit result,
            # and bitwise repeatable.
            assert rel_l2(out.float(), base.float()) <= TOLERANCE[dtype], desc["name"]
            again = _run(x, ids, scales, fc1, fc2, out_dtype, tactics=names,
                         fc2_expert_biases=b2)
            assert torch.equal(out, again), f"{desc['name']} is not deterministic"


def test_split_k_tactic_is_never_the_default_and_falls_back_above_its_rows():
    dtype = torch.bfloat16
    runner = _ext.get_runner(dtype, dtype, dtype)
    descs = descriptors(runner, 2)
    for rows in (0.125, 1, 8, 64, 4096):
        name = tactics.default_tactic(descs, rows)
        assert next(int(d["split_k"]) for d in descs if d["name"] == name) == 1


def test_pdl_is_used_where_gpu_and_build_allow():
    """sm_90+ GPUs running code built for sm_90+ launch with PDL; others never do."""
    info = _ext.build_info()
    built = [int(str(a)) for a in [*info.get("archs", []), *info.get("ptx_archs", [])]]
    major, _ = torch.cuda.get_device_capability()
    runner = _ext.get_runner(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    assert runner.pdl_supported() == (major >= 9 and max(built) >= 90)


@pytest.mark.parametrize("num_tokens", [1, 300])
def test_pdl_on_and_off_give_identical_results(num_tokens):
    dtype = torch.bfloat16
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(num_tokens, 2048, 8, 2, dtype, seed=24)
    on = _run(x, ids, scales, fc1, fc2, enable_pdl=True)
    off = _run(x, ids, scales, fc1, fc2, enable_pdl=False)
    default = _run(x, ids, scales, fc1, fc2)
    assert torch.equal(on, off) and torch.equal(on, default)
    ref = _reference(x, ids, scales, fc1, fc2)
    assert rel_l2(on.float(), ref) <= TOLERANCE[dtype]


def test_cuda_graph_with_split_k_and_pdl():
    """A decode call with a split-K GEMM2 and programmatic launches, captured and replayed with
    new inputs: every replay equals an eager call and the reference."""
    dtype = torch.bfloat16
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    runner = _ext.get_runner(dtype, dtype, dtype)
    names = (tactics.default_tactic(descriptors(runner, 1), 0.5),
             str(_split_tactics(dtype)[-1]["name"]))
    for x, ids, scales, replayed in _graph_replays(fc1, fc2, 4, (25, 26, 27), tactics=names,
                                                   enable_pdl=True):
        assert rel_l2(replayed.float(), _reference(x, ids, scales, fc1, fc2)) <= 1e-2


# ------------------------------------------------------------------ graphs, compile, checks


def _graph_replays(fc1, fc2, num_tokens, seeds, **kwargs):
    """Captures one call (inputs of ``seeds[0]``, after a warm-up outside capture), then for
    each later seed copies new inputs in, replays, checks the result equals an eager call with
    the same ``kwargs`` and yields ``(x, ids, scales, replayed output)``."""
    dtype = fc1.dtype
    hidden, num_experts = fc1.shape[2], fc1.shape[0]
    x, ids, scales = _tokens(num_tokens, hidden, num_experts, 2, dtype, seed=seeds[0])
    static_x, static_ids, static_scales = x.clone(), ids.clone(), scales.clone()
    static_out = torch.empty(num_tokens, hidden, dtype=dtype, device=DEVICE)

    graph = captured_graph(lambda: cutlass_fused_moe(static_x, static_ids, static_scales, fc1,
                                                     fc2, dtype, output=static_out, **kwargs))

    for seed in seeds[1:]:
        x, ids, scales = _tokens(num_tokens, hidden, num_experts, 2, dtype, seed=seed)
        static_x.copy_(x)
        static_ids.copy_(ids)
        static_scales.copy_(scales)
        static_out.fill_(float("nan"))
        graph.replay()
        eager = cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, **kwargs)[0]
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        yield x, ids, scales, static_out


def test_cuda_graph_capture_and_replay():
    fc1, fc2 = _weights(8, 2048, 1408, True, torch.bfloat16)
    replays = list(_graph_replays(fc1, fc2, 64, (16, 17, 18, 19)))
    assert len(replays) == 3


class _MoeBlock(torch.nn.Module):
    def __init__(self, fc1, fc2, num_experts, top_k):
        super().__init__()
        self.fc1 = torch.nn.Parameter(fc1, requires_grad=False)
        self.fc2 = torch.nn.Parameter(fc2, requires_grad=False)
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x, ids, scales):
        out = cutlass_fused_moe(x * 2, ids, scales, self.fc1, self.fc2, x.dtype)[0]
        return out + x


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    dtype = torch.bfloat16
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    block = _MoeBlock(fc1, fc2, 8, 2)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        for seed, num_tokens in ((20, 64), (21, 64), (22, 200)):
            x, ids, scales = _tokens(num_tokens, 2048, 8, 2, dtype, seed=seed)
            torch.testing.assert_close(compiled(x, ids, scales), block(x, ids, scales))


def test_check_inputs_rejects_bad_ids(monkeypatch):
    dtype = torch.bfloat16
    fc1, fc2 = _weights(8, 2048, 1408, True, dtype)
    x, ids, scales = _tokens(16, 2048, 8, 2, dtype, seed=23)
    _check(x, ids, scales, fc1, fc2, check_inputs=True)
    ids[3, 1] = 8
    ids[5, 0] = -2
    with pytest.raises(ValueError, match=r"outside \[0, 8\): -2, 8"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, check_inputs=True)
    monkeypatch.setenv(validation.CHECK_INPUTS_ENV, "1")
    with pytest.raises(ValueError, match="outside"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype)
