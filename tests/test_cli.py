"""The ``cutlass-moe`` command line: parsing, errors, info, tune and bench output (CPU).

The extension is a fake (``_fake_ext``) or missing, ``torch.cuda.is_available`` is patched, and
``autotuner.tune_model`` / ``bench.run_bench`` are replaced by fakes; the GPU-marked tests at the
end run the real commands on a tiny shape.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.machinery
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

import cutlass_moe
from _fake_ext import make_fake_extension, tactic_descriptors
from cutlass_moe import (
    _ext,
    autotuner,
    bench,
    cli,
    demo,
    diagnostics,
    presets,
    tables,
    tuning_cache,
)
from cutlass_moe.autotuner import TuneRow

SMALL = ["--experts", "8", "--hidden", "128", "--inter", "256", "--top-k", "2"]


@pytest.fixture
def fake_ext():
    with _ext._replaced_extension(make_fake_extension()):
        yield


@pytest.fixture
def no_ext():
    with _ext._replaced_extension(None):
        yield


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_cache_env(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning_cache.CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ------------------------------------------------------------------------------------------
# presets and help
# ------------------------------------------------------------------------------------------


def test_presets():
    shapes = {name: (p.num_experts, p.hidden_size, p.inter_size, p.top_k)
              for name, p in presets.MODEL_PRESETS.items()}
    assert shapes == {
        "mixtral-8x7b": (8, 4096, 14336, 2),
        "qwen1.5-moe-a2.7b": (60, 2048, 1408, 4),
        "qwen3-30b-a3b": (128, 2048, 768, 8),
        "deepseek-v2-lite": (64, 2048, 1408, 6),
        "gpt-oss-20b": (32, 2880, 2880, 4),
    }
    assert presets.MODEL_PRESETS["gpt-oss-20b"].clamped_swiglu
    assert not any(p.clamped_swiglu for p in presets.CORE_PRESETS.values())
    assert demo.MODEL_PRESETS is presets.MODEL_PRESETS
    assert presets.MODEL_PRESETS["mixtral-8x7b"].describe() == "E=8 H=4096 I=14336 k=2"


def test_python_m_help_in_subprocess():
    env = dict(os.environ)
    package_root = str(Path(cutlass_moe.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-m", "cutlass_moe", "--help"], env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cutlass-moe")
    for command in ("info", "tune", "bench", "examples:"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["info", "tune", "bench"])
def test_subcommand_help(capsys, command):
    status, out, _ = run_cli(capsys, command, "--help")
    assert status == 0
    assert out.startswith(f"usage: cutlass-moe {command}")
    if command != "info":
        for model in presets.MODEL_PRESETS:
            assert model in out
        assert "examples:" in out


def test_bench_help_describes_the_method(capsys):
    _, out, _ = run_cli(capsys, "bench", "--help")
    for words in ("median", "L2", "roofline", "copy bandwidth", "Sm80", "cuBLAS",
                  "torch._grouped_mm", "reference_moe"):
        assert words in out
    for option in ("--tokens", "--tuned", "--default", "--both", "--graph", "--routing",
                   "--out", "--plot", "--weights", "--dtype", "--peers", "--stages", "--rotate",
                   "--no-flush"):
        assert option in out


def test_documents_cited_by_help_and_docstrings_exist(capsys):
    """Help texts, docstrings and comments cite documents (and their sections) of this
    repository only."""
    root = Path(__file__).resolve().parents[1]
    package = root / "python" / "cutlass_moe"
    if not package.is_dir():
        pytest.skip("needs the source tree")
    texts = [run_cli(capsys, *argv)[1] for argv in (["--help"], ["info", "--help"],
                                                     ["tune", "--help"], ["bench", "--help"])]
    texts += [path.read_text() for path in sorted(package.glob("*.py"))]
    text = "\n".join(texts)
    cited = set(re.findall(r"\b((?:docs|tools)/[\w./-]+\.md)\b", text))
    assert "docs/architecture.md" in cited
    assert sorted(c for c in cited if not (root / c).is_file()) == []
    headings = (root / "docs" / "architecture.md").read_text().splitlines()
    sections = set(re.findall(r'docs/architecture\.md,\s*(?:#:?\s*)?"([^"]+)"', text))
    assert "Benchmark" in sections
    assert sorted(s for s in sections if f"## {s}" not in headings) == []


def test_version(capsys):
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0 and out.strip() == f"cutlass-moe {cutlass_moe.__version__}"


def test_no_command_is_an_error(capsys):
    status, _, err = run_cli(capsys)
    assert status == 2 and "COMMAND" in err


def test_unknown_command(capsys):
    status, _, err = run_cli(capsys, "frobnicate")
    assert status == 2 and "invalid choice" in err


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_tune_defaults():
    args = parse("tune", "--model", "mixtral-8x7b")
    assert args.handler is cli._cmd_tune
    assert (args.model, args.dtype, args.weights, args.ep_size, args.max_tokens, args.out,
            args.json, args.verbose, args.quiet) == (
        "mixtral-8x7b", "bf16", None, 1, 8192, None, False, False, False)
    assert args.device == torch.device("cuda")
    assert args.num_experts is None and args.top_k is None


def test_tune_all_options():
    args = parse("tune", *SMALL, "--dtype", "fp16", "--weights", "int4", "--ep-size", "4",
                 "--max-tokens", "1024", "--out", "c.json", "--json", "-v", "--device", "cuda:1")
    assert (args.num_experts, args.hidden_size, args.inter_size, args.top_k) == (8, 128, 256, 2)
    assert (args.dtype, args.weights, args.ep_size, args.max_tokens, args.out) == (
        "fp16", "int4", 4, 1024, "c.json")
    assert args.json and args.verbose and args.device == torch.device("cuda", 1)


def test_bench_defaults_and_options():
    args = parse("bench", "--model", "gpt-oss-20b")
    assert args.handler is cli._cmd_bench
    assert args.model == ["gpt-oss-20b"]
    assert args.tokens == list(bench.DEFAULT_BENCH_TOKENS)
    assert (args.tactics, args.routing, args.graph, args.warmup, args.repeats, args.seed,
            args.out, args.plot, args.cache, args.max_tokens) == (
        "tuned", "uniform", False, 10, 50, 0, None, None, None, 8192)
    assert (args.peers, args.stages, args.rotate, args.no_flush) == (None, False, None, False)
    args = parse("bench", *SMALL, "--tokens", "1, 8,32", "--default", "--routing", "zipf",
                 "--graph", "--warmup", "2", "--repeats", "3", "--seed", "7", "--out", "r.csv",
                 "--plot", "r.png", "--cache", "c.json", "--weights", "bf16", "-q")
    assert args.tokens == [1, 8, 32]
    assert (args.tactics, args.routing, args.graph, args.warmup, args.repeats, args.seed,
            args.out, args.plot, args.cache, args.weights, args.quiet) == (
        "default", "zipf", True, 2, 3, 7, ["r.csv"], "r.png", "c.json", "bf16", True)
    assert parse("bench", "--model", "mixtral-8x7b", "--tuned").tactics == "tuned"
    assert parse("bench", "--model", "mixtral-8x7b", "--both").tactics == "both"
    args = parse("bench", "--model", "mixtral-8x7b,Qwen3-30B-A3B", "--model", "gpt-oss-20b",
                 "--peers", "naive,grouped_mm", "--stages", "--rotate", "4", "--no-flush")
    assert args.model == ["mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b"]
    assert (args.peers, args.stages, args.rotate, args.no_flush) == (
        ["naive", "grouped_mm"], True, 4, True)
    assert parse("bench", "--model", "all").model == list(presets.MODEL_PRESETS)
    assert parse("bench", "--model", "all", "--peers", "none").peers == []
    assert parse("bench", "--model", "all", "--peers", "all").peers == list(bench.PEERS)


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "mixtral-8x7b", "--peers", "hf"], "argument --peers: expected comma-separated"),
    (["--model", "mixtral-8x7b", "--rotate", "0"], "argument --rotate: expected a positive"),
    (["--model", "mixtral-8x7b", "--tuned", "--both"], "not allowed with argument"),
    (["--model", "mixtral-8x7b,llama"], "unknown model 'llama'"),
    (["--model", "all", "--experts", "8"], "mutually exclusive"),
])
def test_bench_usage_errors(capsys, gpu, fake_ext, argv, message):
    status, out, err = run_cli(capsys, "bench", *argv)
    assert status == 2 and out == "" and message in err


def test_info_options():
    args = parse("info", "--json")
    assert args.handler is cli._cmd_info and args.json


def test_argument_types():
    assert cli.positive_int(" 7 ") == 7
    for bad in ("0", "-3", "abc", "1.5", ""):
        with pytest.raises(Exception, match="positive integer"):
            cli.positive_int(bad)
    assert cli.token_counts("1,8,32") == [1, 8, 32]
    for bad in ("", "1,,2", "0", "1,-8", "a"):
        with pytest.raises(Exception, match="comma-separated positive token counts"):
            cli.token_counts(bad)
    assert cli.model_name("Mixtral-8x7B") == "mixtral-8x7b"
    with pytest.raises(Exception, match="did you mean 'qwen3-30b-a3b'"):
        cli.model_name("qwen3-30b")
    with pytest.raises(Exception, match="known: mixtral-8x7b"):
        cli.model_name("llama")
    assert cli.cuda_device("cuda:2") == torch.device("cuda", 2)
    for bad in ("cpu", "gpu7", "cuda:x"):
        with pytest.raises(Exception, match="CUDA device"):
            cli.cuda_device(bad)


# ------------------------------------------------------------------------------------------
# errors (each exits 2 with one clear line, never a traceback)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["tune", "bench"])
@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "mixtral"], "unknown model 'mixtral'"),
    (["--model", "mixtral-8x7b", "--experts", "8"], "mutually exclusive"),
    (["--model", "mixtral-8x7b", *SMALL], "--model and --experts/--hidden/--inter/--top-k"),
    (["--experts", "8", "--hidden", "128"], "missing: --inter, --top-k"),
    ([], "give a layer shape"),
    (["--experts", "0", "--hidden", "128", "--inter", "256", "--top-k", "2"],
     "argument --experts: expected a positive integer, got 0"),
    (["--experts", "8", "--hidden", "12x8", "--inter", "256", "--top-k", "2"],
     "argument --hidden: expected a positive integer, got '12x8'"),
    (["--experts", "8", "--hidden", "128", "--inter", "256", "--top-k", "-1"],
     "argument --top-k: expected a positive integer"),
    (["--experts", "4", "--hidden", "128", "--inter", "256", "--top-k", "5"],
     "--top-k 5 exceeds the number of experts (4)"),
    (["--experts", "8", "--hidden", "100", "--inter", "256", "--top-k", "2"],
     "must be multiples of 8"),
    (["--experts", "3000000000", "--hidden", "128", "--inter", "256", "--top-k", "2"],
     "--experts 3000000000: "),
    (["--model", "mixtral-8x7b", "--max-tokens", "0"], "argument --max-tokens"),
    (["--model", "mixtral-8x7b", "--dtype", "fp32"], "argument --dtype: invalid choice"),
    (["--model", "mixtral-8x7b", "--weights", "nvfp4"], "argument --weights: invalid choice"),
    (["--model", "mixtral-8x7b", "--device", "cpu"], "argument --device"),
])
def test_usage_errors(capsys, gpu, fake_ext, command, argv, message):
    status, out, err = run_cli(capsys, command, *argv)
    assert status == 2
    assert out == ""
    assert f"cutlass-moe {command}: error:" in err and message in err
    assert "usage: cutlass-moe" in err and "Traceback" not in err


@pytest.mark.parametrize("ep_size", ["3", "16"])
def test_ep_size_must_divide_experts(capsys, gpu, fake_ext, ep_size):
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--ep-size", ep_size)
    assert status == 2
    assert f"--ep-size {ep_size} does not divide the 8 experts of mixtral-8x7b" in err


def test_ep_size_not_positive(capsys):
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--ep-size", "0")
    assert status == 2 and "argument --ep-size: expected a positive integer" in err


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_int4_weights_without_int4_kernels(capsys, no_gpu, fake_ext, monkeypatch, command):
    """Checked before the GPU: the message names what this build does support."""
    info = {"extension_available": True, "tactics": {"bf16_bf16": {"gemm1": 2, "gemm2": 2},
                                                     "bf16_int8": {"gemm1": 2, "gemm2": 2}}}
    monkeypatch.setattr(_ext, "build_info", lambda: info)
    status, out, err = run_cli(capsys, command, "--model", "qwen3-30b-a3b", "--weights", "int4")
    assert status == 2 and out == ""
    assert err.startswith("cutlass-moe: error: --weights int4 is not supported by this build: "
                          "it supports --weights bf16 or int8 with --dtype bf16")
    assert "built without int4 weight-only (W4A16) kernels for --dtype bf16" in err


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_int8_weights_without_int8_kernels(capsys, no_gpu, fake_ext, monkeypatch, command):
    info = {"extension_available": True, "tactics": {"bf16_bf16": {"gemm1": 2, "gemm2": 2}}}
    monkeypatch.setattr(_ext, "build_info", lambda: info)
    status, out, err = run_cli(capsys, command, "--model", "qwen3-30b-a3b", "--weights", "int8")
    assert status == 2 and out == ""
    assert err.startswith("cutlass-moe: error: --weights int8 is not supported by this build: "
                          "it supports --weights bf16 with --dtype bf16")
    assert "built without int8 weight-only kernels for --dtype bf16" in err


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_int8_weights_need_multiples_of_16(capsys, gpu, fake_ext, command):
    status, out, err = run_cli(capsys, command, "--experts", "8", "--hidden", "136", "--inter",
                               "256", "--top-k", "2", "--weights", "int8")
    assert status == 2 and out == ""
    assert "--weights int8 needs --hidden (136) and --inter (256) to be multiples of 16" in err


def test_weights_must_match_dtype(capsys, no_gpu, no_ext):
    status, _, err = run_cli(capsys, "tune", "--model", "qwen3-30b-a3b", "--dtype", "fp16",
                             "--weights", "bf16")
    assert status == 2
    assert "--weights bf16 is not supported by this build" in err
    assert "--weights fp16, fp8, int4, int8 or mxfp4 with --dtype fp16" in err
    assert "16-bit weights must have the activation dtype, --dtype" in err


def test_supported_weight_types():
    info = {"extension_available": True,
            "tactics": {"bf16_bf16": {"gemm1": 3}, "fp16_fp16": {"gemm1": 3},
                        "bf16_int8": {"gemm1": 1}}}
    assert cli.supported_weight_types("bf16", info) == ["bf16", "int8"]
    assert cli.supported_weight_types("fp16", info) == ["fp16"]
    info["tactics"]["fp16_int8"] = {"gemm1": 1}
    assert cli.supported_weight_types("fp16", info) == ["fp16", "int8"]
    assert cli.supported_weight_types("fp16", {"extension_available": True,
                                               "tactics": {"bf16_bf16_bf16": {}}}) == []
    assert cli.supported_weight_types("fp16", {"extension_available": False}) == [
        "fp16", "fp8", "int4", "int8", "mxfp4"]
    info["tactics"]["bf16_int4"] = {"gemm1": 1}  # the build's int4 kernels (W4A16)
    assert cli.supported_weight_types("bf16", info) == ["bf16", "int4", "int8"]
    assert cli.supported_weight_types("fp16", info) == ["fp16", "int8"]


def test_no_kernels_for_dtype(capsys, no_gpu, fake_ext):
    # the fake build has bf16 tactics only
    status, _, err = run_cli(capsys, "tune", "--model", "qwen3-30b-a3b", "--dtype", "fp16")
    assert status == 2 and "it has no kernels for --dtype fp16" in err
    assert err.rstrip().endswith("it has no kernels for --dtype fp16")


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_no_gpu(capsys, no_gpu, fake_ext, command):
    status, out, err = run_cli(capsys, command, "--model", "mixtral-8x7b")
    assert status == 2 and out == ""
    assert err.startswith("cutlass-moe: error: no CUDA device is available")
    assert f"`cutlass-moe {command}` needs an NVIDIA GPU" in err
    assert "Traceback" not in err and "usage:" not in err


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_missing_extension(capsys, gpu, no_ext, command):
    status, _, err = run_cli(capsys, command, "--model", "mixtral-8x7b")
    assert status == 2
    assert err.startswith("cutlass-moe: error:") and "cutlass_moe._C" in err


def test_device_index_out_of_range(capsys, gpu, fake_ext, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--device", "cuda:3")
    assert status == 2 and "--device cuda:3 does not exist: 1 CUDA device(s)" in err


def test_tune_out_is_a_directory(capsys, gpu, fake_ext, tmp_path):
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--out", str(tmp_path))
    assert status == 2
    assert err.splitlines()[-1] == (f"cutlass-moe tune: error: --out {tmp_path}: is a "
                                    "directory; give a file name")


def test_tune_out_under_a_regular_file(capsys, gpu, fake_ext, tmp_path, monkeypatch):
    """Refused before any tuning, which would otherwise be lost when saving fails."""
    monkeypatch.setattr(autotuner, "tune_model", lambda *a, **k: pytest.fail("tuned"))
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    out = blocker / "sub" / "cache.json"
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--out", str(out))
    assert status == 2
    assert err.splitlines()[-1] == (f"cutlass-moe tune: error: --out {out}: {blocker} is not "
                                    "a directory")


def test_bench_out_suffix(capsys, gpu, fake_ext):
    status, _, err = run_cli(capsys, "bench", "--model", "mixtral-8x7b", "--out", "rows.txt")
    assert status == 2 and "must end in .csv or .json" in err


def test_bench_plot_needs_matplotlib(capsys, gpu, fake_ext, monkeypatch):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    status, _, err = run_cli(capsys, "bench", "--model", "mixtral-8x7b", "--plot", "p.png")
    assert status == 2 and "--plot needs matplotlib" in err


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------


def fake_properties(name="NVIDIA H100 80GB HBM3", major=9, minor=0, sms=132, gib=80):
    return types.SimpleNamespace(name=name, major=major, minor=minor,
                                 multi_processor_count=sms, total_memory=gib * 2**30)


def test_info_without_gpu(capsys, no_gpu, fake_ext, no_cache_env):
    status, out, err = run_cli(capsys, "info")
    assert status == 0 and err == ""
    assert out.startswith(f"cutlass-moe {cutlass_moe.__version__}\n")
    assert "extension:       cutlass_moe._C 0.0.0-fake" in out
    assert "CUTLASS:         4.2.0" in out
    assert "CUDA toolkit:    13.0" in out
    assert "compiled archs:  sm_80, sm_86, sm_89, sm_90" in out
    assert "fast build:      yes" in out
    assert any(line.split() == ["bf16_bf16_bf16", "23", "23"] for line in out.splitlines())
    assert "GPU:             none (no CUDA device is available)" in out
    assert "$CUTLASS_MOE_TUNING_CACHE is not set" in out


def test_info_without_extension(capsys, no_gpu, no_ext):
    status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert "extension:       NOT AVAILABLE: cutlass_moe._C is not built (test)" in out
    assert "CUTLASS:" not in out
    assert "no CUDA device is available" in out


def test_info_with_gpus(capsys, gpu, fake_ext, monkeypatch, tmp_path):
    props = [fake_properties(), fake_properties("NVIDIA L4", 8, 9, 58, 22),
             fake_properties("NVIDIA B200", 10, 0, 148, 179)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    cache = tmp_path / "tc.json"
    cache.write_text("{}")
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(cache))
    status, out, err = run_cli(capsys, "info")
    assert status == 0 and err == ""
    assert ("GPU 0:           NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 80.0 GiB, kernels for it: "
            "yes") in out
    assert "GPU 1:           NVIDIA L4, sm_89, 58 SMs, 22.0 GiB, kernels for it: yes" in out
    assert "GPU 2:           NVIDIA B200, sm_100, 148 SMs, 179.0 GiB, kernels for it: no" in out
    assert (f"tuning cache:    $CUTLASS_MOE_TUNING_CACHE={cache} (UNUSABLE, ignored: is not a "
            "cutlass_moe tuning cache)") in out


def test_info_json(capsys, gpu, fake_ext, monkeypatch, no_cache_env):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: fake_properties("NVIDIA A10", 8, 6, 72, 22))
    status, out, _ = run_cli(capsys, "info", "--json")
    assert status == 0
    info = json.loads(out)
    assert info["extension_available"] is True and info["cutlass_version"] == "4.2.0"
    assert info["tactics"] == {"bf16_bf16_bf16": {"gemm1": 23, "gemm2": 23},
                               "bf16_int8_bf16": {"gemm1": 23, "gemm2": 23},
                               "bf16_int4_bf16": {"gemm1": 10, "gemm2": 9},
                               "bf16_fp8_bf16": {"gemm1": 8, "gemm2": 8},
                               "bf16_mxfp4_bf16": {"gemm1": 8, "gemm2": 8}}
    assert info["gpus"] == [{"index": 0, "name": "NVIDIA A10", "capability": "8.6",
                             "multiprocessors": 72, "memory_gib": 22.0, "kernels": "yes"}]
    assert info["tuning_cache"] == {"env": tuning_cache.CACHE_ENV, "path": None, "exists": False,
                                    "status": "unset"}


# What `info` says about the file $CUTLASS_MOE_TUNING_CACHE names: it reads it as a serving
# process would, so a corrupt or stale file is reported, not shown as merely existing.

GOOD_KEY = tuning_cache.TuningKey(
    1, tuning_cache.ShapeKey("bf16_bf16_bf16", "none", 8, 256, 128, 2, "Swiglu", 1),
    "NVIDIA H100 80GB HBM3/132", 16)


def _cache_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("  tuning cache:"))


def test_info_reads_the_tuning_cache(capsys, no_gpu, fake_ext, monkeypatch, tmp_path):
    cache = tmp_path / "tc.json"
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(cache))
    assert _cache_line(run_cli(capsys, "info")[1]).endswith(
        f"={cache} (does not exist yet; the first save creates it)")

    tuning_cache.write_cache(cache, {GOOD_KEY: ("fake_g1_m16n128k64_s2", 3.0)})
    status, out, err = run_cli(capsys, "info")
    assert status == 0 and err == ""
    assert _cache_line(out).endswith(f"={cache} (usable: 1 entry)")

    second = dataclasses.replace(GOOD_KEY, bucket=32)
    tuning_cache.write_cache(cache, {second: ("a_tactic_this_build_lacks", 4.0)})
    assert _cache_line(run_cli(capsys, "info")[1]).endswith(
        f"={cache} (usable: 1 entry; 1 entry is malformed or names a tactic this build does "
        "not have; dropped)")

    status, out, _ = run_cli(capsys, "info", "--json")
    assert json.loads(out)["tuning_cache"] == {
        "env": tuning_cache.CACHE_ENV, "path": str(cache), "exists": True, "status": "usable",
        "entries": 1,
        "problem": "1 entry is malformed or names a tactic this build does not have; dropped"}


@pytest.mark.parametrize("content,problem", [
    (b"{not json", ("is unreadable (Expecting property name enclosed in double quotes: line 1 "
                    "column 2 (char 1))")),
    (b"\xff\xfe", "is unreadable (not UTF-8 text)"),
    (b"[]", "is not a cutlass_moe tuning cache"),
    (json.dumps({"schema": "cutlass_moe.tuning_cache", "version": 1,
                 "build_id": "0.0.1+cutlass3+cuda11", "devices": {}}).encode(),
     "was written by build '0.0.1+cutlass3+cuda11', this is"),
])
def test_info_reports_an_unusable_tuning_cache(capsys, no_gpu, fake_ext, monkeypatch, tmp_path,
                                               content, problem):
    cache = tmp_path / "tc.json"
    cache.write_bytes(content)
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(cache))
    status, out, err = run_cli(capsys, "info")
    assert status == 0 and err == ""  # the problem is part of the report, not a warning
    assert f"={cache} (UNUSABLE, ignored: {problem}" in _cache_line(out)
    status, out, _ = run_cli(capsys, "info", "--json")
    report = json.loads(out)["tuning_cache"]
    assert report["status"] == "unusable" and report["problem"].startswith(problem)


def test_info_tuning_cache_that_is_a_directory(capsys, no_gpu, fake_ext, monkeypatch, tmp_path):
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(tmp_path))
    assert _cache_line(run_cli(capsys, "info")[1]).endswith(
        f"={tmp_path} (UNUSABLE, ignored: is unreadable (it is a directory))")


def test_info_tuning_cache_without_extension(capsys, no_gpu, no_ext, monkeypatch, tmp_path):
    cache = tmp_path / "tc.json"
    cache.write_text("{}")
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(cache))
    assert _cache_line(run_cli(capsys, "info")[1]).endswith(
        f"={cache} (exists; not checked without the compiled extension)")


def test_arch_support():
    assert diagnostics.arch_support(9, 0, ["80", "90"]) == "yes"
    assert diagnostics.arch_support(8, 9, ["80", "86"]) == "yes (sm_86 code)"
    assert diagnostics.arch_support(8, 9, [80]) == "yes (sm_80 code)"
    assert diagnostics.arch_support(9, 0, ["90a"]) == "yes"
    assert diagnostics.arch_support(8, 0, ["86", "90"]) == "no"
    assert diagnostics.arch_support(10, 0, ["80", "90"]) == "no"
    assert diagnostics.arch_support(9, 0, []) == "no"


def test_arch_support_with_ptx():
    assert diagnostics.arch_support(10, 0, ["80", "90"], ["90"]) == "yes (JIT from compute_90 PTX)"
    assert diagnostics.arch_support(12, 0, ["80"], ["80", "90"]) == "yes (JIT from compute_90 PTX)"
    assert diagnostics.arch_support(9, 0, ["80", "90"], ["90"]) == "yes"  # SASS wins
    assert diagnostics.arch_support(8, 9, ["80", "86"], ["90"]) == "yes (sm_86 code)"
    assert diagnostics.arch_support(8, 0, ["86"], ["90"]) == "no"  # PTX of a newer arch never fits


def test_cuda_version_text():
    assert diagnostics.cuda_version_text(12080) == "12.8"
    assert diagnostics.cuda_version_text(12040) == "12.4"
    assert diagnostics.cuda_version_text(13000) == "13.0"
    assert diagnostics.cuda_version_text(12020) == "12.2"


@pytest.mark.parametrize("driver, runtime, kwargs, status, words", [
    (12080, 12080, {}, "ok", ["supports CUDA 12.8", "new enough for this CUDA 12.8 build"]),
    (12090, 12040, {"needs_jit": True}, "ok", ["supports CUDA 12.9"]),
    (13000, 12080, {"needs_jit": True}, "ok", ["supports CUDA 13.0"]),
    (12020, 12080, {}, "minor-compat", ["supports CUDA 12.2", "minor-version compatibility"]),
    (12020, 12080, {"has_ptx": True}, "minor-compat",
     ["minor-version compatibility; PTX JIT for newer GPUs needs a driver >= 12.8"]),
    (12020, 12080, {"has_ptx": True, "needs_jit": True}, "too-old",
     ["driver supports CUDA 12.2 but this wheel was built with CUDA 12.8",
      "only a driver >= 12.8 can JIT-compile", "supports CUDA >= 12.8"]),
    (12080, 13000, {}, "too-old",
     ["driver supports CUDA 12.8 but this wheel was built with CUDA 13.0",
      "update the NVIDIA driver to one that supports CUDA >= 13.0",
      "or install cutlass-moe-cu12 instead"]),
    (11080, 12040, {}, "too-old", [("driver supports CUDA 11.8 but this wheel was built with "
                                    "CUDA 12.4: update the NVIDIA driver to one that supports "
                                    "CUDA >= 12.0")]),
    (0, 12080, {}, "no-driver",
     ["none found", "needs an NVIDIA driver that supports CUDA >= 12.0"]),
    (None, 13000, {}, "unknown", ["unknown (could not ask the driver;", "CUDA >= 13.0"]),
    (None, 13000, {"unknown_reason": "boom"}, "unknown", ["unknown (boom;"]),
])
def test_check_driver(driver, runtime, kwargs, status, words):
    check = diagnostics.check_driver(driver, runtime, **kwargs)
    assert check.status == status
    for text in words:
        assert text in check.message
    if driver and driver // 1000 < 12:
        assert "cutlass-moe-cu" not in check.message  # no cu11 wheel to suggest


def fake_ext_with_driver(driver, **build):
    """A fake extension whose build_info has ``build`` and whose driver reports ``driver``
    (an int, or an exception to raise; ``...`` = a build without driver_cuda_version)."""
    module = make_fake_extension()
    base = module.build_info()
    module.build_info = lambda: {**base, **build}
    if driver is not ...:
        def driver_cuda_version():
            if isinstance(driver, Exception):
                raise driver
            return driver
        module.driver_cuda_version = driver_cuda_version
    return _ext._replaced_extension(module)


CU128_PTX = {"cuda_version": "12.8", "cuda_runtime_version": 12080, "ptx_archs": ["90"]}


def test_info_driver_new_enough(capsys, no_gpu, no_cache_env):
    with fake_ext_with_driver(12090, **CU128_PTX):
        status, out, err = run_cli(capsys, "info")
    assert status == 0 and err == ""
    assert "CUDA toolkit:    12.8 (runtime linked statically)" in out
    assert "PTX:             compute_90 (JIT-compiled by the driver for newer GPUs)" in out
    assert "driver:          supports CUDA 12.9 (new enough for this CUDA 12.8 build)" in out


def test_info_driver_minor_compat_and_jit(capsys, gpu, monkeypatch, no_cache_env):
    props = [fake_properties("NVIDIA A100", 8, 0, 108, 80)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    with fake_ext_with_driver(12020, **CU128_PTX):
        status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert ("driver:          supports CUDA 12.2: runs this CUDA 12.8 build through "
            "minor-version compatibility; PTX JIT for newer GPUs needs a driver >= 12.8") in out
    # a GPU with no SASS in the build runs the PTX: the same driver is now too old
    props.append(fake_properties("NVIDIA B200", 10, 0, 148, 179))
    with fake_ext_with_driver(12020, **CU128_PTX):
        status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert "NVIDIA B200, sm_100, 148 SMs, 179.0 GiB, kernels for it: yes (JIT from compute_90 " \
           "PTX)" in out
    assert ("driver:          TOO OLD: driver supports CUDA 12.2 but this wheel was built with "
            "CUDA 12.8") in out


def test_info_driver_too_old_major(capsys, no_gpu, no_cache_env):
    with fake_ext_with_driver(12080, cuda_version="13.0", cuda_runtime_version=13000):
        status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert ("driver:          TOO OLD: driver supports CUDA 12.8 but this wheel was built with "
            "CUDA 13.0: update the NVIDIA driver to one that supports CUDA >= 13.0, or install "
            "cutlass-moe-cu12 instead") in out
    assert "PTX:             none" in out


def test_info_without_driver(capsys, no_gpu, no_cache_env):
    with fake_ext_with_driver(0, **CU128_PTX):
        status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert ("driver:          none found (running this CUDA 12.8 build needs an NVIDIA driver "
            "that supports CUDA >= 12.0)") in out


@pytest.mark.parametrize("driver, reason", [
    (RuntimeError("CUDA error cudaErrorUnknown"),
     "asking the driver failed: CUDA error cudaErrorUnknown"),
    (..., "this build has no driver_cuda_version()"),
])
def test_info_driver_unknown(capsys, no_gpu, no_cache_env, driver, reason):
    with fake_ext_with_driver(driver, cuda_version="12.4"):  # no cuda_runtime_version: parsed
        status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert (f"driver:          unknown ({reason}; this CUDA 12.4 build needs a driver that "
            "supports CUDA >= 12.0)") in out


def test_info_json_driver(capsys, no_gpu, no_cache_env):
    with fake_ext_with_driver(12020, **CU128_PTX):
        status, out, _ = run_cli(capsys, "info", "--json")
    assert status == 0
    info = json.loads(out)
    assert info["driver_cuda_version"] == 12020 and info["cuda_runtime_version"] == 12080
    assert info["ptx_archs"] == ["90"]
    assert info["driver"]["status"] == "minor-compat"


@pytest.mark.parametrize("dists, line", [
    ([{"name": "cutlass-moe-cu12", "version": "0.1.0"}],
     "distribution:    cutlass-moe-cu12 0.1.0"),
    ([], "distribution:    none installed (running from a source tree)"),
    ([{"name": "cutlass-moe-cu12", "version": "0.1.0"},
      {"name": "cutlass-moe-cu13", "version": "0.1.0"}],
     ("distribution:    CONFLICT: cutlass-moe-cu12 0.1.0, cutlass-moe-cu13 0.1.0 each install "
      "cutlass_moe; uninstall all but one")),
])
def test_info_distribution(capsys, no_gpu, fake_ext, no_cache_env, monkeypatch, dists, line):
    monkeypatch.setattr(diagnostics, "installed_distributions", lambda: dists)
    status, out, _ = run_cli(capsys, "info")
    assert status == 0
    assert out.splitlines()[1].strip().startswith(line)
    status, out, _ = run_cli(capsys, "info", "--json")
    assert json.loads(out)["distributions"] == dists


def test_installed_distributions(monkeypatch):
    import importlib.metadata

    versions = {"cutlass-moe-cu13": "0.2.0", "cutlass-moe-cu12": "0.1.0"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {
        "cutlass_moe": ["cutlass-moe-cu13", "cutlass-moe-cu12", "cutlass-moe-cu12", "gone"],
        "torch": ["torch"]})
    assert diagnostics.installed_distributions() == [
        {"name": "cutlass-moe-cu12", "version": "0.1.0"},
        {"name": "cutlass-moe-cu13", "version": "0.2.0"}]

    def broken():
        raise OSError("unreadable metadata")

    monkeypatch.setattr(importlib.metadata, "packages_distributions", broken)
    assert diagnostics.installed_distributions() == []


def test_info_without_extension_skips_the_driver(capsys, no_gpu, no_ext):
    status, out, _ = run_cli(capsys, "info", "--json")
    assert status == 0
    assert "driver" not in json.loads(out)


# ------------------------------------------------------------------------------------------
# tune (with a fake tune_model)
# ------------------------------------------------------------------------------------------

FAKE_ROWS = [
    TuneRow(1, 1, "g1_m16_s4", 10.0, "g1_m16_s3", 15.0),
    TuneRow(1, 2, "g2_m16_s4", 20.0, "g2_m16_s4", 20.0),
    TuneRow(2, 1, "g1_m32_s4", 12.0, "g1_m16_s3", 12.0),
    TuneRow(2, 2, "g2_m32_s3", 8.0, "g2_m16_s4", 16.0),
]


class FakeTuner:
    """Stands in for tune_model, save_tuning_cache and load_tuning_cache."""

    def __init__(self, rows=FAKE_ROWS, error: BaseException | None = None) -> None:
        self.rows = rows
        self.error = error
        self.calls: list[tuple[tuple, dict]] = []
        self.saved: list[Path] = []
        self.loaded: list[Path] = []

    def tune_model(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        total = 2 * len({r.bucket for r in self.rows})
        for done in range(1, total + 1):
            kwargs["progress"](done, total)
            if self.error is not None and done == 2:
                raise self.error
        return list(self.rows)

    def save(self, path) -> None:
        self.saved.append(Path(path))

    def load(self, path) -> int:
        self.loaded.append(Path(path))
        return 5


@pytest.fixture
def fake_tuner(monkeypatch, gpu, fake_ext, no_cache_env):
    tuner = FakeTuner()
    monkeypatch.setattr(autotuner, "tune_model", tuner.tune_model)
    monkeypatch.setattr(autotuner, "save_tuning_cache", tuner.save)
    monkeypatch.setattr(autotuner, "load_tuning_cache", tuner.load)
    return tuner


def table_lines(out: str) -> list[list[str]]:
    """The data lines of the table printed last (after its dashed rule), split in cells."""
    lines = out.rstrip("\n").splitlines()
    rule = max(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "})
    return [line.split() for line in lines[rule + 1:]]


def test_tune_table(capsys, fake_tuner):
    status, out, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b")
    assert status == 0
    header = out.splitlines()[0]
    assert header.startswith("mixtral-8x7b: E=8 H=4096 I=14336 k=2, bf16, Swiglu, on ")
    assert "tuning cache written to cutlass_moe_tuning_cache.json" in out
    lines = out.splitlines()
    assert lines[lines.index("") + 1].split() == [
        "bucket", "GEMM1", "tactic", "GEMM1", "us", "vs", "default", "GEMM2", "tactic", "GEMM2",
        "us", "vs", "default", "tuned", "us", "default", "us", "speed-up"]
    assert table_lines(out) == [
        ["1", "g1_m16_s4", "10.0", "1.50x", "g2_m16_s4", "20.0", "1.00x", "30.0", "35.0",
         "1.17x"],
        ["2", "g1_m32_s4", "12.0", "1.00x", "g2_m32_s3", "8.0", "2.00x", "20.0", "28.0",
         "1.40x"],
    ]
    assert "tuning mixtral-8x7b" in err  # the progress went to stderr (tqdm or plain)
    (args, kwargs), = fake_tuner.calls
    assert args == (8, 4096, 14336, 2)
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["ep_size"] == 1
    assert kwargs["max_tokens"] == 8192
    assert kwargs["activation"] == cutlass_moe.ActivationType.Swiglu
    assert kwargs["weights"] == "16bit"
    assert fake_tuner.saved == [Path("cutlass_moe_tuning_cache.json")]
    assert fake_tuner.loaded == []


def test_tune_explicit_shape_and_options(capsys, fake_tuner, tmp_path):
    out_file = tmp_path / "sub" / "cache.json"
    status, out, err = run_cli(capsys, "tune", "--experts", "64", "--hidden", "2048", "--inter",
                               "1408", "--top-k", "6", "--ep-size", "4", "--max-tokens", "512",
                               "--out", str(out_file), "-q")
    assert status == 0 and err == ""  # -q: no progress
    (args, kwargs), = fake_tuner.calls
    assert args == (16, 2048, 1408, 6)  # local experts = E / ep-size
    assert kwargs["ep_size"] == 4 and kwargs["max_tokens"] == 512
    assert out.startswith("custom: E=64 (16 per rank, ep-size 4) H=2048 I=1408 k=6, bf16")
    assert fake_tuner.saved == [out_file]


@pytest.mark.parametrize("json_output", [False, True])
def test_tune_int8_weights(capsys, fake_tuner, json_output):
    status, out, _ = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--weights", "int8",
                             *(["--json"] if json_output else []))
    assert status == 0
    (args, kwargs), = fake_tuner.calls
    assert args == (8, 4096, 14336, 2)
    assert kwargs["weights"] == "int8" and kwargs["dtype"] == torch.bfloat16
    if json_output:
        document = json.loads(out)
        assert document["weights"] == "int8" and document["dtype"] == "bf16"
    else:
        assert out.splitlines()[0].startswith(
            "mixtral-8x7b: E=8 H=4096 I=14336 k=2, bf16 x int8 weights, Swiglu, on ")


def test_tune_out_from_env(capsys, fake_tuner, monkeypatch, tmp_path):
    cache = tmp_path / "env_cache.json"
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(cache))
    assert run_cli(capsys, "tune", "--model", "qwen3-30b-a3b")[0] == 0
    assert fake_tuner.saved == [cache] and fake_tuner.loaded == []


def test_tune_creates_missing_parent_directories(capsys, gpu, fake_ext, no_cache_env,
                                                 monkeypatch, tmp_path):
    """The real save: parents are created, as --help says."""
    monkeypatch.setattr(autotuner, "tune_model", FakeTuner().tune_model)
    out = tmp_path / "a" / "b" / "cache.json"
    status, stdout, _ = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--out", str(out),
                                "-q")
    assert status == 0 and out.is_file()
    assert f"tuning cache written to {out}" in stdout
    _, help_text, _ = run_cli(capsys, "tune", "--help")
    assert "missing parent directories are created" in " ".join(help_text.split())


@pytest.mark.parametrize("error,message", [
    (PermissionError(13, "Permission denied", "/somewhere/.cache.json.x1y2.tmp"),
     "Permission denied"),
    (OSError(28, "No space left on device"), "No space left on device"),
])
def test_tune_save_failure_is_one_line(capsys, gpu, fake_ext, no_cache_env, monkeypatch,
                                       tmp_path, error, message):
    """A failed save names the cache file and the reason, never the temporary file."""
    monkeypatch.setattr(autotuner, "tune_model", FakeTuner().tune_model)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(tuning_cache.tempfile, "mkstemp", fail)
    out = tmp_path / "cache.json"
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--out", str(out), "-q")
    assert status == 1
    assert err == f"cutlass-moe: error: cannot write tuning cache {out}: {message}\n"
    assert ".tmp" not in err and not out.exists()


def test_tuning_cache_path_errors_of_the_api(tmp_path, fake_ext):
    """save_tuning_cache / load_tuning_cache: bad paths give one line naming the path."""
    with pytest.raises(IsADirectoryError) as info:
        cutlass_moe.save_tuning_cache(tmp_path)
    assert str(info.value) == f"cutlass_moe: cannot write tuning cache {tmp_path}: it is a directory"
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        cutlass_moe.save_tuning_cache(blocker / "cache.json")
    assert str(info.value) == (f"cutlass_moe: cannot write tuning cache {blocker}/cache.json: "
                               f"{blocker} is not a directory")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, not int"):
        cutlass_moe.load_tuning_cache(3)  # never an open file descriptor
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, not int"):
        cutlass_moe.save_tuning_cache(3)
    with pytest.warns(UserWarning, match=r"is unreadable \(it is a directory\); ignored"):
        assert cutlass_moe.load_tuning_cache(tmp_path) == 0
    nested = tmp_path / "x" / "y" / "cache.json"
    cutlass_moe.save_tuning_cache(nested)  # parents are created
    assert nested.is_file()


def test_tune_loads_an_existing_out_file_first(capsys, fake_tuner, tmp_path):
    cache = tmp_path / "cache.json"
    cache.write_text("{}")
    status, out, _ = run_cli(capsys, "tune", "--model", "qwen3-30b-a3b", "--out", str(cache))
    assert status == 0
    assert fake_tuner.loaded == [cache] and fake_tuner.saved == [cache]
    assert "(merged with the 5 entries it had)" in out


def test_tune_json(capsys, fake_tuner):
    rows = [*FAKE_ROWS[:3], TuneRow(2, 2, "g2_m32_s3", 8.0, "g2_m16_s4", float("inf"))]
    fake_tuner.rows = rows
    status, out, _ = run_cli(capsys, "tune", "--model", "gpt-oss-20b", "--ep-size", "2",
                             "--json")
    assert status == 0
    document = json.loads(out)
    assert document["model"] == "gpt-oss-20b"
    assert (document["num_experts"], document["num_experts_local"], document["ep_size"]) == (
        32, 16, 2)
    assert document["activation"] == "Swiglu" and document["dtype"] == "bf16"
    assert document["weights"] == "bf16"
    assert document["cache_file"] == "cutlass_moe_tuning_cache.json"
    assert len(document["rows"]) == 4
    assert document["rows"][0] == {"bucket": 1, "gemm": 1, "best_tactic": "g1_m16_s4",
                                   "best_us": 10.0, "default_tactic": "g1_m16_s3",
                                   "default_us": 15.0, "speedup": 1.5}
    assert document["rows"][3]["default_us"] is None and document["rows"][3]["speedup"] is None


def test_format_tune_table_failed_default():
    text = cli.format_tune_table([TuneRow(1, 1, "a", 10.0, "b", float("inf")),
                                  TuneRow(1, 2, "c", 5.0, "c", 5.0)])
    assert text.splitlines()[2].split() == ["1", "a", "10.0", "-", "c", "5.0", "1.00x", "15.0",
                                            "failed", "-"]
    text = cli.format_tune_table([TuneRow(4, 2, "c", 5.0, "d", 6.0)])
    assert text.splitlines()[2].split() == ["4", "-", "-", "-", "c", "5.0", "1.20x", "5.0",
                                            "6.0", "1.20x"]


@pytest.mark.parametrize(("error", "status", "message"), [
    (RuntimeError("no tactic ran for GEMM1 at bucket 2"), 1,
     "cutlass-moe: error: tuning failed: no tactic ran for GEMM1 at bucket 2"),
    (ValueError("hidden_size (12) must be a multiple of 8"), 2,
     "cutlass-moe: error: hidden_size (12) must be a multiple of 8"),
])
def test_tune_failures(capsys, fake_tuner, error, status, message):
    fake_tuner.error = error
    code, out, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b")
    assert code == status and out == ""
    assert message in err and "Traceback" not in err
    assert fake_tuner.saved == []


def test_tune_interrupted_saves_what_it_has(capsys, fake_tuner):
    fake_tuner.error = KeyboardInterrupt()
    code, out, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b")
    assert code == 130 and out == ""
    assert "interrupted" in err
    assert fake_tuner.saved == [Path("cutlass_moe_tuning_cache.json")]


def test_tune_with_the_real_cache(capsys, monkeypatch, gpu, fake_ext, tmp_path, no_cache_env):
    """save_tuning_cache/load_tuning_cache for real: a second tune keeps the first's entries."""
    monkeypatch.setattr(autotuner, "device_id", lambda device=None: "Fake GPU/1")
    names = [d["name"] for d in tactic_descriptors(1)]

    def fake_tune_model(num_experts, hidden_size, inter_size, top_k, **kwargs):
        shape = tuning_cache.ShapeKey("bf16_bf16_bf16", "none", num_experts, hidden_size,
                                   inter_size, top_k, "Swiglu", kwargs["ep_size"])
        for gemm in (1, 2):
            key = tuning_cache.TuningKey(gemm, shape, "Fake GPU/1", 1)
            autotuner.get_tuner().record(key, names[0], 1.0)
        return [TuneRow(1, 1, names[0], 1.0, names[1], 2.0),
                TuneRow(1, 2, names[0], 1.0, names[1], 2.0)]

    monkeypatch.setattr(autotuner, "tune_model", fake_tune_model)
    cache = tmp_path / "cache.json"
    autotuner.clear_tuning_cache()
    try:
        assert run_cli(capsys, "tune", *SMALL, "--out", str(cache))[0] == 0
        autotuner.clear_tuning_cache()  # a new process
        assert run_cli(capsys, "tune", "--experts", "16", "--hidden", "64", "--inter", "64",
                       "--top-k", "1", "--out", str(cache))[0] == 0
    finally:
        autotuner.clear_tuning_cache()
    document = json.loads(cache.read_text())
    entries = document["devices"]["Fake GPU/1"]
    assert {(e["num_experts"], e["gemm"]) for e in entries} == {(8, 1), (8, 2), (16, 1),
                                                                (16, 2)}


