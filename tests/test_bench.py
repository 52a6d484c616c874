"""The benchmark engine (``cutlass_moe.bench``) on the CPU: bytes/FLOPs/floor arithmetic, rows,
routing statistics (``cutlass_moe.synthetic``), the peers' math against ``reference_moe``, stage
mapping, timing with fake events (``cutlass_moe.timing``), the writers and the entry points. The
GPU run itself is exercised by test_cli's GPU-marked bench tests."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cutlass_moe
from _fake_ext import make_fake_extension, tactic_descriptors
from _helpers import FakeEvent
from cutlass_moe import _ext, bench, cli, synthetic, tactics, timing
from cutlass_moe.activation import ActivationType
from cutlass_moe.presets import MODEL_PRESETS, ModelPreset
from cutlass_moe.reference import reference_moe

QWEN3 = MODEL_PRESETS["qwen3-30b-a3b"]
MIXTRAL = MODEL_PRESETS["mixtral-8x7b"]
CEILINGS = bench.Ceilings("bf16", 3.0, 700.0, 600.0, "g2_big", 50 * 2**20, "FakeGPU")


# ------------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------------


def test_expert_weight_bytes():
    h, i = 2048, 768
    assert bench.expert_weight_bytes(QWEN3, "16bit", 2) == 3 * h * i * 2
    # int8: a byte per weight plus per-channel scales of fc1 [2I] and fc2 [H], 2 bytes each
    assert bench.expert_weight_bytes(QWEN3, "int8", 2) == 3 * h * i + (2 * i + h) * 2
    # int4: half a byte per weight plus group-wise scales [H/G, 2I] and [I/G, H], 2 bytes each
    # (twice that with zero points)
    groups = (2 * i * h + h * i) // 128
    assert bench.expert_weight_bytes(QWEN3, "int4", 2) == 3 * h * i // 2 + groups * 2
    assert bench.expert_weight_bytes(QWEN3, "int4", 2, 128, asymmetric=True) == (
        3 * h * i // 2 + groups * 4)
    assert bench.expert_weight_bytes(QWEN3, "int4", 2, group_size=32) == (
        3 * h * i // 2 + 3 * h * i // 32 * 2)
    # per-channel on fc2 is not one group size for both GEMMs: H % 768 != 0
    with pytest.raises(ValueError, match="group_size=768 must divide H=2048"):
        bench.expert_weight_bytes(QWEN3, "int4", 2, group_size=768)
    with pytest.raises(ValueError, match="weights"):
        bench.expert_weight_bytes(QWEN3, "int2", 2)


def test_bytes_flops_and_floor():
    t = 16
    touched = 5.5
    nbytes = bench.bytes_touched(MIXTRAL, t, touched, "16bit", 2, 2)
    assert nbytes == touched * 3 * 4096 * 14336 * 2 + t * 4096 * 4
    assert bench.bytes_touched(MIXTRAL, t, 2, "16bit", 2, 4) == (
        2 * 3 * 4096 * 14336 * 2 + t * 4096 * 6)
    assert bench.moe_flops(MIXTRAL, t) == 2.0 * t * 2 * 3 * 4096 * 14336
    gated_free = ModelPreset(4, 64, 32, 2)
    assert bench.moe_flops(gated_free, 1) == 2.0 * 1 * 2 * (64 * 64 + 64 * 32)
    # 3 TB/s: 3e6 bytes per us
    assert bench.memory_floor_us(6e6, 3.0) == pytest.approx(2.0)
    assert math.isnan(bench.memory_floor_us(6e6, math.nan))
    assert math.isnan(bench.ratio(1.0, 0.0)) and math.isnan(bench.ratio(math.inf, 1.0))


def test_rotation_count():
    l2 = 50 * 2**20
    assert bench.rotation_count(8192, l2) == bench.MAX_ROTATE  # tiny sets: the cap
    assert bench.rotation_count(8192 * 2048 * 4, l2) == 2  # 64 MiB sets: at least two
    assert bench.rotation_count(30 * 2**20, l2) == 4  # ceil(100 / 30)
    assert bench.rotation_count(1, l2, requested=3) == 3
    assert bench.rotation_count(0, l2) == bench.MAX_ROTATE


def test_count_touched_experts():
    ids = torch.tensor([[0, 3], [3, 5], [-1, 9]], dtype=torch.int32)
    assert bench.count_touched_experts(ids, 8) == 3  # 0, 3, 5; -1 and 9 route nowhere


def test_make_row_fields():
    row = bench.make_row("mixtral-8x7b", MIXTRAL, "bf16", "bf16", 16, bench.IMPL_TUNED, True,
                         1000.0, 8.0, CEILINGS, tactic1="a", tactic2="b", source="cache")
    nbytes = bench.bytes_touched(MIXTRAL, 16, 8.0, "16bit", 2, 2)
    flops = bench.moe_flops(MIXTRAL, 16)
    assert row.bytes_touched == nbytes and row.flops == flops
    assert row.tb_s == pytest.approx(nbytes / 1e-3 / 1e12)
    assert row.tflops == pytest.approx(flops / 1e-3 / 1e12)
    assert row.mem_floor_us == pytest.approx(nbytes / 3e12 * 1e6)
    assert row.mem_fraction == pytest.approx(row.mem_floor_us / 1000.0)
    assert row.compute_fraction == pytest.approx(row.tflops / 600.0)
    assert row.roofline_fraction == max(row.mem_fraction, row.compute_fraction)
    assert (row.tactic1, row.tactic2, row.source, row.graph) == ("a", "b", "cache", True)
    int8 = bench.make_row("mixtral-8x7b", MIXTRAL, "bf16", "int8", 16, bench.IMPL_TUNED, False,
                          1000.0, 8.0, CEILINGS)
    assert int8.bytes_touched == bench.bytes_touched(MIXTRAL, 16, 8.0, "int8", 2, 2)
    assert int8.bytes_touched < 0.6 * row.bytes_touched
    int4 = bench.make_row("mixtral-8x7b", MIXTRAL, "bf16", "int4", 16, bench.IMPL_TUNED, False,
                          1000.0, 8.0, CEILINGS, group_size=64, asymmetric=True)
    assert int4.bytes_touched == bench.bytes_touched(MIXTRAL, 16, 8.0, "int4", 2, 2, 64, True)
    assert int4.tb_s == pytest.approx(int4.bytes_touched / 1e-3 / 1e12)
    assert int4.mem_floor_us == pytest.approx(int4.bytes_touched / 3e12 * 1e6)
    assert 0.25 * row.bytes_touched < int4.bytes_touched < 0.3 * row.bytes_touched
    assert int4.weights == "int4" and int4.flops == row.flops
    no_ceilings = bench.Ceilings("bf16", math.nan, math.nan, math.nan, "", 1)
    failed = bench.make_row("m", MIXTRAL, "bf16", "bf16", 1, "naive", False, math.nan, 2.0,
                            no_ceilings)
    assert math.isnan(failed.roofline_fraction) and math.isnan(failed.tb_s)


def test_int4_layer_is_what_the_call_takes():
    """The benchmark's int4 layer: packed weights and quant_scales for use_w4_group_scaling."""
    preset = ModelPreset(num_experts=4, hidden_size=64, inter_size=32, top_k=2)
    layer = bench._Layer(preset, torch.bfloat16, torch.device("cpu"), "int4", 0, 32, True)
    assert layer.weight_type == "int4" and layer.quant["use_w4_group_scaling"] is True
    assert layer.q1.dtype == torch.uint8 and list(layer.q1.shape) == [4, 64, 32]
    assert list(layer.q2.shape) == [4, 64, 16]
    s1, s2, z1, z2 = layer.quant["quant_scales"]
    assert (list(s1.shape), list(s2.shape)) == ([4, 2, 64], [4, 1, 64])
    assert z1.shape == s1.shape and z2.shape == s2.shape
    symmetric = synthetic.quantize_layer_int4(layer.w1, layer.w2, 32)
    assert symmetric.zeros == (None, None) and len(symmetric.quant_scales) == 2
    assert bench._Layer(preset, torch.bfloat16, torch.device("cpu"), "bf16", 0).q1 is None


