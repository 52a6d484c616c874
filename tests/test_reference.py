"""reference_moe against a naive per-token loop (float64), and swap_w13_to_w31 (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import naive_moe, random_routing, random_weights, rel_l2
from cutlass_moe import ActivationType, reference_moe, swap_w13_to_w31

F64 = torch.float64
ALL_ACTIVATIONS = ["Swiglu", "Geglu", "Gelu", "Relu", "Silu", "Identity"]
GATED = {"Swiglu", "Geglu"}


def _problem(num_tokens, num_experts, top_k, hidden, inter, activation, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=F64)
    ids, scales = random_routing(num_tokens, num_experts, top_k, generator=gen)
    fc1, fc2 = random_weights(num_experts, hidden, inter, activation in GATED, F64, generator=gen)
    return x, ids, scales, fc1, fc2


def _check(out, ref, tol=1e-10):
    assert out.shape == ref.shape
    assert rel_l2(out, ref) <= tol, rel_l2(out, ref)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(9, 4, 2), (5, 6, 1), (4, 3, 3)])
def test_matches_naive_loop(activation, num_tokens, num_experts, top_k):
    x, ids, scales, fc1, fc2 = _problem(num_tokens, num_experts, top_k, 16, 8, activation)
    out = reference_moe(x, ids, scales, fc1, fc2, ActivationType[activation], compute_dtype=F64)
    assert out.dtype == F64
    _check(out, naive_moe(x, ids, scales, fc1, fc2, activation))


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_biases(activation):
    x, ids, scales, fc1, fc2 = _problem(7, 4, 2, 16, 8, activation, seed=1)
    b1 = torch.randn(fc1.shape[:2], dtype=F64)
    b2 = torch.randn(fc2.shape[:2], dtype=F64)
    out = reference_moe(x, ids, scales, fc1, fc2, ActivationType[activation],
                        fc1_expert_biases=b1, fc2_expert_biases=b2, compute_dtype=F64)
    _check(out, naive_moe(x, ids, scales, fc1, fc2, activation, b1=b1, b2=b2))


def test_fc2_bias_only_on_tp_rank0():
    x, ids, scales, fc1, fc2 = _problem(6, 4, 2, 16, 8, "Swiglu", seed=2)
    b1 = torch.randn(fc1.shape[:2], dtype=F64)
    b2 = torch.randn(fc2.shape[:2], dtype=F64)
    kwargs = {"fc1_expert_biases": b1, "fc2_expert_biases": b2, "tp_size": 2, "compute_dtype": F64}
    rank0 = reference_moe(x, ids, scales, fc1, fc2, tp_rank=0, **kwargs)
    rank1 = reference_moe(x, ids, scales, fc1, fc2, tp_rank=1, **kwargs)
    _check(rank0, naive_moe(x, ids, scales, fc1, fc2, "Swiglu", b1=b1, b2=b2, tp_rank=0))
    _check(rank1, naive_moe(x, ids, scales, fc1, fc2, "Swiglu", b1=b1, b2=b2, tp_rank=1))
    no_b2 = reference_moe(x, ids, scales, fc1, fc2, fc1_expert_biases=b1, compute_dtype=F64)
    _check(rank1, no_b2)
    # The bias of rank 0 is exactly s-weighted b2 of the chosen experts.
    expected_bias = (scales.double().unsqueeze(-1) * b2[ids.long()]).sum(dim=1)
    _check(rank0 - rank1, expected_bias)


def test_tp_partial_sums_add_up():
    """Splitting I over two TP ranks and summing gives the unsplit result (non-gated relu)."""
    x, ids, scales, fc1, fc2 = _problem(6, 4, 2, 16, 8, "Relu", seed=3)
    b2 = torch.randn(fc2.shape[:2], dtype=F64)
    full = reference_moe(x, ids, scales, fc1, fc2, ActivationType.Relu, fc2_expert_biases=b2,
                         compute_dtype=F64)
    parts = [
        reference_moe(x, ids, scales, fc1[:, r * 4:(r + 1) * 4], fc2[:, :, r * 4:(r + 1) * 4],
                      ActivationType.Relu, fc2_expert_biases=b2, tp_size=2, tp_rank=r,
                      compute_dtype=F64)
        for r in range(2)
    ]
    _check(parts[0] + parts[1], full)


@pytest.mark.parametrize("given", ["all", "alpha", "limit"])
def test_clamped_swiglu(given):
    x, ids, scales, fc1, fc2 = _problem(8, 4, 2, 16, 8, "Swiglu", seed=4)
    x = x * 4  # large enough that the limit clamps
    alpha = torch.rand(4, dtype=torch.float32) + 0.5
    beta = torch.rand(4, dtype=torch.float32)
    limit = torch.rand(4, dtype=torch.float32) + 0.5
    kwargs = {"all": {"swiglu_alpha": alpha, "swiglu_beta": beta, "swiglu_limit": limit},
              "alpha": {"swiglu_alpha": alpha},
              "limit": {"swiglu_limit": limit}}[given]
    out = reference_moe(x, ids, scales, fc1, fc2, compute_dtype=F64, **kwargs)
    fmax = torch.finfo(torch.float32).max
    clamp = (kwargs.get("swiglu_alpha", torch.ones(4)),
             kwargs.get("swiglu_beta", torch.zeros(4)),
             kwargs.get("swiglu_limit", torch.full((4,), fmax)))
    _check(out, naive_moe(x, ids, scales, fc1, fc2, "Swiglu", clamp=clamp))
    plain = reference_moe(x, ids, scales, fc1, fc2, compute_dtype=F64)
    assert rel_l2(out, plain) > 1e-3  # the clamped form really differs here


def test_clamped_swiglu_defaults_equal_plain_swiglu():
    x, ids, scales, fc1, fc2 = _problem(5, 3, 2, 16, 8, "Swiglu", seed=5)
    ones = torch.ones(3, dtype=torch.float32)
    out = reference_moe(x, ids, scales, fc1, fc2, swiglu_alpha=ones, compute_dtype=F64)
    _check(out, reference_moe(x, ids, scales, fc1, fc2, compute_dtype=F64))


def test_clamped_swiglu_rejected_for_other_activations():
    x, ids, scales, fc1, fc2 = _problem(3, 2, 1, 8, 8, "Relu")
    with pytest.raises(ValueError, match="Swiglu"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.Relu,
                      swiglu_limit=torch.ones(2))


def test_expert_parallelism_ranks_sum_to_full():
    """Each EP rank computes only its experts; other ranks' ids contribute zero."""
    num_experts, ep_size = 8, 2
    x, ids, scales, fc1, fc2 = _problem(10, num_experts, 3, 16, 8, "Swiglu", seed=6)
    full = reference_moe(x, ids, scales, fc1, fc2, compute_dtype=F64)
    local = num_experts // ep_size
    parts = []
    for rank in range(ep_size):
        w1, w2 = fc1[rank * local:(rank + 1) * local], fc2[rank * local:(rank + 1) * local]
        part = reference_moe(x, ids, scales, w1, w2, ep_size=ep_size, ep_rank=rank,
                             compute_dtype=F64)
        _check(part, naive_moe(x, ids, scales, w1, w2, "Swiglu", ep_rank=rank))
        parts.append(part)
    _check(parts[0] + parts[1], full)