def test_unusable_existing_cache_is_one_warning_line(capsys, monkeypatch, gpu, fake_ext,
                                                    tmp_path, no_cache_env):
    """A corrupt --out file: the real load warns (one clean line), tuning still writes it."""
    saved = []
    monkeypatch.setattr(autotuner, "tune_model", lambda *a, **k: list(FAKE_ROWS))
    monkeypatch.setattr(autotuner, "save_tuning_cache", saved.append)
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    status, _, err = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--out", str(cache),
                             "-q")
    assert status == 0 and saved == [cache]
    assert err.startswith(f"cutlass-moe: warning: tuning cache {cache} is unreadable")
    assert len(err.splitlines()) == 1


def test_progress_without_tqdm():
    stream = io.StringIO()
    progress = cli.Progress("tuning x", stream=stream)
    progress._use_tqdm = False
    progress(1, 4)
    progress(4, 4)
    progress.close()
    assert stream.getvalue() == "tuning x: 1/4 GEMMs\ntuning x: 4/4 GEMMs\n"
    silent = io.StringIO()
    quiet = cli.Progress("tuning x", enabled=False, stream=silent)
    quiet(1, 4)
    quiet.close()
    assert silent.getvalue() == ""


def test_progress_on_a_terminal_redraws_one_line():
    stream = io.StringIO()
    stream.isatty = lambda: True
    progress = cli.Progress("t", stream=stream)
    progress._use_tqdm = False
    progress(1, 2)
    progress(2, 2)
    progress.close()
    assert stream.getvalue() == "\rt: 1/2 GEMMs\rt: 2/2 GEMMs\n"