# ------------------------------------------------------------------------------------------
# routing and default tactics
# ------------------------------------------------------------------------------------------


def test_make_routing_uniform_and_zipf():
    gen = torch.Generator().manual_seed(0)
    ids, scales = synthetic.make_routing(4096, 16, 4, "uniform", gen)
    assert ids.shape == scales.shape == (4096, 4)
    assert ids.dtype == torch.int32 and scales.dtype == torch.float32
    assert all(len(set(row)) == 4 for row in ids.tolist())
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    torch.testing.assert_close(scales.sum(-1), torch.ones(4096))
    uniform_counts = torch.bincount(ids.flatten().long(), minlength=16).double()
    # uniform: every expert near T*k/E = 1024 rows
    assert (uniform_counts - 1024).abs().max() < 150
    zipf_ids, _ = synthetic.make_routing(4096, 16, 4, "zipf", torch.Generator().manual_seed(0))
    assert all(len(set(row)) == 4 for row in zipf_ids.tolist())
    zipf_counts = torch.bincount(zipf_ids.flatten().long(), minlength=16)
    assert zipf_counts.max() > 1.5 * uniform_counts.max()
    assert zipf_counts.min() < 0.5 * uniform_counts.min()
    again, _ = synthetic.make_routing(4096, 16, 4, "zipf", torch.Generator().manual_seed(0))
    assert torch.equal(again, zipf_ids)
    with pytest.raises(ValueError, match="routing"):
        synthetic.make_routing(4, 16, 4, "skewed", gen)


