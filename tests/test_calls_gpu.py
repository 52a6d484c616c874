"""The Python layer's reliability on a GPU: tuning per context, id checks and CUDA-graph
capture, the raw op's validation and memory overlaps (see docs/architecture.md, "One call" and
"Tuner")."""

from __future__ import annotations

import threading

import pytest
import torch

from _helpers import random_tokens, random_weights, rel_l2
from cutlass_moe import (
    autotune,
    cutlass_fused_moe,
    ops,
    reference_moe,
    validation,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16


def _layer(num_experts=8, hidden=256, inter=128, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return random_weights(num_experts, hidden, inter, True, DTYPE, DEVICE, gen)


def test_autotune_in_one_thread_while_another_captures(fresh_tuner):
    """A thread tuning inside autotune() must not make another thread's untuned call tune
    (which would refuse to run during its CUDA-graph capture)."""
    tuning_fc1, tuning_fc2 = _layer(seed=1)
    fc1, fc2 = _layer(num_experts=16, seed=2)  # another shape: its own cache keys
    x, ids, scales = random_tokens(24, 256, 16, 2, DTYPE, 3, DEVICE)
    out = torch.empty_like(x)
    inside, done, errors = threading.Event(), threading.Event(), []

    def tuning_thread():
        try:
            with torch.cuda.stream(torch.cuda.Stream()), autotune():
                inside.set()
                tokens = 1
                while not done.is_set() and tokens <= 4096:
                    tx, tids, tscales = random_tokens(tokens, 256, 8, 2, DTYPE, tokens, DEVICE)
                    cutlass_fused_moe(tx, tids, tscales, tuning_fc1, tuning_fc2, DTYPE,
                                      tune_max_num_tokens=4096)
                    tokens *= 2
                torch.cuda.current_stream().synchronize()
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    thread = threading.Thread(target=tuning_thread)
    thread.start()
    try:
        assert inside.wait(60)
        cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, output=out)  # warm-up, eager
        graph = torch.cuda.CUDAGraph()
        # thread_local: the tuning thread's own syncs are allowed while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, output=out)
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_l2(out.float(), reference_moe(x, ids, scales, fc1, fc2)) <= 1e-2
    assert any(k.shape.num_experts == 8 for k in fresh_tuner.entries())  # the thread did tune
    assert not any(k.shape.num_experts == 16 for k in fresh_tuner.entries())


def test_env_id_check_is_skipped_during_capture(fresh_tuner, monkeypatch):
    fc1, fc2 = _layer(seed=4)
    x, ids, scales = random_tokens(16, 256, 8, 2, DTYPE, 5, DEVICE)
    out = torch.empty_like(x)
    monkeypatch.setenv(validation.CHECK_INPUTS_ENV, "1")
    monkeypatch.setattr(ops, "_capture_check_warned", False)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, output=out)  # eager: checked, fine
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(UserWarning, match="ignored for calls captured"), torch.cuda.graph(graph):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, output=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_l2(out.float(), reference_moe(x, ids, scales, fc1, fc2)) <= 1e-2
    ids[0, 0] = 99  # eager calls still check
    with pytest.raises(ValueError, match="outside"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE)


def test_explicit_id_check_during_capture_raises(fresh_tuner):
    fc1, fc2 = _layer(seed=6)
    x, ids, scales = random_tokens(16, 256, 8, 2, DTYPE, 7, DEVICE)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="check_inputs=True"), torch.cuda.graph(graph):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, check_inputs=True)


def test_raw_op_refuses_mismatched_experts_on_the_gpu(fresh_tuner):
    fc1, _ = _layer(num_experts=2, seed=8)
    _, fc2 = _layer(num_experts=4, seed=8)
    x, ids, scales = random_tokens(16, 256, 2, 2, DTYPE, 9, DEVICE)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match=r"fc2_expert_weights must be \[2, 256, 128\]"):
        torch.ops.cutlass_moe.fused_moe(out, x, ids, scales, fc1, fc2, None, None, None, None,
                                        None, None, None, None, 3, 0, 2, 8192, "", "")
    with pytest.raises(ValueError, match="token_final_scales must be .* of torch.float32"):
        torch.ops.cutlass_moe.fused_moe(out, x, ids, scales.half(), fc1, fc1.new_empty(
            2, 256, 128), None, None, None, None, None, None, None, None, 3, 0, 2, 8192, "", "")


def test_output_inside_the_workspace_is_refused(fresh_tuner):
    fc1, fc2 = _layer(seed=10)
    x, ids, scales = random_tokens(16, 256, 8, 2, DTYPE, 11, DEVICE)
    workspace = torch.empty(1 << 22, dtype=torch.uint8, device=DEVICE)
    out = workspace[4096:4096 + x.numel() * 2].view(DTYPE).view(x.shape)
    with pytest.raises(ValueError, match="output overlaps workspace_buffer"):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, output=out, workspace_buffer=workspace)
    out = torch.empty_like(x)
    cutlass_fused_moe(x, ids, scales, fc1, fc2, DTYPE, output=out, workspace_buffer=workspace)
    assert rel_l2(out.float(), reference_moe(x, ids, scales, fc1, fc2)) <= 1e-2