# ------------------------------------------------------------------------------------------
# bench (with a fake run_bench)
# ------------------------------------------------------------------------------------------

CEILINGS = bench.Ceilings("bf16", 3.0, 700.0, 600.0, "g2_big", 50 * 2**20, "FakeGPU (cuda)")


def fake_row(preset, num_tokens, impl, latency_us, tactics=("", ""), source="", graph=False):
    p = presets.MODEL_PRESETS.get(preset, presets.ModelPreset(8, 128, 256, 2))
    return bench.make_row(preset, p, "bf16", "bf16", num_tokens, impl, graph, latency_us,
                          min(p.num_experts, num_tokens * p.top_k), CEILINGS,
                          tactic1=tactics[0], tactic2=tactics[1], source=source)


def fake_result(config):
    rows = []
    for name, _ in config.models:
        rows += [fake_row(name, 1, bench.IMPL_TUNED, 50.0, ("g1_a", "g2_a"), "cache"),
                 fake_row(name, 32, bench.IMPL_TUNED, 80.5, ("g1_b", "g2_b"), "cache+default"),
                 fake_row(name, 1, "naive", 500.0)]
    stages = bench.stage_rows({"routing": (20.0, 6), "gemm1": (100.0, 2)}, 2, preset="m",
                              dtype="bf16", weights="bf16", num_tokens=1, impl=bench.IMPL_TUNED)
    return bench.BenchResult(CEILINGS, rows, stages if config.stages else [],
                             ["reference skipped"])