def test_zipf_touches_fewer_experts_at_small_t():
    def touched(routing: str) -> float:
        gen = torch.Generator().manual_seed(1)
        return sum(bench.count_touched_experts(synthetic.make_routing(8, 128, 8, routing, gen)[0],
                                               128) for _ in range(50)) / 50

    assert touched("zipf") < touched("uniform")


def test_default_tactics_follow_expected_rows(monkeypatch):
    """The benchmark's default rows force ``tactics.default_tactics`` of the call's dtypes."""
    asked = []

    def fake_tactics(a, w, o, gemm, device):
        asked.append((a, w, o))
        return tactic_descriptors(gemm)

    bf16 = (torch.bfloat16,) * 3
    int8 = (torch.bfloat16, torch.int8, torch.bfloat16)
    swiglu = ActivationType.Swiglu
    with _ext._replaced_extension(make_fake_extension()):  # fresh tactic caches
        monkeypatch.setattr(_ext, "tactics", fake_tactics)
        device = torch.device("cuda")
        assert tactics.default_tactics(bf16, swiglu, device, 1, 2, 8) == (
            "fake_g1_m16n128k64_s4", "fake_g2_m16n128k64_s4")
        assert set(asked) == {bf16}
        asked.clear()
        tactics.default_tactics(int8, swiglu, device, 1, 2, 8)
        assert set(asked) == {int8}
        # 8192 tokens * 2 / 8 experts = 2048 rows per expert: the 128x128 tile with 3 stages
        assert tactics.default_tactics(bf16, swiglu, device, 8192, 2, 8) == (
            "fake_g1_m128n128k64_s3", "fake_g2_m128n128k64_s3")


# ------------------------------------------------------------------------------------------
# peers (float32 on the CPU against reference_moe)
# ------------------------------------------------------------------------------------------


