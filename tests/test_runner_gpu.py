"""The C++ runner on a GPU: error state after a failed CUDA call, routing from several host
threads, and workspace sizes per tactic.

Inputs are random (never zeros), weights N(0, 1/fan_in); the workspace tests poison outputs and
workspaces with NaN bytes before a run. Results are compared with ``reference_moe`` by relative
L2 error (bf16: 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from _helpers import random_tokens, random_weights, record_error, rel_l2, run_in_threads
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16
TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is available")
    return _ext.load_extension()


@pytest.fixture(scope="module")
def runner(ext):
    return _ext.get_runner(DTYPE, DTYPE, DTYPE)


def _problem(num_tokens, hidden, inter, num_experts, top_k, gated, seed=0):
    """``(x, ids, scales, fc1, fc2)`` on the GPU."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    fc1, fc2 = random_weights(num_experts, hidden, inter, gated, DTYPE, DEVICE, gen)
    x, ids, scales = random_tokens(num_tokens, hidden, num_experts, top_k, DTYPE, seed + 1,
                                   DEVICE)
    return x, ids, scales, fc1, fc2


def _check_close(out, ref):
    err = record_error(DTYPE, rel_l2(out.float(), ref))
    assert err <= TOLERANCE, f"relative L2 error {err:.3g}"


def _nan_workspace(num_bytes):
    # 0xFF bytes read as NaN in 16-bit floats, so a kernel that reads an unwritten buffer shows.
    return torch.full((num_bytes,), 0xFF, dtype=torch.uint8, device=DEVICE)


def _tactic(runner, gemm, *, gated=False, split=False):
    """A runnable tactic name of GEMM ``gemm``: fused gated or not (GEMM1), split over K or not
    (GEMM2); skips the test when the build has none."""
    for desc in runner.tactics(gemm):
        if bool(desc.get("gated", False)) == gated and (int(desc["split_k"]) > 1) == split:
            return desc["name"], int(desc["split_k"])
    pytest.skip(f"no runnable GEMM{gemm} tactic with gated={gated}, split={split} in this build")


def _run_moe(runner, x, ids, scales, fc1, fc2, activation, workspace, workspace_bytes, tactic1,
             tactic2, fc1_bias=None):
    """One ``MoeRunner.run_moe`` call (no Python-side workspace check); returns the output."""
    num_tokens, hidden = x.shape
    out = torch.full_like(x, float("nan"))
    runner.run_moe(
        num_tokens, hidden, fc2.shape[2], fc1.shape[0], ids.shape[1], 0,
        _ext.activation_to_enum(activation), x.data_ptr(), ids.data_ptr(), scales.data_ptr(),
        fc1.data_ptr(), fc2.data_ptr(), 0 if fc1_bias is None else fc1_bias.data_ptr(), 0, 0,
        0, 0, out.data_ptr(), workspace.data_ptr(), workspace_bytes, tactic1, tactic2,
        torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    return out


# ------------------------------------------------------------------ a failed CUDA call


def test_failed_cuda_call_is_not_reported_again(ext, runner):
    """A thrown CUDA error must not stay latched in the runtime's last-error state, where the
    next launch check (cudaGetLastError) of an unrelated call would report it: the profiling
    set-up checks its launches that way."""
    num_tokens, hidden, inter, num_experts, top_k = 64, 256, 128, 8, 2
    x, ids, scales, fc1, fc2 = _problem(num_tokens, hidden, inter, num_experts, top_k, True)
    swiglu = _ext.activation_to_enum(ActivationType.Swiglu)
    args = (num_tokens, hidden, inter, num_experts, top_k, swiglu)
    stream = torch.cuda.current_stream().cuda_stream
    workspace_bytes = int(runner.workspace_size(*args))
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=DEVICE)

    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        ext._fail_cuda_call_for_tests()
    runner.prepare_gemm_profile(1, *args, fc1.data_ptr(), workspace.data_ptr(), workspace_bytes,
                                0, stream)
    name, _ = _tactic(runner, 1)
    runner.run_gemm_profile(1, name, *args, workspace.data_ptr(), workspace_bytes, stream)
    torch.cuda.synchronize()

    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        ext._fail_cuda_call_for_tests()
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE)[0]
    _check_close(out, reference_moe(x, ids, scales, fc1, fc2))


# ------------------------------------------------------------------ routing from two threads


