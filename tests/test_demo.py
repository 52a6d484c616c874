"""cutlass_moe.demo's helpers and exit codes (CPU)."""

from __future__ import annotations

import pytest
import torch

from cutlass_moe import _ext, demo


def test_exit_code_2_without_gpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.main(["--tokens", "1"]) == 2
    assert "no CUDA device" in caplog.text


def test_exit_code_2_without_extension(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with _ext._replaced_extension(None):
        assert demo.main([]) == 2
    assert "cutlass_moe._C" in caplog.text


def test_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--model", "nope"])
    with pytest.raises(SystemExit):
        demo.main(["--tokens", "-1"])


def test_presets_match_design():
    mixtral = demo.MODEL_PRESETS["mixtral-8x7b"]
    assert (mixtral.num_experts, mixtral.hidden_size, mixtral.inter_size, mixtral.top_k) == (
        8, 4096, 14336, 2)
    assert set(demo.MODEL_PRESETS) == {"mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
                                       "deepseek-v2-lite"}


def test_tokens_and_error_helpers():
    preset = demo.ModelPreset(num_experts=6, hidden_size=16, inter_size=8, top_k=3)
    x, ids, scales = demo.make_tokens(preset, 5, torch.bfloat16, torch.device("cpu"), seed=1)
    assert x.shape == (5, 16) and ids.dtype == torch.int32 and scales.dtype == torch.float32
    assert all(len(set(row)) == 3 for row in ids.tolist())
    torch.testing.assert_close(scales.sum(-1), torch.ones(5))
    w1, w2 = demo.make_layer(preset, torch.float32, torch.device("cpu"))
    assert w1.shape == (6, 16, 16) and w2.shape == (6, 16, 8)
    assert demo.relative_l2_error(torch.ones(3), torch.ones(3)) == 0.0
    assert demo.relative_l2_error(torch.zeros(0), torch.zeros(0)) == 0.0
    assert demo.relative_l2_error(torch.tensor([1.1]), torch.tensor([1.0])) == pytest.approx(0.1)