def small_layer(preset: ModelPreset, num_tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    e, h, i = preset.num_experts, preset.hidden_size, preset.inter_size
    w1 = torch.randn(e, 2 * i, h, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, i, generator=gen) * i**-0.5
    x = torch.randn(num_tokens, h, generator=gen)
    ids, scales = synthetic.make_routing(num_tokens, e, preset.top_k, "zipf", gen)
    return x, ids, scales, w1, w2


def clamp_tensors(preset: ModelPreset) -> dict[str, torch.Tensor]:
    return {name: torch.full((preset.num_experts,), value)
            for name, value in (("swiglu_alpha", preset.swiglu_alpha),
                                ("swiglu_beta", preset.swiglu_beta),
                                ("swiglu_limit", preset.swiglu_limit)) if value is not None}


PLAIN = ModelPreset(8, 32, 16, 2)
CLAMPED = ModelPreset(6, 32, 16, 3, swiglu_alpha=1.702, swiglu_beta=1.0, swiglu_limit=0.5)


@pytest.mark.parametrize("preset", [PLAIN, CLAMPED])
def test_naive_moe_matches_reference(preset):
    x, ids, scales, w1, w2 = small_layer(preset, 37)
    expected = reference_moe(x, ids, scales, w1, w2, ActivationType.Swiglu,
                             **clamp_tensors(preset))
    got = bench.naive_moe(x, ids, scales, w1, w2, bench.swiglu_fn(preset))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def fake_grouped_mm(a, b, offs=None):
    """torch._grouped_mm's 2D x 3D semantics: rows [offs[g-1], offs[g]) times b[g]."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype)
    start = 0
    for group, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ b[group]
        start = end
    return out


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("preset", [PLAIN, CLAMPED])
def test_grouped_mm_moe_matches_reference(monkeypatch, preset, align):
    monkeypatch.setattr(torch, "_grouped_mm", fake_grouped_mm, raising=False)
    x, ids, scales, w1, w2 = small_layer(preset, 29, seed=3)
    expected = reference_moe(x, ids, scales, w1, w2, ActivationType.Swiglu,
                             **clamp_tensors(preset))
    got = bench.grouped_mm_moe(x, ids, scales, w1.transpose(1, 2), w2.transpose(1, 2),
                               bench.swiglu_fn(preset), align=align)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_availability(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not bench.grouped_mm_available()
    monkeypatch.setattr(torch, "_grouped_mm", fake_grouped_mm, raising=False)
    assert bench.grouped_mm_available()


# ------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------

GEMM = ("void cutlass::Kernel<cutlass::gemm::kernel::GemmGrouped<cutlass::gemm::threadblock::"
        "MmaMultistage<...>, cutlass::epilogue::threadblock::Epilogue<...> > >(Params)")
GEMM_INT8 = "void cutlass::Kernel<cutlass_moe::Sm80GroupedGemmColumnScaledKernel<...> >(Params)"


def test_kernel_stage_names():
    assert bench.kernel_stage(GEMM) == "gemm"
    assert bench.kernel_stage(GEMM_INT8) == "gemm"
    assert bench.kernel_stage("_ZN7cutlass6KernelINS_4gemm6kernel11GemmGroupedE") == "gemm"
    assert bench.kernel_stage(
        "void cutlass_moe::grouped_gemm::grouped_kernel<cutlass_moe::grouped_gemm::"
        "Sm80GroupedGemmGatedKernel<...>>(...)") == "gemm"
    for name, stage in [
        ("void cutlass_moe::(anonymous namespace)::count_chunk_experts_kernel(int const*)",
         "routing"),
        ("void cutlass_moe::scan_chunk_counts_kernel(int*, long, int, long*)", "routing"),
        ("void cutlass_moe::scatter_ranks_kernel<true>(int const*, long)", "routing"),
        ("void cutlass_moe::gather_rows_kernel<uint4>(uint4 const*, int const*)", "gather"),
        ("cutlass_moe::write_gemm_args_kernel(long const*, int)", "gemm_args"),
        ("void cutlass_moe::activation_kernel<cutlass::bfloat16_t, (Activation)1, 8>(...)",
         "activation"),
        ("void cutlass_moe::finalize_kernel<cutlass::bfloat16_t, float, 8, 2>(...)", "finalize"),
    ]:
        assert bench.kernel_stage(name) == stage, name
    assert bench.kernel_stage("void at::native::reduce_kernel<512, 1>(...)") is None
    assert bench.kernel_stage("Memset (Device)") is None


def test_assign_stages_splits_calls_and_gemms():
    flush = ("void at::native::reduce_kernel<512, 1>(...)", 40.0)
    call = [("count_chunk_experts_kernel", 2.0), ("scan_chunk_counts_kernel", 1.0),
            ("scatter_ranks_kernel<false>", 3.0), ("gather_rows_kernel<uint4>", 4.0),
            ("write_gemm_args_kernel", 1.0), (GEMM, 50.0),
            ("activation_kernel<bf16>", 5.0), ("Memset (Device)", 0.5), (GEMM, 30.0),
            ("finalize_kernel<bf16>", 6.0)]
    fused = [("scatter_ranks_kernel<true>", 2.0), ("gather_rows_kernel<uint4>", 4.0),
             ("write_gemm_args_kernel", 1.0), (GEMM, 40.0), (GEMM, 20.0),
             ("finalize_kernel<bf16>", 6.0)]  # no activation kernel (fused / identity)
    totals, calls = bench.assign_stages([flush, *call, flush, *call, flush, *fused, flush])
    assert calls == 3
    assert totals["routing"] == (2 * 6.0 + 2.0, 7)
    assert totals["gather"] == (12.0, 3)
    assert totals["gemm_args"] == (3.0, 3)
    assert totals["gemm1"] == (140.0, 3)
    assert totals["gemm2"] == (80.0, 3)
    assert totals["activation"] == (10.0, 2)
    assert totals["finalize"] == (18.0, 3)
    assert totals["other"] == (1.0, 2)  # the memsets inside calls; flushes are outside

    rows = bench.stage_rows(totals, calls, preset="m", dtype="bf16", weights="bf16",
                            num_tokens=8, impl=bench.IMPL_TUNED)
    by_stage = {r.stage: r for r in rows}
    assert list(by_stage) == list(bench.STAGES)  # launch order, all present here
    assert by_stage["gemm1"].us_per_call == pytest.approx(140.0 / 3)
    assert by_stage["routing"].launches_per_call == pytest.approx(7 / 3)
    assert sum(r.fraction for r in rows) == pytest.approx(1.0)
    assert bench.stage_rows(totals, 0, preset="m", dtype="bf16", weights="bf16",
                            num_tokens=8, impl="x") == []


def test_stage_table():
    totals, calls = bench.assign_stages([("scatter_ranks_kernel", 2.0), (GEMM, 10.0),
                                         (GEMM, 8.0), ("finalize_kernel", 1.0)])
    rows = bench.stage_rows(totals, calls, preset="m", dtype="bf16", weights="bf16",
                            num_tokens=8, impl=bench.IMPL_TUNED)
    text = bench.format_stage_table(rows)
    header, _, line = text.splitlines()
    assert header.split()[:4] == ["model", "T", "impl", "routing_us"]
    assert line.split() == ["m", "8", "cutlass_moe_tuned", "2.0", "-", "-", "10.0", "-", "8.0",
                            "1.0", "-", "21.0", "4"]


# ------------------------------------------------------------------------------------------
# timing (fake CUDA events)
# ------------------------------------------------------------------------------------------


class FakeStream:
    """``torch.cuda.current_stream()`` for the CPU: synchronising is logged."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.log = log

    def synchronize(self) -> None:
        if self.log is not None:
            self.log.append("sync")


def test_time_us_rotates_flushes_and_takes_the_median(monkeypatch):
    log = []
    durations = iter([5.0, 1.0, 3.0, 2.0, 4.0])

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            log.append("event")

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(durations) / 1e3  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream(log))
    fns = [lambda i=i: log.append(f"set{i}") for i in range(3)]
    latency = timing.time_us(fns, warmup=2, repeats=5, flush=lambda: log.append("flush"))
    assert latency == pytest.approx(3.0)
    assert log[:2] == ["set0", "set1"]  # warm-up
    assert log[2:7] == ["flush", "sync", "event", "set0", "event"]
    assert [entry for entry in log[2:] if entry.startswith("set")] == [
        "set0", "set1", "set2", "set0", "set1"]
    assert log.count("flush") == 5


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------