def test_routing_from_threads_with_different_expert_counts(runner):
    """Two host threads route with E_local = 1600 and 3000, whose scatter kernel needs more than
    the default 48 KB of dynamic shared memory (8 warps x E x 4 bytes), on the single-block path
    (T*k <= 2048) and on the multi-block one in turn. With a per-call kernel attribute, one
    thread's smaller setting could land between the other's setting and launch, and that launch
    failed. Every fourth call goes through cutlass_fused_moe; the others call run_moe directly,
    whose thin Python layer lets the threads' C++ parts (run without the GIL) overlap more."""
    hidden = inter = 64
    top_k = 2
    token_counts = (512, 1536)  # T*k = 1024: one routing block; 3072: several
    expert_counts = (1600, 3000)
    iterations = 200  # per thread
    swiglu = _ext.activation_to_enum(ActivationType.Swiglu)
    tactic1, _ = _tactic(runner, 1)
    tactic2, _ = _tactic(runner, 2)

    cases = []
    for index, num_experts in enumerate(expert_counts):
        gen = torch.Generator(device=DEVICE).manual_seed(10 + index)
        fc1, fc2 = random_weights(num_experts, hidden, inter, True, DTYPE, DEVICE, gen)
        inputs = {}
        for num_tokens in token_counts:
            x, ids, scales = random_tokens(num_tokens, hidden, num_experts, top_k, DTYPE,
                                           100 * index + num_tokens, DEVICE)
            inputs[num_tokens] = (x, ids, scales, reference_moe(x, ids, scales, fc1, fc2))
        workspace_bytes = max(
            int(runner.workspace_size(t, hidden, inter, num_experts, top_k, swiglu,
                                      tactic1=tactic1, tactic2=tactic2))
            for t in token_counts)
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=DEVICE)
        cases.append((fc1, fc2, inputs, workspace))

    stream = torch.cuda.current_stream().cuda_stream
    outputs: list[list[tuple[int, torch.Tensor]]] = [[] for _ in cases]
    errors: list[Exception] = []

    def worker(index):
        fc1, fc2, inputs, workspace = cases[index]
        num_experts = fc1.shape[0]
        try:
            for i in range(iterations):
                num_tokens = token_counts[i % len(token_counts)]
                x, ids, scales, _ = inputs[num_tokens]
                if i % 4 == 0:
                    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE)[0]
                else:
                    out = torch.empty_like(x)
                    runner.run_moe(num_tokens, hidden, inter, num_experts, top_k, 0, swiglu,
                                   x.data_ptr(), ids.data_ptr(), scales.data_ptr(),
                                   fc1.data_ptr(), fc2.data_ptr(), 0, 0, 0, 0, 0,
                                   out.data_ptr(), workspace.data_ptr(), workspace.numel(),
                                   tactic1, tactic2, stream)
                outputs[index].append((num_tokens, out))
        except (RuntimeError, ValueError) as exc:  # reported by the main thread
            errors.append(exc)

    run_in_threads(worker, len(cases))
    torch.cuda.synchronize()
    assert not errors, f"a thread failed: {errors[0]!r}"

    for index, case in enumerate(cases):
        inputs = case[2]
        assert len(outputs[index]) == iterations
        for num_tokens, out in outputs[index]:
            _check_close(out, inputs[num_tokens][3])


# ------------------------------------------------------------------ workspace per tactic


def _workspace_size(runner, shape, activation, tactic1="", tactic2="", has_fc1_bias=False):
    return int(runner.workspace_size(*shape, _ext.activation_to_enum(activation),
                                     tactic1=tactic1, tactic2=tactic2,
                                     has_fc1_bias=has_fc1_bias))


def _check_exact_workspace(runner, problem, activation, tactic1, tactic2, fc1_bias=None):
    """A call given exactly workspace_size(...) bytes matches the reference, through
    cutlass_fused_moe and through run_moe; one byte less raises ValueError in both."""
    x, ids, scales, fc1, fc2 = problem
    shape = (x.shape[0], x.shape[1], fc2.shape[2], fc1.shape[0], ids.shape[1])
    size = _workspace_size(runner, shape, activation, tactic1, tactic2, fc1_bias is not None)
    ref = reference_moe(x, ids, scales, fc1, fc2, activation, fc1_expert_biases=fc1_bias)

    workspace = _nan_workspace(size)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, fc1_expert_biases=fc1_bias,
                            activation_type=activation, tactics=(tactic1, tactic2),
                            workspace_buffer=workspace)[0]
    torch.cuda.synchronize()
    _check_close(out, ref)
    with pytest.raises(ValueError):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, fc1_expert_biases=fc1_bias,
                          activation_type=activation, tactics=(tactic1, tactic2),
                          workspace_buffer=workspace[: size - 1])

    # The runner's own check and layout, with no Python check in front of them.
    workspace = _nan_workspace(size)
    out = _run_moe(runner, x, ids, scales, fc1, fc2, activation, workspace, size, tactic1,
                   tactic2, fc1_bias)
    _check_close(out, ref)
    with pytest.raises(ValueError, match=f"workspace has {size - 1} bytes, the call needs {size}"):
        _run_moe(runner, x, ids, scales, fc1, fc2, activation, workspace, size - 1, tactic1,
                 tactic2, fc1_bias)
    return size