@pytest.fixture
def fake_bench(monkeypatch, gpu, fake_ext, no_cache_env):
    calls = []

    def run_bench(config, ceilings=None):
        calls.append(config)
        return fake_result(config)

    loaded = []
    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.setattr(autotuner, "load_tuning_cache", lambda p: loaded.append(Path(p)) or 3)
    return types.SimpleNamespace(calls=calls, loaded=loaded)


def test_bench_table(capsys, fake_bench, caplog):
    status, out, _ = run_cli(capsys, "bench", "--model", "gpt-oss-20b", "--tokens", "1,32")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("gpt-oss-20b: E=32 H=2880 I=2880 k=4, clamped SwiGLU")
    assert lines[1].startswith("bf16, uniform routing, tuned tactics, on ")
    assert lines[2].startswith("ceilings on FakeGPU (cuda): copy 3.00 TB/s, CUTLASS Sm80 bf16 "
                               "GEMM 600.0 TFLOP/s (g2_big)")
    assert "cuBLAS 700.0 TFLOP/s" in lines[2]
    header = next(line for line in lines if line.startswith("model"))
    assert header.split()[:5] == ["model", "T", "impl", "graph", "latency_us"]
    first = next(line for line in lines if line.startswith("gpt-oss-20b  ")).split()
    assert first[:5] == ["gpt-oss-20b", "1", "cutlass_moe_tuned", "no", "50.0"]
    assert "g1_a / g2_a (cache)" in out
    assert "note: reference skipped" in out
    (config,) = fake_bench.calls
    assert config.models == [("gpt-oss-20b", presets.MODEL_PRESETS["gpt-oss-20b"])]
    assert (config.dtype, config.weights, config.tokens, config.routing, config.tactics,
            config.graph, config.warmup, config.repeats, config.max_tokens, config.seed) == (
        "bf16", "bf16", [1, 32], "uniform", "tuned", False, 10, 50, 8192, 0)
    assert config.device == torch.device("cuda")
    assert (config.peers, config.stages, config.rotate, config.flush_l2, config.pdl) == (
        bench.PEERS, False, None, True, True)
    assert fake_bench.loaded == []  # no cache file here
    assert "no tuning cache at cutlass_moe_tuning_cache.json" in caplog.text


