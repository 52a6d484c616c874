"""cutlass_moe.demo (its help, exit codes and a whole run with the fake extension) and the random
layers and inputs of cutlass_moe.synthetic it runs on (CPU)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from _fake_ext import make_fake_extension
from _helpers import FakeEvent
from cutlass_moe import _ext, demo, presets, synthetic, timing, validation
from cutlass_moe.presets import ModelPreset


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
                                       "deepseek-v2-lite", "gpt-oss-20b"}
    assert demo.MODEL_PRESETS is presets.MODEL_PRESETS


def test_help_names_the_columns_and_every_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for column in ("T,", "eager_us", "graph_us", "rel_err", "check"):
        assert column in out
    assert "latency_us" not in out
    for model in presets.MODEL_PRESETS:
        assert model in out


def test_tokens_and_error_helpers():
    preset = ModelPreset(num_experts=6, hidden_size=16, inter_size=8, top_k=3)
    x, ids, scales = synthetic.make_tokens(preset, 5, torch.bfloat16, torch.device("cpu"), seed=1)
    assert x.shape == (5, 16) and ids.dtype == torch.int32 and scales.dtype == torch.float32
    assert all(len(set(row)) == 3 for row in ids.tolist())
    torch.testing.assert_close(scales.sum(-1), torch.ones(5))
    w1, w2 = synthetic.make_layer(preset, torch.float32, torch.device("cpu"))
    assert w1.shape == (6, 16, 16) and w2.shape == (6, 16, 8)
    assert demo.relative_l2_error(torch.ones(3), torch.ones(3)) == 0.0
    assert demo.relative_l2_error(torch.zeros(0), torch.zeros(0)) == 0.0
    assert demo.relative_l2_error(torch.tensor([1.1]), torch.tensor([1.0])) == pytest.approx(0.1)


def test_random_expert_weights():
    cpu = torch.device("cpu")
    w1, w2 = synthetic.random_expert_weights(4, 256, 128, 128, torch.float32, cpu, seed=3)
    assert w1.shape == (4, 128, 256) and w2.shape == (4, 256, 128)
    assert w1.dtype == w2.dtype == torch.float32
    # randn scaled by 1/sqrt(fan_in): rows have unit norm on average
    assert w1.pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=0.05)
    assert w2.pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=0.05)
    again = synthetic.random_expert_weights(4, 256, 128, 128, torch.float32, cpu, seed=3)
    assert torch.equal(again[0], w1) and torch.equal(again[1], w2)
    other = synthetic.random_expert_weights(4, 256, 128, 128, torch.float32, cpu, seed=4)
    assert not torch.equal(other[0], w1)
    layer = synthetic.make_layer(ModelPreset(4, 256, 128, 2), torch.float32, cpu, seed=3)
    gated = synthetic.random_expert_weights(4, 256, 128, 256, torch.float32, cpu, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(layer, gated))


def test_swiglu_clamp():
    cpu = torch.device("cpu")
    assert synthetic.swiglu_clamp(ModelPreset(4, 16, 16, 2), cpu) == {}
    clamp = synthetic.swiglu_clamp(presets.MODEL_PRESETS["gpt-oss-20b"], cpu)
    assert list(clamp) == ["swiglu_alpha", "swiglu_beta", "swiglu_limit"]
    assert all(t.shape == (32,) and t.dtype == torch.float32 for t in clamp.values())
    assert clamp["swiglu_limit"][0].item() == 7.0
    partial = synthetic.swiglu_clamp(ModelPreset(2, 16, 16, 1, swiglu_limit=3.0), cpu)
    assert list(partial) == ["swiglu_limit"]


class FakeStream:
    def synchronize(self):
        pass


@pytest.fixture
def cpu_demo(monkeypatch):
    """run_demo's CUDA-only steps made CPU-friendly: the fake extension computes the layer,
    events report 2 us per call and a "graph" replays the call."""
    monkeypatch.setattr(_ext, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    monkeypatch.setattr(validation, "require_cuda", lambda device: None)
    monkeypatch.setattr(FakeEvent, "elapsed_ms", 2e-3)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(timing, "capture_graph",
                        lambda fn, pool=None: type("Graph", (), {"replay": staticmethod(fn)})())
    with _ext._replaced_extension(make_fake_extension()):
        yield


@pytest.mark.parametrize("clamped", [False, True])
def test_run_demo_on_cpu(cpu_demo, monkeypatch, clamped):
    clamp = {"swiglu_alpha": 1.702, "swiglu_beta": 1.0, "swiglu_limit": 0.05} if clamped else {}
    monkeypatch.setitem(presets.MODEL_PRESETS, "tiny", ModelPreset(4, 32, 16, 2, **clamp))
    rows = demo.run_demo("tiny", "bf16", [0, 3], repeats=2, device=torch.device("cpu"))
    assert [r[0] for r in rows] == [0, 3]
    (_, eager0, graph0, _, _), (_, eager, graph, rel_err, passed) = rows
    assert eager0 == pytest.approx(2.0) and math.isnan(graph0)  # no tokens, no graph
    assert eager == pytest.approx(2.0) and graph == pytest.approx(2.0)
    # the clamp (a limit far below the activations' scale) reaches the op and the reference
    assert passed and rel_err <= demo.REL_ERR_THRESHOLD[torch.bfloat16]