def rows_and_result():
    rows = [bench.make_row("qwen3-30b-a3b", QWEN3, "bf16", "bf16", t, impl, impl.startswith(
        "cutlass"), lat, min(128.0, 8.0 * t), CEILINGS, **extra)
        for t, impl, lat, extra in [
            (1, bench.IMPL_TUNED, 40.0, {"tactic1": "g1", "tactic2": "g2", "source": "cache"}),
            (8, bench.IMPL_TUNED, 90.0, {"tactic1": "g1", "tactic2": "g2", "source": "cache"}),
            (1, "naive", 900.0, {"note": "16-bit weights"}),
            (8, "naive", math.nan, {})]]
    stages = bench.stage_rows({"routing": (3.0, 3), "gemm1": (20.0, 1)}, 1,
                              preset="qwen3-30b-a3b", dtype="bf16", weights="bf16",
                              num_tokens=1, impl=bench.IMPL_TUNED)
    return rows, bench.BenchResult(CEILINGS, rows, stages, ["a note"])


def test_format_bench_table():
    rows, _ = rows_and_result()
    lines = bench.format_bench_table(rows).splitlines()
    assert lines[0].split()[:11] == ["model", "T", "impl", "graph", "latency_us", "TB/s",
                                     "TFLOP/s", "floor_us", "mem", "compute", "roofline"]
    assert lines[2].split()[:5] == ["qwen3-30b-a3b", "1", "cutlass_moe_tuned", "yes", "40.0"]
    assert "g1 / g2 (cache)" in lines[2]
    assert lines[5].split()[4:11] == ["-", "-", "-", lines[5].split()[7], "-", "-", "-"]
    assert lines[4].rstrip().endswith("16-bit weights")