def test_bench_tuned_loads_the_cache(capsys, fake_bench, tmp_path):
    cache = tmp_path / "c.json"
    cache.write_text("{}")
    assert run_cli(capsys, "bench", *SMALL, "--cache", str(cache))[0] == 0
    assert fake_bench.loaded == [cache]
    assert run_cli(capsys, "bench", *SMALL, "--cache", str(cache), "--both")[0] == 0
    assert fake_bench.loaded == [cache, cache]


def test_bench_default_options(capsys, fake_bench, tmp_path):
    (tmp_path / "cutlass_moe_tuning_cache.json").write_text("{}")
    assert run_cli(capsys, "bench", *SMALL, "--default", "--routing", "zipf", "--graph",
                   "--warmup", "1", "--repeats", "2", "--seed", "3", "--max-tokens", "64",
                   "--peers", "none", "--rotate", "3", "--no-flush", "--no-pdl")[0] == 0
    assert fake_bench.loaded == []  # --default ignores the cache
    (config,) = fake_bench.calls
    assert config.models == [("custom", presets.ModelPreset(8, 128, 256, 2))]
    assert (config.routing, config.tactics, config.graph, config.warmup, config.repeats,
            config.max_tokens, config.seed, config.peers, config.rotate, config.flush_l2,
            config.pdl) == ("zipf", "default", True, 1, 2, 64, 3, (), 3, False, False)


