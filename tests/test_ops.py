"""cutlass_fused_moe's dispatch into the extension, on CPU with a fake ``_C``.

The fake runner (tests/_fake_ext.py) reads every tensor through the integer pointers it is given
and computes the layer with reference_moe, so these tests check the pointers, sizes, options,
tactics and workspace that the Python layer passes, in the binding's documented order, and that
the public function traces under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import pytest
import torch

from _fake_ext import FAKE_STREAM as STREAM
from _fake_ext import FakeMoeRunner
from _helpers import random_routing, random_weights, rel_l2
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, ops, reference_moe, validation
from cutlass_moe.quantization import dequantize, quantize_moe_weights_int8
from cutlass_moe.tactics import default_tactic

GATED = (ActivationType.Swiglu, ActivationType.Geglu)


def _runner(act=torch.bfloat16, out=None):
    return _ext.get_runner(act, act, out or act)


def _problem(t=9, e=4, k=2, h=16, i=8, activation=ActivationType.Swiglu, dtype=torch.bfloat16,
             seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(dtype)
    ids, scales = random_routing(t, e, k, generator=gen)
    fc1, fc2 = random_weights(e, h, i, activation in GATED, dtype, generator=gen)
    return x, ids, scales, fc1, fc2


def _close(out, ref, tol=1e-2):
    assert out.shape == ref.shape
    assert rel_l2(out.float(), ref) <= tol


@pytest.mark.parametrize("activation", [ActivationType.Swiglu, ActivationType.Geglu,
                                        ActivationType.Gelu, ActivationType.Relu,
                                        ActivationType.Silu, ActivationType.Identity])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32)])
def test_arguments_reach_the_runner(fake_cpu, activation, dtype, out_dtype):
    x, ids, scales, fc1, fc2 = _problem(activation=activation, dtype=dtype)
    result = cutlass_fused_moe(x, ids, scales, fc1, fc2, out_dtype, activation_type=activation)
    assert isinstance(result, list) and len(result) == 1
    out = result[0]
    assert out.dtype == out_dtype and out.shape == x.shape
    _close(out, reference_moe(x, ids, scales, fc1, fc2, activation))

    (call,) = _runner(dtype, out_dtype).calls
    assert (call["num_tokens"], call["hidden_size"], call["inter_size"], call["num_experts"],
            call["top_k"], call["expert_start"]) == (9, 16, 8, 4, 2, 0)
    assert call["activation"] == _ext.activation_to_enum(activation)
    assert call["input"] == x.data_ptr()
    assert call["token_selected_experts"] == ids.data_ptr()
    assert call["token_final_scales"] == scales.data_ptr()
    assert call["fc1_weights"] == fc1.data_ptr() and call["fc2_weights"] == fc2.data_ptr()
    assert call["fc1_bias"] == call["fc2_bias"] == 0
    assert call["swiglu_alpha"] == call["swiglu_beta"] == call["swiglu_limit"] == 0
    assert call["output"] == out.data_ptr()
    assert call["stream"] == STREAM
    assert call["workspace"] != 0 and call["workspace_bytes"] > 0


def test_biases_and_tp_rule(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=1)
    b1 = torch.randn(fc1.shape[:2]).to(torch.bfloat16)
    b2 = torch.randn(fc2.shape[:2]).to(torch.bfloat16)
    outs = []
    for rank in (0, 1):
        out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.float32, fc1_expert_biases=b1,
                                fc2_expert_biases=b2, tp_size=2, tp_rank=rank)[0]
        _close(out, reference_moe(x, ids, scales, fc1, fc2, fc1_expert_biases=b1,
                                  fc2_expert_biases=b2, tp_size=2, tp_rank=rank), 1e-5)
        outs.append(out)
    calls = _runner(out=torch.float32).calls
    assert calls[0]["fc1_bias"] == b1.data_ptr() and calls[0]["fc2_bias"] == b2.data_ptr()
    assert calls[1]["fc1_bias"] == b1.data_ptr() and calls[1]["fc2_bias"] == 0
    assert rel_l2(outs[0], outs[1]) > 1e-3


def test_expert_parallel_rank(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(e=4, seed=2)
    global_ids = ids + 4  # all tokens routed to rank 1 of 2 (E_local = 4)
    global_ids[0, 0] = 1  # one choice on rank 0: contributes zero on rank 1
    out = cutlass_fused_moe(x, global_ids, scales, fc1, fc2, torch.float32, ep_size=2,
                            ep_rank=1)[0]
    (call,) = _runner(out=torch.float32).calls
    assert call["expert_start"] == 4
    _close(out, reference_moe(x, global_ids, scales, fc1, fc2, ep_size=2, ep_rank=1), 1e-5)


def test_clamped_swiglu_pointers(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=3)
    x = x * 4
    limit = torch.full((4,), 0.5)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.float32, swiglu_limit=limit)[0]
    (call,) = _runner(out=torch.float32).calls
    assert call["swiglu_limit"] == limit.data_ptr()
    assert call["swiglu_alpha"] != 0 and call["swiglu_beta"] != 0
    _close(out, reference_moe(x, ids, scales, fc1, fc2, swiglu_limit=limit), 1e-5)
    assert rel_l2(out, reference_moe(x, ids, scales, fc1, fc2)) > 1e-2


def test_int64_ids_and_low_precision_scales(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=4)
    ids64 = ids.long()
    ids64[0, 0] = 2**32 + 1  # must not alias expert 1 after narrowing
    ids64[1, 1] = -5
    out = cutlass_fused_moe(x, ids64, scales.to(torch.bfloat16), fc1, fc2, torch.float32)[0]
    _close(out, reference_moe(x, ids64, scales.to(torch.bfloat16), fc1, fc2), 1e-5)


@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (64, 8, 2), (1000, 4, 2), (7, 60, 4)])
def test_default_tactics_follow_the_heuristic(fake_cpu, t, e, k):
    x, ids, scales, fc1, fc2 = _problem(t=t, e=e, k=k, seed=5)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)
    (call,) = _runner().calls
    runner = _runner()
    assert call["tactic1"] == default_tactic(runner.tactics(1), t * k / e)
    assert call["tactic2"] == default_tactic(runner.tactics(2), t * k / e)


def test_default_tactic_uses_global_expert_count(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(t=64, e=4, k=2, seed=6)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, ep_size=4, ep_rank=0)
    (call,) = _runner().calls
    assert call["tactic1"] == default_tactic(_runner().tactics(1), 64 * 2 / 16)


def test_forced_tactics(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=7)
    names = ("fake_g1_m64n256k64_s2", "fake_g2_m16n128k64_s3")
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, tactics=names)[0]
    (call,) = _runner().calls
    assert (call["tactic1"], call["tactic2"]) == names
    _close(out, reference_moe(x, ids, scales, fc1, fc2))
    with pytest.raises(ValueError, match="not a runnable GEMM1 tactic.*available: fake_g1_"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16,
                          tactics=("nope", names[1]))
    with pytest.raises(ValueError, match="GEMM2"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16,
                          tactics=(names[0], names[0]))
    with pytest.raises(ValueError, match="not a runnable"):  # compiled but not runnable
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16,
                          tactics=("fake_g1_m128n256k64_s4", names[1]))


def test_zero_tokens_does_not_call_the_extension(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(t=0)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)[0]
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16
    assert FakeMoeRunner.constructed == []


def test_output_written_in_place(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=8)
    output = torch.full((9, 16), float("nan"), dtype=torch.float32)
    result = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.float32, output=output)
    assert result[0] is output
    assert not output.isnan().any()
    _close(output, reference_moe(x, ids, scales, fc1, fc2), 1e-5)


def test_workspace_buffer(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=9)
    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, workspace_buffer=buffer)
    (call,) = _runner().calls
    assert call["workspace"] == buffer.data_ptr() and call["workspace_bytes"] == buffer.numel()
    assert torch.all(buffer == 0xAB)  # the runner wrote into it
    with pytest.raises(ValueError, match="workspace_buffer has 16 bytes"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16,
                          workspace_buffer=torch.empty(16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="workspace_buffer must be 16-byte aligned"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, workspace_buffer=buffer[3:])


def test_misaligned_output_rejected(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=10)
    storage = torch.empty(9 * 16 + 8, dtype=torch.bfloat16)
    output = storage[1:1 + 9 * 16].view(9, 16)  # 2 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="output must be 16-byte aligned"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, output=output)


def test_missing_extension_raises_runtime_error(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=11)
    with _ext._replaced_extension(None), pytest.raises(RuntimeError, match="not built"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)


class _MoeBlock(torch.nn.Module):
    def __init__(self, fc1, fc2, num_experts, top_k):
        super().__init__()
        self.router = torch.nn.Linear(fc1.shape[2], num_experts, bias=False)
        self.fc1 = torch.nn.Parameter(fc1, requires_grad=False)
        self.fc2 = torch.nn.Parameter(fc2, requires_grad=False)
        self.top_k = top_k

    def forward(self, x):
        logits = self.router(x.float())
        scales, ids = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        out = cutlass_fused_moe(x, ids.to(torch.int32), scales, self.fc1, self.fc2, x.dtype)[0]
        return x + out


def test_torch_compile_fullgraph_matches_eager(fake_cpu):
    torch._dynamo.reset()
    x, _, _, fc1, fc2 = _problem(t=12, seed=12)
    block = _MoeBlock(fc1, fc2, num_experts=4, top_k=2)
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    assert len(_runner().calls) == 2


def test_torch_compile_dynamic_tokens(fake_cpu):
    torch._dynamo.reset()
    _, _, _, fc1, fc2 = _problem(seed=13)
    block = _MoeBlock(fc1, fc2, num_experts=4, top_k=2)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for t in (3, 17, 40):
            x = torch.randn(t, 16).to(torch.bfloat16)
            torch.testing.assert_close(compiled(x), block(x))


def test_opcheck(fake_cpu):
    """torch.library.opcheck: schema (mutations declared), fake kernel, AOT dispatch."""
    x, ids, scales, fc1, fc2 = _problem(seed=14)
    b1 = torch.randn(fc1.shape[:2]).to(torch.bfloat16)
    output = torch.empty(9, 16, dtype=torch.float32)
    workspace = torch.empty(1 << 14, dtype=torch.uint8)
    args = (output, x, ids, scales, fc1, fc2, None, None, b1, None, None, None, None, workspace,
            int(ActivationType.Swiglu), 0, 4, 8192, "", "")
    torch.library.opcheck(torch.ops.cutlass_moe.fused_moe.default, args)


def test_opcheck_int8(fake_cpu):
    """The same with int8 weights and their scales (the optional scale tensors of the schema)."""
    x, ids, scales, fc1, fc2 = _problem(i=16, seed=14)
    q1, q2, (s1, s2) = quantize_moe_weights_int8(fc1, fc2)
    output = torch.empty(9, 16, dtype=torch.bfloat16)
    args = (output, x, ids, scales, q1, q2, s1, s2, None, None, None, None, None, None,
            int(ActivationType.Swiglu), 0, 4, 8192, "", "")
    torch.library.opcheck(torch.ops.cutlass_moe.fused_moe.default, args)


def test_weights_that_require_grad(fake_cpu):
    """Parameters left with requires_grad (a model not in inference mode) still run."""
    x, ids, scales, fc1, fc2 = _problem(seed=15)
    w1 = torch.nn.Parameter(fc1)
    w2 = torch.nn.Parameter(fc2)
    out = cutlass_fused_moe(x, ids, scales, w1, w2, torch.bfloat16)[0]
    _close(out, reference_moe(x, ids, scales, fc1, fc2))


# ------------------------------------------------------------------ int8 weights (W8A16)


def _int8_problem(t=9, e=4, k=2, h=16, i=16, activation=ActivationType.Swiglu,
                  dtype=torch.bfloat16, seed=0):
    x, ids, scales, fc1, fc2 = _problem(t, e, k, h, i, activation, dtype, seed)
    q1, q2, quant_scales = quantize_moe_weights_int8(fc1, fc2)
    return x, ids, scales, q1, q2, quant_scales, (fc1, fc2)


def _dequantized(q1, q2, quant_scales):
    """float32 ``q * scale``: what the kernels (and the fake) compute with, unrounded."""
    return (dequantize(q1, quant_scales[0], torch.float32),
            dequantize(q2, quant_scales[1], torch.float32))


@pytest.mark.parametrize("activation", [ActivationType.Swiglu, ActivationType.Relu])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16),
                                             (torch.float16, torch.float32)])
def test_int8_arguments_reach_the_runner(fake_cpu, activation, dtype, out_dtype):
    x, ids, scales, q1, q2, quant_scales, _ = _int8_problem(activation=activation, dtype=dtype)
    out = cutlass_fused_moe(x, ids, scales, q1, q2, out_dtype, quant_scales=quant_scales,
                            use_int8_woq_per_channel=True, activation_type=activation)[0]
    assert out.dtype == out_dtype
    # The fake computes with the dequantised weights, read through the scale pointers.
    _close(out, reference_moe(x, ids, scales, *_dequantized(q1, q2, quant_scales), activation),
           1e-2 if out_dtype != torch.float32 else 1e-5)
    assert FakeMoeRunner.constructed == [(_ext.dtype_to_enum(dtype), 3,
                                          _ext.dtype_to_enum(out_dtype))]
    runner = _ext.get_runner(dtype, torch.int8, out_dtype)
    (call,) = runner.calls
    assert call["fc1_weights"] == q1.data_ptr() and call["fc2_weights"] == q2.data_ptr()
    assert call["fc1_scales"] == quant_scales[0].data_ptr()
    assert call["fc2_scales"] == quant_scales[1].data_ptr()
    assert (call["hidden_size"], call["inter_size"]) == (16, 16)


def test_16bit_calls_pass_null_scales(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=20)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)
    (call,) = _runner().calls
    assert call["fc1_scales"] == 0 and call["fc2_scales"] == 0


def test_int8_scales_are_honoured(fake_cpu):
    """Doubling fc2's scales doubles the output; swapping fc31's halves changes it."""
    x, ids, scales, q1, q2, (s1, s2), _ = _int8_problem(seed=21)
    kwargs = {"use_int8_woq_per_channel": True}
    base = cutlass_fused_moe(x, ids, scales, q1, q2, torch.float32, quant_scales=[s1, s2],
                             **kwargs)[0]
    doubled = cutlass_fused_moe(x, ids, scales, q1, q2, torch.float32,
                                quant_scales=[s1, s2 * 2], **kwargs)[0]
    torch.testing.assert_close(doubled, 2 * base, rtol=1e-5, atol=1e-6)
    swapped = cutlass_fused_moe(x, ids, scales, q1, q2, torch.float32,
                                quant_scales=[s1.flip(-1).contiguous(), s2], **kwargs)[0]
    assert rel_l2(swapped, base) > 1e-2


def test_int8_end_to_end_against_the_unquantized_layer(fake_cpu):
    x, ids, scales, q1, q2, quant_scales, (fc1, fc2) = _int8_problem(t=64, h=256, i=128,
                                                                     seed=22)
    out = cutlass_fused_moe(x, ids, scales, q1, q2, torch.float32, quant_scales=quant_scales,
                            use_int8_woq_per_channel=True)[0]
    err = rel_l2(out, reference_moe(x, ids, scales, fc1, fc2))
    assert 1e-3 < err < 3e-2  # quantisation noise: visible, and within the int8 bound


def test_int8_biases_ep_and_clamp(fake_cpu):
    x, ids, scales, q1, q2, quant_scales, _ = _int8_problem(seed=23)
    w1, w2 = _dequantized(q1, q2, quant_scales)
    b1 = torch.randn(q1.shape[:2]).to(torch.bfloat16)
    b2 = torch.randn(q2.shape[:2]).to(torch.bfloat16)
    limit = torch.full((4,), 0.5)
    global_ids = ids + 4
    global_ids[0, 0] = 1  # another rank's expert
    out = cutlass_fused_moe(x * 4, global_ids, scales, q1, q2, torch.float32,
                            quant_scales=quant_scales, use_int8_woq_per_channel=True,
                            fc1_expert_biases=b1, fc2_expert_biases=b2, swiglu_limit=limit,
                            ep_size=2, ep_rank=1)[0]
    ref = reference_moe(x * 4, global_ids, scales, w1, w2, fc1_expert_biases=b1,
                        fc2_expert_biases=b2, swiglu_limit=limit, ep_size=2, ep_rank=1)
    _close(out, ref, 1e-5)
    (call,) = _ext.get_runner(torch.bfloat16, torch.int8, torch.float32).calls
    assert call["expert_start"] == 4 and call["fc1_bias"] == b1.data_ptr()


def test_int8_default_and_forced_tactics(fake_cpu):
    x, ids, scales, q1, q2, quant_scales, _ = _int8_problem(t=64, seed=24)
    kwargs = {"quant_scales": quant_scales, "use_int8_woq_per_channel": True}
    cutlass_fused_moe(x, ids, scales, q1, q2, torch.bfloat16, **kwargs)
    runner = _ext.get_runner(torch.bfloat16, torch.int8, torch.bfloat16)
    assert runner.calls[-1]["tactic1"] == default_tactic(runner.tactics(1), 64 * 2 / 4)
    names = ("fake_g1_m64n256k64_s2", "fake_g2_m16n128k64_s3")
    cutlass_fused_moe(x, ids, scales, q1, q2, torch.bfloat16, tactics=names, **kwargs)
    assert (runner.calls[-1]["tactic1"], runner.calls[-1]["tactic2"]) == names


def test_int8_misaligned_scales_rejected(fake_cpu):
    x, ids, scales, q1, q2, (s1, s2), _ = _int8_problem(seed=25)
    storage = torch.empty(s2.numel() + 1, dtype=torch.bfloat16)
    shifted = storage[1:].view_as(s2)  # contiguous, 2 bytes past a 16-byte boundary
    shifted.copy_(s2)
    with pytest.raises(ValueError, match="fc2_weight_scales must be 16-byte aligned"):
        cutlass_fused_moe(x, ids, scales, q1, q2, torch.bfloat16, quant_scales=[s1, shifted],
                          use_int8_woq_per_channel=True)


def test_int8_op_without_scales_is_refused(fake_cpu):
    x, ids, scales, q1, q2, (s1, _), _ = _int8_problem(seed=26)
    output = torch.empty(9, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="need fc1_weight_scales and fc2_weight_scales"):
        torch.ops.cutlass_moe.fused_moe(output, x, ids, scales, q1, q2, s1, None, None, None,
                                        None, None, None, None, int(ActivationType.Swiglu), 0,
                                        4, 8192, "", "")


class _Int8MoeBlock(torch.nn.Module):
    def __init__(self, q1, q2, quant_scales, top_k):
        super().__init__()
        self.register_buffer("q1", q1)
        self.register_buffer("q2", q2)
        self.register_buffer("s1", quant_scales[0])
        self.register_buffer("s2", quant_scales[1])
        self.top_k = top_k

    def forward(self, x, ids, scales):
        out = cutlass_fused_moe(x, ids, scales, self.q1, self.q2, x.dtype,
                                quant_scales=[self.s1, self.s2],
                                use_int8_woq_per_channel=True)[0]
        return x + out


def test_int8_torch_compile_fullgraph(fake_cpu):
    torch._dynamo.reset()
    x, ids, scales, q1, q2, quant_scales, _ = _int8_problem(t=12, seed=27)
    block = _Int8MoeBlock(q1, q2, quant_scales, 2)
    with torch.no_grad():
        eager = block(x, ids, scales)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, ids, scales)
    torch.testing.assert_close(compiled, eager)


# ------------------------------------------------------------------ the raw op validates


def _op_args(**overrides):
    """Arguments of torch.ops.cutlass_moe.fused_moe for a valid small call, by name."""
    x, ids, scales, fc1, fc2 = _problem(seed=21)
    args = {
        "output": torch.empty(9, 16, dtype=torch.bfloat16), "input": x,
        "token_selected_experts": ids, "token_final_scales": scales,
        "fc1_expert_weights": fc1, "fc2_expert_weights": fc2, "fc1_weight_scales": None,
        "fc2_weight_scales": None, "fc1_expert_biases": None, "fc2_expert_biases": None,
        "swiglu_alpha": None, "swiglu_beta": None, "swiglu_limit": None,
        "workspace_buffer": None, "activation": int(ActivationType.Swiglu),
        "expert_start": 0, "num_experts_total": 4, "tune_max_num_tokens": 8192,
        "tactic1": "", "tactic2": "", "enable_pdl": True, "clamped_relu2_limit": None,
        "situ_beta": None, "situ_linear_beta": None,
    }
    args.update(overrides)
    return args


def _run_op(args):
    torch.ops.cutlass_moe.fused_moe(*args.values())


def test_raw_op_runs_valid_arguments(fake_cpu):
    args = _op_args()
    _run_op(args)
    ref = reference_moe(args["input"], args["token_selected_experts"],
                        args["token_final_scales"], args["fc1_expert_weights"],
                        args["fc2_expert_weights"])
    _close(args["output"], ref)


@pytest.mark.parametrize("overrides,match", [
    # Experts disagree between the weights: out-of-bounds reads on a GPU.
    (lambda a: {"fc2_expert_weights": torch.randn(2, 16, 8).to(torch.bfloat16)},
     r"fc2_expert_weights must be \[4, 16, 8\]"),
    (lambda a: {"fc1_expert_weights": torch.randn(2, 16, 16).to(torch.bfloat16)},
     r"fc2_expert_weights must be \[2, 16, 8\]"),
    # float16 router weights would be read as float32.
    (lambda a: {"token_final_scales": a["token_final_scales"].half()},
     "token_final_scales must be .* of torch.float32"),
    (lambda a: {"token_selected_experts": a["token_selected_experts"].long()},
     "token_selected_experts must be .* of torch.int32"),
    (lambda a: {"token_final_scales": a["token_final_scales"][:5]},
     r"token_final_scales must be \[9, 2\]"),
    (lambda a: {"output": torch.empty(9, 8, dtype=torch.bfloat16)}, r"output must be \[9, 16\]"),
    (lambda a: {"output": torch.empty(16, 9, dtype=torch.bfloat16).t()},
     "output must be contiguous"),
    (lambda a: {"fc1_expert_biases": torch.zeros(4, 8, dtype=torch.bfloat16)},
     r"fc1_expert_biases must be \[4, 16\]"),
    (lambda a: {"swiglu_limit": torch.ones(4)}, "swiglu_alpha is required"),
    (lambda a: {"swiglu_alpha": torch.ones(4, dtype=torch.float16),
                "swiglu_beta": torch.ones(4), "swiglu_limit": torch.ones(4)},
     "swiglu_alpha must be .* of torch.float32"),
    (lambda a: {"fc1_weight_scales": torch.ones(4, 16, dtype=torch.bfloat16)},
     "only for int8 or int4 weights"),
    (lambda a: {"activation": 11}, "InvalidType is not supported"),
    (lambda a: {"situ_beta": torch.ones(4)}, "situ_beta is only valid with ActivationType.Situ"),
    (lambda a: {"activation": 99}, "not an ActivationType"),
    (lambda a: {"expert_start": 2}, "expert_start=2 and num_experts_total=4"),
    (lambda a: {"num_experts_total": 2**31}, "int32"),
    (lambda a: {"workspace_buffer": torch.empty(64, dtype=torch.float32)},
     "workspace_buffer must be"),
    (lambda a: {"output": a["input"]}, "output overlaps input"),
])
def test_raw_op_refuses_inconsistent_arguments(fake_cpu, overrides, match):
    args = _op_args()
    args.update(overrides(args))
    with pytest.raises((ValueError, NotImplementedError), match=match):
        _run_op(args)
    assert _runner().calls == []  # nothing reached the runner


def test_raw_op_int8_needs_scales_of_the_right_shape(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(i=16, seed=22)
    q1, q2, (s1, s2) = quantize_moe_weights_int8(fc1, fc2)
    args = _op_args(input=x, token_selected_experts=ids, token_final_scales=scales,
                    fc1_expert_weights=q1, fc2_expert_weights=q2, fc1_weight_scales=s1,
                    fc2_weight_scales=s2[:2])
    with pytest.raises(ValueError, match=r"fc2_weight_scales must be \[4, 16\]"):
        _run_op(args)
    args.update(fc2_weight_scales=None)
    with pytest.raises(ValueError, match="need fc1_weight_scales and fc2_weight_scales"):
        _run_op(args)


def test_raw_op_fake_kernel_validates_under_meta(fake_cpu):
    """torch.compile traces the op through its fake kernel: it checks shapes too."""
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v
            for k, v in _op_args().items()}
    _run_op(args)  # valid: nothing raised
    args["fc2_expert_weights"] = torch.empty(2, 16, 8, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"fc2_expert_weights must be \[4, 16, 8\]"):
        _run_op(args)


def test_public_calls_are_validated_once(fake_cpu, monkeypatch):
    """cutlass_fused_moe validates and its op call skips the second check; a direct op call
    is checked by the kernel."""
    checks = []
    real = validation.check_op_arguments
    monkeypatch.setattr(validation, "check_op_arguments",
                        lambda *a, **k: (checks.append(1), real(*a, **k)))
    x, ids, scales, fc1, fc2 = _problem(seed=23)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)
    assert checks == []
    _run_op(_op_args())
    assert checks == [1]


# ------------------------------------------------------------------ memory overlaps


def test_output_overlapping_the_workspace_is_refused(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=24)
    workspace = torch.empty(1 << 16, dtype=torch.uint8)
    output = workspace[1024:1024 + 9 * 16 * 2].view(torch.bfloat16).view(9, 16)
    with pytest.raises(ValueError, match="output overlaps workspace_buffer"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, output=output,
                          workspace_buffer=workspace)
    assert _runner().calls == []


@pytest.mark.parametrize("target", ["input", "token_final_scales", "fc2_expert_biases"])
def test_output_overlapping_an_input_is_refused(fake_cpu, target):
    x, ids, scales, fc1, fc2 = _problem(seed=25)
    storage = torch.zeros(4096, dtype=torch.float32)
    output = storage[:9 * 16].view(9, 16)
    kwargs = {}
    if target == "input":
        x = storage[64:64 + 9 * 8].view(torch.bfloat16).view(9, 16)
    elif target == "token_final_scales":
        scales = storage[100:118].view(9, 2)
    else:
        kwargs["fc2_expert_biases"] = storage[32:64].view(torch.bfloat16).view(4, 16)
    with pytest.raises(ValueError, match=f"output overlaps {target}"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.float32, output=output, **kwargs)


def test_workspace_overlapping_a_weight_is_refused(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=26)
    workspace = fc2.view(-1).view(torch.uint8)
    with pytest.raises(ValueError, match="workspace_buffer overlaps fc2_expert_weights"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, workspace_buffer=workspace)


def test_adjacent_tensors_do_not_overlap(fake_cpu):
    x, ids, scales, fc1, fc2 = _problem(seed=27)
    storage = torch.empty(2 * 9 * 16 * 2 + 4096, dtype=torch.uint8)
    output = storage[:9 * 16 * 2].view(torch.bfloat16).view(9, 16)
    workspace = storage[9 * 16 * 2:]
    cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, output=output,
                      workspace_buffer=workspace)
    _close(output, reference_moe(x, ids, scales, fc1, fc2))


# ------------------------------------------------------------------ check_inputs and capture


def _capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_env_id_check_is_skipped_with_one_warning_during_capture(fake_cpu, monkeypatch):
    x, ids, scales, fc1, fc2 = _problem(seed=28)
    ids[0, 0] = 99  # the check would raise; inside capture it must not run (it synchronises)
    monkeypatch.setenv(validation.CHECK_INPUTS_ENV, "1")
    with pytest.raises(ValueError, match="outside"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)
    _capturing(monkeypatch)
    monkeypatch.setattr(ops, "_capture_check_warned", False)

    def two_calls() -> None:
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16)

    with pytest.warns(UserWarning, match="CUTLASS_MOE_CHECK_INPUTS=1 is ignored") as record:
        two_calls()
    assert len(record) == 1


def test_explicit_id_check_during_capture_is_refused(fake_cpu, monkeypatch):
    x, ids, scales, fc1, fc2 = _problem(seed=29)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="check_inputs=True .* CUDA-graph capture"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, check_inputs=True)