def test_format_ceilings():
    text = bench.format_ceilings(CEILINGS)
    assert text == ("ceilings on FakeGPU: copy 3.00 TB/s, CUTLASS Sm80 bf16 GEMM 600.0 TFLOP/s "
                    "(g2_big) (compute fraction), cuBLAS 700.0 TFLOP/s (for reference), L2 "
                    "50 MiB")


def test_write_json(tmp_path):
    _, result = rows_and_result()
    written = bench.write_bench_rows(tmp_path / "sub" / "r.json", result, {"routing": "zipf"})
    assert written == [tmp_path / "sub" / "r.json"]
    document = json.loads(written[0].read_text())
    assert document["config"] == {"routing": "zipf"}
    assert document["ceilings"]["copy_tb_s"] == 3.0
    assert [r["impl"] for r in document["rows"]] == [
        "cutlass_moe_tuned", "cutlass_moe_tuned", "naive", "naive"]
    assert document["rows"][3]["latency_us"] is None  # nan -> null
    assert [s["stage"] for s in document["stages"]] == ["routing", "gemm1"]
    assert document["notes"] == ["a note"]


def test_write_csv(tmp_path):
    rows, result = rows_and_result()
    config = {"models": ["qwen3-30b-a3b"], "routing": "uniform", "graph": True,
              "dtype": "bf16"}
    written = bench.write_bench_rows(tmp_path / "r.csv", result, config)
    assert written == [tmp_path / "r.csv", tmp_path / "r.stages.csv"]
    with open(written[0], newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4
    assert lines[0]["preset"] == "qwen3-30b-a3b" and lines[0]["impl"] == "cutlass_moe_tuned"
    assert float(lines[0]["mem_fraction"]) == pytest.approx(rows[0].mem_fraction)
    assert lines[0]["routing"] == "uniform" and lines[0]["graph"] == "True"
    assert lines[0]["copy_tb_s"] == "3.0" and lines[0]["device"] == "FakeGPU"
    assert "models" not in lines[0]  # lists stay in the JSON only
    with open(written[1], newline="") as f:
        assert [r["stage"] for r in csv.DictReader(f)] == ["routing", "gemm1"]
    result.stages = []
    assert bench.write_bench_rows(tmp_path / "s.csv", result, config) == [tmp_path / "s.csv"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows, _ = rows_and_result()
    path = tmp_path / "p.png"
    bench.plot_bench_rows(path, rows, CEILINGS, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_json():
    config = bench.BenchConfig(models=[("qwen3-30b-a3b", QWEN3)], peers=("naive",), rotate=None)
    data = config.to_json()
    assert data["models"] == ["qwen3-30b-a3b"] and data["rotate"] == "auto"
    assert data["peers"] == ["naive"] and data["tokens"] == list(bench.DEFAULT_BENCH_TOKENS)
    json.dumps(data)


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------


TOOL_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_moe.py"


def test_tool_script_runs_the_bench_command(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [str(TOOL_SCRIPT), "--model", "all"])
    spec = importlib.util.spec_from_file_location("bench_moe_tool", TOOL_SCRIPT)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main() == 0
    assert seen == [["bench", "--model", "all"]]


def test_tool_script_help():
    script = TOOL_SCRIPT
    env = dict(os.environ)
    package_root = str(Path(cutlass_moe.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, str(script), "--help"], env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cutlass-moe bench")
    assert "--peers" in result.stdout


# ------------------------------------------------------------------------------------------
# the whole driver on the CPU (fake extension, fake events)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_run(monkeypatch):
    """run_bench's CUDA-only steps made CPU-friendly: the fake extension computes the layer,
    events report 1 us per call."""
    import contextlib

    from _fake_ext import FakeMoeRunner, make_fake_extension
    from cutlass_moe import autotuner, validation

    monkeypatch.setattr(_ext, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    monkeypatch.setattr(validation, "require_cuda", lambda device: None)
    monkeypatch.setattr(autotuner, "device_id", lambda device=None: "FakeGPU/1")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(FakeEvent, "elapsed_ms", 1e-3)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch, "_grouped_mm", fake_grouped_mm, raising=False)
    FakeMoeRunner.constructed.clear()
    with _ext._replaced_extension(make_fake_extension()):
        yield


def test_measure_ceilings_profiles_the_candidate_tactics(cpu_run, monkeypatch):
    """The Sm80 rate is the best GEMM2 candidate of tactics.candidates for one expert of
    T=n rows (split-K tactics only serve a few rows: not at n=256)."""
    from cutlass_moe import autotuner

    calls = []

    def profile_gemm(runner, gemm, names, shape, bucket, activation, weights, device,
                     scales=None):
        calls.append((gemm, list(names), shape, bucket, activation, tuple(weights.shape)))
        return [autotuner.ProfileResult(name, 10.0 + index) for index, name in enumerate(names)]

    monkeypatch.setattr(autotuner, "profile_gemm", profile_gemm)
    monkeypatch.setattr(timing, "time_us", lambda fns, warmup, repeats, flush=None: 2.0)
    device = torch.device("cpu")
    ceilings = bench.measure_ceilings(torch.bfloat16, device, repeats=1, copy_bytes=1 << 10,
                                      gemm_size=256)
    ((gemm, names, shape, bucket, activation, weight_shape),) = calls
    dtypes = (torch.bfloat16,) * 3
    assert names == tactics.candidate_names(dtypes, 2, ActivationType.Swiglu, device, 256)
    assert not any("splitk" in name for name in names) and names
    assert (gemm, bucket, activation, weight_shape) == (2, 256, ActivationType.Swiglu,
                                                         (1, 256, 256))
    assert (shape.num_experts, shape.hidden_size, shape.inter_size, shape.top_k,
            shape.activation, shape.ep_size) == (1, 256, 256, 1, "Swiglu", 1)
    assert ceilings.sm80_tactic == names[0]
    assert ceilings.sm80_tflops == pytest.approx(2.0 * 256**3 / 10.0 / 1e6)
    assert ceilings.copy_tb_s == pytest.approx(2 * 1024 / 2.0 / 1e6)
    assert ceilings.notes == []


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_run_bench_on_cpu(cpu_run, weights):
    tiny = ModelPreset(4, 32, 16, 2, swiglu_alpha=1.702, swiglu_beta=1.0, swiglu_limit=7.0)
    config = bench.BenchConfig(models=[("tiny", tiny)], weights=weights, tokens=[1, 3],
                               tactics="both", warmup=1, repeats=3, device=torch.device("cpu"),
                               rotate=2)
    result = bench.run_bench(config, ceilings=CEILINGS)
    impls = [(r.num_tokens, r.impl) for r in result.rows]
    assert impls == [(t, impl) for t in (1, 3) for impl in bench.IMPLS]
    for row in result.rows:
        assert row.latency_us == pytest.approx(1.0) and not row.graph
        assert row.weights == (weights if row.impl.startswith("cutlass") else "bf16")
        assert 1 <= row.experts_touched <= min(4, 2 * row.num_tokens)
        assert math.isfinite(row.roofline_fraction)
    forced = [r for r in result.rows if r.impl == bench.IMPL_DEFAULT]
    assert all(r.tactic1.startswith("fake_g1_") and r.tactic2.startswith("fake_g2_")
               and r.source == "default" for r in forced)
    dtypes = (torch.bfloat16, torch.int8 if weights == "int8" else torch.bfloat16, torch.bfloat16)
    assert [(r.tactic1, r.tactic2) for r in forced] == [
        tactics.default_tactics(dtypes, ActivationType.Swiglu, torch.device("cpu"), t, 2, 4)
        for t in (1, 3)]
    # every call goes through the AutoTuner; with an empty cache (and no tuning of host-memory
    # calls) the tuned rows ran, and name, the same heuristic defaults as the forced rows
    tuned = [r for r in result.rows if r.impl == bench.IMPL_TUNED]
    by_tokens = {r.num_tokens: r for r in forced}
    assert tuned and all(
        (r.tactic1, r.tactic2, r.source)
        == (by_tokens[r.num_tokens].tactic1, by_tokens[r.num_tokens].tactic2, "default")
        for r in tuned)
    assert result.stages == [] and result.notes == []


def test_run_bench_skips_what_it_cannot_run(cpu_run, monkeypatch):
    monkeypatch.setattr(bench, "REFERENCE_MAX_TOKENS", 2)
    monkeypatch.delattr(torch, "_grouped_mm")
    tiny = ModelPreset(4, 32, 16, 2)
    config = bench.BenchConfig(models=[("tiny", tiny)], tokens=[1, 3], warmup=1, repeats=1,
                               device=torch.device("cpu"), peers=("grouped_mm", "reference"))
    result = bench.run_bench(config, ceilings=CEILINGS)
    assert [(r.num_tokens, r.impl) for r in result.rows] == [
        (1, bench.IMPL_TUNED), (1, "reference"), (3, bench.IMPL_TUNED)]
    assert any("has no torch._grouped_mm" in n for n in result.notes)
    assert "tiny T=3: reference skipped (above 2 tokens)" in result.notes