def test_bench_several_models(capsys, fake_bench):
    status, out, _ = run_cli(capsys, "bench", "--model", "all", "--stages")
    assert status == 0
    (config,) = fake_bench.calls
    assert [name for name, _ in config.models] == list(presets.MODEL_PRESETS)
    assert config.stages
    assert "per-stage kernel time per call" in out and "routing_us" in out


def test_bench_int8_weights(capsys, fake_bench):
    status, out, _ = run_cli(capsys, "bench", *SMALL, "--weights", "int8", "--tokens", "1")
    assert status == 0
    (config,) = fake_bench.calls
    assert config.weights == "int8"
    assert out.splitlines()[1].startswith("bf16 x int8 weights, ")
    status, out, _ = run_cli(capsys, "bench", *SMALL, "--weights", "int8", "--json")
    assert status == 0 and json.loads(out)["config"]["weights"] == "int8"


def test_bench_json_and_out_files(capsys, fake_bench, tmp_path):
    status, out, _ = run_cli(capsys, "bench", "--model", "mixtral-8x7b", "--json", "--stages",
                             "--out", str(tmp_path / "r.json"))
    assert status == 0
    document = json.loads(out)
    assert document["config"]["model"] == "mixtral-8x7b" and document["config"]["top_k"] == 2
    assert document["config"]["models"] == ["mixtral-8x7b"]
    assert [r["latency_us"] for r in document["rows"]] == [50.0, 80.5, 500.0]
    assert document["ceilings"]["sm80_tflops"] == 600.0
    assert {s["stage"] for s in document["stages"]} == {"routing", "gemm1"}
    assert document["notes"] == ["reference skipped"]
    assert json.loads((tmp_path / "r.json").read_text()) == document
    assert run_cli(capsys, "bench", "--model", "mixtral-8x7b", "--stages", "--out",
                   str(tmp_path / "r.csv"), "--out", str(tmp_path / "again.json"))[0] == 0
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == document["rows"]
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["num_tokens"], r["latency_us"], r["preset"], r["impl"], r["tactic1"],
             r["routing"], r["copy_tb_s"]) for r in rows][:2] == [
        ("1", "50.0", "mixtral-8x7b", "cutlass_moe_tuned", "g1_a", "uniform", "3.0"),
        ("32", "80.5", "mixtral-8x7b", "cutlass_moe_tuned", "g1_b", "uniform", "3.0")]
    with open(tmp_path / "r.stages.csv", newline="") as f:
        assert [r["stage"] for r in csv.DictReader(f)] == ["routing", "gemm1"]