def test_out_of_range_ids_contribute_zero():
    x, ids, scales, fc1, fc2 = _problem(6, 4, 2, 16, 8, "Swiglu", seed=7)
    bad = ids.clone()
    bad[0, 0] = -1
    bad[1, 1] = 4  # == E: one past the end
    bad[2, 0] = 2**31 - 1
    bad[3, :] = -(2**31)  # a token with no valid choice gets a zero row
    out = reference_moe(x, bad, scales, fc1, fc2, compute_dtype=F64)
    _check(out, naive_moe(x, bad, scales, fc1, fc2, "Swiglu"))
    assert torch.all(out[3] == 0)
    # Same as giving the bad choices a zero scale.
    masked = scales.clone()
    masked[(bad < 0) | (bad >= 4)] = 0
    _check(out, reference_moe(x, ids.clamp(0, 3), masked, fc1, fc2, compute_dtype=F64))


def test_int64_ids_beyond_int32_contribute_zero():
    x, ids, scales, fc1, fc2 = _problem(4, 4, 2, 16, 8, "Swiglu", seed=8)
    ids64 = ids.long()
    ids64[0, 0] = 2**32 + 1  # would alias expert 1 if truncated to int32
    out = reference_moe(x, ids64, scales, fc1, fc2, compute_dtype=F64)
    _check(out, naive_moe(x, ids64, scales, fc1, fc2, "Swiglu"))