def test_workspace_fused_gated_gemm1_needs_no_gemm1_buffers(runner):
    """A fused gated GEMM1 reads token rows and writes [T*k, I] itself: no [T*k, 2I] GEMM1
    output (nor gathered rows, whose region GEMM2's output keeps)."""
    num_tokens, hidden, inter, num_experts, top_k = 200, 256, 192, 8, 2
    shape = (num_tokens, hidden, inter, num_experts, top_k)
    fused, _ = _tactic(runner, 1, gated=True)
    plain1, _ = _tactic(runner, 1)
    plain2, _ = _tactic(runner, 2)
    problem = _problem(*shape, gated=True, seed=3)
    elem = torch.empty((), dtype=DTYPE).element_size()
    for activation in (ActivationType.Swiglu, ActivationType.Geglu):
        size_fused = _workspace_size(runner, shape, activation, fused, plain2)
        size_plain = _workspace_size(runner, shape, activation, plain1, plain2)
        size_any = _workspace_size(runner, shape, activation)
        assert size_plain - size_fused >= num_tokens * top_k * 2 * inter * elem
        assert size_any >= size_plain
        assert _check_exact_workspace(runner, problem, activation, fused, plain2) == size_fused
        assert _check_exact_workspace(runner, problem, activation, plain1, plain2) == size_plain


def test_workspace_split_k_partials_only_with_split(runner):
    """fp32 partial sums [splits, T*k, H] are reserved only for a GEMM2 split over K."""
    num_tokens, hidden, inter, num_experts, top_k = 24, 512, 256, 8, 4  # T*k = 96 <= 128
    shape = (num_tokens, hidden, inter, num_experts, top_k)
    rows = num_tokens * top_k
    assert rows <= _ext.load_extension().SPLIT_K_MAX_ROWS
    plain1, _ = _tactic(runner, 1)
    fused, _ = _tactic(runner, 1, gated=True)
    plain2, _ = _tactic(runner, 2)
    split2, splits = _tactic(runner, 2, split=True)
    swiglu = ActivationType.Swiglu
    size_split = _workspace_size(runner, shape, swiglu, plain1, split2)
    size_unsplit = _workspace_size(runner, shape, swiglu, plain1, plain2)
    size_any = _workspace_size(runner, shape, swiglu, plain1)
    assert size_split - size_unsplit >= splits * rows * hidden * 4
    max_splits = max(int(d["split_k"]) for d in runner.all_tactics(2))
    assert size_any - size_unsplit >= max_splits * rows * hidden * 4

    problem = _problem(*shape, gated=True, seed=4)
    assert _check_exact_workspace(runner, problem, swiglu, plain1, split2) == size_split
    assert _check_exact_workspace(runner, problem, swiglu, plain1, plain2) == size_unsplit
    # Fused GEMM1 and split GEMM2: neither the gathered rows nor GEMM2's [T*k, H] output.
    _check_exact_workspace(runner, problem, swiglu, fused, split2)


def test_workspace_activation_stage_only_when_it_runs(runner):
    """After a plain GEMM1, [T*k, I] is reserved only when the activation stage runs: not for
    Identity without fc1 bias (GEMM2 reads GEMM1's output), but with a bias."""
    num_tokens, hidden, inter, num_experts, top_k = 150, 256, 128, 8, 2
    shape = (num_tokens, hidden, inter, num_experts, top_k)
    rows = num_tokens * top_k
    elem = torch.empty((), dtype=DTYPE).element_size()
    plain1, _ = _tactic(runner, 1)
    plain2, _ = _tactic(runner, 2)
    identity = ActivationType.Identity
    size_no_bias = _workspace_size(runner, shape, identity, plain1, plain2)
    size_bias = _workspace_size(runner, shape, identity, plain1, plain2, has_fc1_bias=True)
    assert size_bias - size_no_bias >= rows * inter * elem
    relu = ActivationType.Relu
    assert _workspace_size(runner, shape, relu, plain1, plain2) == size_bias

    problem = _problem(*shape, gated=False, seed=5)
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    bias = torch.randn(num_experts, inter, device=DEVICE, generator=gen).to(DTYPE)
    assert _check_exact_workspace(runner, problem, identity, plain1, plain2) == size_no_bias
    assert _check_exact_workspace(runner, problem, identity, plain1, plain2, bias) == size_bias
    # A workspace sized without the bias is too small for a call with one.
    x, ids, scales, fc1, fc2 = problem
    with pytest.raises(ValueError, match="workspace has"):
        _run_moe(runner, x, ids, scales, fc1, fc2, identity, _nan_workspace(size_no_bias),
                 size_no_bias, plain1, plain2, bias)


def test_workspace_size_rejects_bad_tactics(runner):
    shape = (16, 256, 128, 8, 2)
    plain1, _ = _tactic(runner, 1)
    with pytest.raises(ValueError, match="unknown tactic"):
        _workspace_size(runner, shape, ActivationType.Swiglu, "no_such_tactic")
    with pytest.raises(ValueError, match="unknown tactic"):
        _workspace_size(runner, shape, ActivationType.Swiglu, plain1, "no_such_tactic")
    fused, _ = _tactic(runner, 1, gated=True)
    with pytest.raises(ValueError, match="not gated"):
        _workspace_size(runner, shape, ActivationType.Relu, fused)
    split2, _ = _tactic(runner, 2, split=True)
    with pytest.raises(ValueError, match="expanded rows"):
        _workspace_size(runner, (1000, 256, 128, 8, 2), ActivationType.Swiglu, plain1, split2)