def test_bench_plot(capsys, fake_bench, monkeypatch, tmp_path):
    figure, axes = mock.MagicMock(), [[mock.MagicMock()], [mock.MagicMock()]]
    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = mock.MagicMock(return_value=(figure, axes))
    pyplot.close = mock.MagicMock()
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.__spec__ = importlib.machinery.ModuleSpec("matplotlib", None)
    matplotlib.use = mock.MagicMock()
    matplotlib.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    assert run_cli(capsys, "bench", "--model", "mixtral-8x7b", "--plot",
                   str(tmp_path / "p.png"))[0] == 0
    matplotlib.use.assert_called_once_with("Agg")
    latency_plots = axes[0][0].plot.call_args_list
    assert latency_plots[0].args == ([1, 32], [50.0, 80.5])  # cutlass_moe_tuned
    assert latency_plots[1].args == ([1], [500.0])  # naive
    assert latency_plots[2].kwargs["label"] == "memory floor"
    assert len(axes[1][0].plot.call_args_list) == 2  # roofline fraction per impl
    figure.savefig.assert_called_once_with(tmp_path / "p.png")


def test_format_table_alignment():
    text = tables.format_table(["a", "name"], [["1", "x"], ["100", "long"]], left=(1,))
    assert text.splitlines() == ["  a  name", "---  ----", "  1  x", "100  long"]


def test_main_restores_the_package_log_level(capsys, no_gpu, fake_ext):
    import logging

    package_logger = logging.getLogger("cutlass_moe")
    before = package_logger.level
    run_cli(capsys, "info", "-v")
    assert package_logger.level == before


# ------------------------------------------------------------------------------------------
# GPU: the real commands on a tiny shape
# ------------------------------------------------------------------------------------------

TINY = ["--experts", "8", "--hidden", "512", "--inter", "256", "--top-k", "2"]


@pytest.fixture
def real_gpu():
    if not _ext.extension_available():
        pytest.skip("the compiled extension is not available")


@pytest.mark.gpu
def test_gpu_tune_tiny(capsys, real_gpu, tmp_path):
    cache = tmp_path / "cache.json"
    try:
        status, out, err = run_cli(capsys, "tune", *TINY, "--max-tokens", "4", "--out",
                                   str(cache), "--json")
    finally:
        autotuner.clear_tuning_cache()
    assert status == 0, err
    document = json.loads(out)
    assert sorted({(r["bucket"], r["gemm"]) for r in document["rows"]}) == [
        (b, g) for b in (1, 2, 4) for g in (1, 2)]
    assert all(r["best_us"] > 0 and r["speedup"] >= 1.0 for r in document["rows"])
    assert json.loads(cache.read_text())["schema"] == tuning_cache.CACHE_SCHEMA


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["--peers", "none"],
                                   ["--default", "--graph", "--routing", "zipf", "--stages"],
                                   ["--weights", "int8", "--peers", "none"],
                                   ["--weights", "int8", "--both", "--graph"]])