def test_duplicate_ids_in_a_row():
    x, ids, scales, fc1, fc2 = _problem(5, 4, 3, 16, 8, "Swiglu", seed=9)
    ids[:, :] = torch.tensor([2, 2, 1], dtype=torch.int32)
    out = reference_moe(x, ids, scales, fc1, fc2, compute_dtype=F64)
    _check(out, naive_moe(x, ids, scales, fc1, fc2, "Swiglu"))


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (5, 1), (5, 5)])
def test_k_equal_one_and_k_equal_e(num_experts, top_k):
    x, ids, scales, fc1, fc2 = _problem(7, num_experts, top_k, 16, 8, "Gelu", seed=10)
    out = reference_moe(x, ids, scales, fc1, fc2, ActivationType.Gelu, compute_dtype=F64)
    _check(out, naive_moe(x, ids, scales, fc1, fc2, "Gelu"))


def test_all_tokens_to_one_expert_and_empty_experts():
    x, ids, scales, fc1, fc2 = _problem(9, 6, 1, 16, 8, "Swiglu", seed=11)
    ids.fill_(4)
    out = reference_moe(x, ids, scales, fc1, fc2, compute_dtype=F64)
    _check(out, naive_moe(x, ids, scales, fc1, fc2, "Swiglu"))


def test_zero_tokens():
    x, ids, scales, fc1, fc2 = _problem(0, 4, 2, 16, 8, "Swiglu")
    out = reference_moe(x, ids, scales, fc1, fc2)
    assert out.shape == (0, 16) and out.dtype == torch.float32


def test_low_precision_inputs_computed_in_float32():
    x, ids, scales, fc1, fc2 = _problem(6, 4, 2, 16, 8, "Swiglu", seed=12)
    out = reference_moe(x.bfloat16(), ids, scales, fc1.bfloat16(), fc2.bfloat16())
    assert out.dtype == torch.float32
    ref = naive_moe(x.bfloat16(), ids, scales, fc1.bfloat16(), fc2.bfloat16(), "Swiglu")
    _check(out, ref, tol=1e-5)


def test_gate_up_order_against_explicit_weights():
    """fc1 rows are [up | gate]: h = up(x) * silu(gate(x)), built from explicit tensors."""
    gen = torch.Generator().manual_seed(13)
    num_experts, hidden, inter = 3, 16, 8
    gate = torch.randn(num_experts, inter, hidden, generator=gen, dtype=F64) / 4
    up = torch.randn(num_experts, inter, hidden, generator=gen, dtype=F64) / 4
    down = torch.randn(num_experts, hidden, inter, generator=gen, dtype=F64) / 3
    x = torch.randn(5, hidden, generator=gen, dtype=F64)
    ids, scales = random_routing(5, num_experts, 2, generator=gen)

    expected = torch.zeros(5, hidden, dtype=F64)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            expected[t] += float(scales[t, j]) * (
                down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t]))
            )

    w31 = torch.cat([up, gate], dim=1)  # cutlass_moe / FlashInfer layout
    w13 = torch.cat([gate, up], dim=1)  # vLLM / HF layout
    out = reference_moe(x, ids, scales, w31, down, compute_dtype=F64)
    _check(out, expected)
    converted = swap_w13_to_w31(w13)
    assert torch.equal(converted, w31)
    _check(reference_moe(x, ids, scales, converted, down, compute_dtype=F64), expected)
    wrong = reference_moe(x, ids, scales, w13, down, compute_dtype=F64)
    assert rel_l2(wrong, expected) > 0.1


def test_swap_w13_to_w31_round_trip_and_bias():
    w = torch.randn(4, 12, 8)
    swapped = swap_w13_to_w31(w)
    assert torch.equal(swapped[:, :6], w[:, 6:]) and torch.equal(swapped[:, 6:], w[:, :6])
    assert torch.equal(swap_w13_to_w31(swapped), w)
    assert swapped.is_contiguous() and swapped.data_ptr() != w.data_ptr()
    bias = torch.randn(4, 12)
    assert torch.equal(swap_w13_to_w31(bias, dim=-1)[:, :6], bias[:, 6:])
    with pytest.raises(ValueError, match="even"):
        swap_w13_to_w31(torch.randn(2, 5, 8))


def test_unsupported_activation():
    x, ids, scales, fc1, fc2 = _problem(3, 2, 1, 8, 8, "Swiglu")
    with pytest.raises(NotImplementedError, match="InvalidType.*Swiglu"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.InvalidType)


def test_shape_errors():
    x, ids, scales, fc1, fc2 = _problem(3, 2, 1, 8, 8, "Swiglu")
    with pytest.raises(ValueError, match="fc1_expert_weights"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.Relu)
    with pytest.raises(ValueError, match="token_final_scales"):
        reference_moe(x, ids, scales[:, :0], fc1, fc2)