def test_gpu_bench_tiny(capsys, real_gpu, no_cache_env, monkeypatch, extra):
    # small ceilings keep the test quick
    real = bench.measure_ceilings
    monkeypatch.setattr(bench, "measure_ceilings", lambda dtype, device: real(
        dtype, device, repeats=2, copy_bytes=1 << 24, gemm_size=512))
    status, out, err = run_cli(capsys, "bench", *TINY, "--tokens", "1,16", "--warmup", "1",
                               "--repeats", "3", "--json", *extra)
    assert status == 0, err
    document = json.loads(out)
    rows = document["rows"]
    ours = [r for r in rows if r["impl"].startswith("cutlass_moe")]
    impls = {r["impl"] for r in ours}
    assert [r["num_tokens"] for r in ours] == [1] * len(impls) + [16] * len(impls)
    assert all(r["latency_us"] > 0 and r["tactic1"] and r["tactic2"] for r in ours)
    assert all(r["mem_fraction"] is not None and r["compute_fraction"] is not None
               for r in ours)
    assert document["ceilings"]["copy_tb_s"] > 0 and document["ceilings"]["sm80_tflops"] > 0
    if "int8" in extra:
        assert all("_int8_" in r["tactic1"] and "_int8_" in r["tactic2"] for r in ours)
    if "--peers" not in extra:
        peers = {r["impl"] for r in rows} - impls
        assert {"naive", "reference"} <= peers
    if "--stages" in extra:
        stages = {s["stage"] for s in document["stages"]}
        assert {"routing", "gemm1", "gemm2", "finalize"} <= stages, document["notes"]
        # A fused gated GEMM1 gathers the token rows itself; a plain one needs the gather.
        plain_gemm1 = any(not r["tactic1"].startswith("sm80_gated_") for r in ours)
        assert ("gather" in stages) == plain_gemm1, (stages, [r["tactic1"] for r in ours])


@pytest.mark.gpu
def test_gpu_tune_tiny_int8(capsys, real_gpu, tmp_path):
    cache = tmp_path / "cache.json"
    try:
        status, out, err = run_cli(capsys, "tune", *TINY, "--weights", "int8", "--max-tokens",
                                   "2", "--out", str(cache), "--json")
    finally:
        autotuner.clear_tuning_cache()
    assert status == 0, err
    document = json.loads(out)
    assert document["weights"] == "int8"
    assert all("_int8_" in r["best_tactic"] for r in document["rows"])
    (entries,) = json.loads(cache.read_text())["devices"].values()
    assert len(entries) == 4
    assert {(e["quant"], e["dtypes"]) for e in entries} == {("int8_per_channel",
                                                             "bf16_int8_bf16")}


@pytest.mark.gpu
def test_gpu_bench_clamped_preset_shape(capsys, real_gpu, no_cache_env, monkeypatch):
    """gpt-oss's clamp tensors reach cutlass_fused_moe (a scaled-down gpt-oss shape)."""
    small = presets.ModelPreset(num_experts=4, hidden_size=256, inter_size=256, top_k=2,
                                swiglu_alpha=1.702, swiglu_beta=1.0, swiglu_limit=7.0)
    monkeypatch.setitem(presets.MODEL_PRESETS, "gpt-oss-20b", small)
    real = bench.measure_ceilings
    monkeypatch.setattr(bench, "measure_ceilings", lambda dtype, device: real(
        dtype, device, repeats=2, copy_bytes=1 << 24, gemm_size=512))
    status, _, err = run_cli(capsys, "bench", "--model", "gpt-oss-20b", "--tokens", "3",
                             "--warmup", "1", "--repeats", "2")
    assert status == 0, err


# ------------------------------------------------------------------------------------------
# int4 weights (W4A16): --weights int4, --group-size, --asym
# ------------------------------------------------------------------------------------------


def test_int4_options_parse():
    args = parse("tune", "--model", "mixtral-8x7b", "--weights", "int4", "--group-size", "64",
                 "--asym")
    assert (args.weights, args.group_size, args.asym) == ("int4", 64, True)
    args = parse("bench", "--model", "mixtral-8x7b", "--weights", "int4")
    assert (args.group_size, args.asym) == (None, False)


@pytest.mark.parametrize("json_output", [False, True])
def test_tune_int4_weights(capsys, fake_tuner, json_output):
    status, out, _ = run_cli(capsys, "tune", "--model", "qwen3-30b-a3b", "--weights", "int4",
                             "--group-size", "64", "--asym", *(["--json"] if json_output else []))
    assert status == 0
    (args, kwargs), = fake_tuner.calls
    assert args == (128, 2048, 768, 8)
    assert (kwargs["weights"], kwargs["group_size"], kwargs["asymmetric"]) == ("int4", 64, True)
    if json_output:
        document = json.loads(out)
        assert (document["weights"], document["group_size"], document["asymmetric"]) == (
            "int4", 64, True)
    else:
        assert out.splitlines()[0].startswith(
            "qwen3-30b-a3b: E=128 H=2048 I=768 k=8, bf16 x int4 weights (group 64, zero "
            "points), Swiglu, on ")


def test_tune_int4_default_group_size(capsys, fake_tuner):
    status, out, _ = run_cli(capsys, "tune", "--model", "mixtral-8x7b", "--weights", "int4")
    assert status == 0
    (_, kwargs), = fake_tuner.calls
    assert (kwargs["group_size"], kwargs["asymmetric"]) == (bench.DEFAULT_INT4_GROUP_SIZE, False)
    assert ", bf16 x int4 weights (group 128), Swiglu" in out.splitlines()[0]


@pytest.mark.parametrize("command", ["tune", "bench"])
@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt-oss-20b", "--weights", "int4"],
     ("--group-size 128 does not fit gpt-oss-20b (--hidden 2880, --inter 2880): must divide "
      "the hidden size H=2880 and the intermediate size I=2880 (the K of both GEMMs): H=2880 is "
      "not a multiple of 128; documented group sizes that fit H=2880 and I=2880: 32, 64")),
    (["--model", "mixtral-8x7b", "--weights", "int4", "--group-size", "48"],
     ("--group-size 48 does not fit mixtral-8x7b (--hidden 4096, --inter 14336): must be a "
      "multiple of 32")),
    (["--model", "mixtral-8x7b", "--group-size", "64"],
     "--group-size applies to --weights int4, fp8 or mxfp4 only (got --weights bf16)"),
    (["--model", "mixtral-8x7b", "--weights", "int8", "--group-size", "64", "--asym"],
     ("--group-size applies to --weights int4, fp8 or mxfp4 only; --asym applies to --weights "
      "int4 only (got --weights int8)")),
    (["--experts", "8", "--hidden", "144", "--inter", "256", "--top-k", "2", "--weights", "int4"],
     ("--weights int4 needs --hidden (144) and --inter (256) to be multiples of 32 (16-byte "
      "loads of packed int4 weights)")),
    (["--model", "mixtral-8x7b", "--weights", "int4", "--group-size", "0"],
     "argument --group-size: expected a positive integer, got 0"),
])
def test_int4_usage_errors(capsys, gpu, fake_ext, command, argv, message):
    status, out, err = run_cli(capsys, command, *argv)
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_bench_int4_weights(capsys, fake_bench):
    status, out, _ = run_cli(capsys, "bench", "--model", "mixtral-8x7b", "--weights", "int4",
                             "--group-size", "32", "--tokens", "1")
    assert status == 0
    (config,) = fake_bench.calls
    assert (config.weights, config.group_size, config.asymmetric) == ("int4", 32, False)
    assert config.to_json()["group_size"] == 32 and config.to_json()["asymmetric"] is False
    assert "bf16 x int4 weights (group 32), uniform routing" in out
    status, out, _ = run_cli(capsys, "bench", "--model", "gpt-oss-20b", "--weights", "int4",
                             "--group-size", "64", "--asym", "--json")
    assert status == 0
    document = json.loads(out)
    assert (document["config"]["group_size"], document["config"]["asymmetric"]) == (64, True)


def test_bench_config_json_names_int4_options_only_for_int4():
    config = bench.BenchConfig(models=[], weights="bf16")
    assert "group_size" not in config.to_json()


def test_info_counts_int4_tactics(capsys, no_gpu, fake_ext, no_cache_env):
    status, out, _ = run_cli(capsys, "info")
    assert status == 0
    line = next(line for line in out.splitlines() if "bf16_int4_bf16" in line)
    assert line.split() == ["bf16_int4_bf16", "10", "9"]
