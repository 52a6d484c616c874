"""The Hopper (sm_90a) tactic family's build side, on the CPU: tools/generate_kernels.py adds the
``sm90_*`` tactics only when asked (``--sm90``), and then only new files and registry entries;
CMakeLists.txt keeps CUTLASS_MOE_SM90_TACTICS off by default, compiles the sm90 instances for
sm_90a alone, and adds nothing without sm_90 in CUTLASS_MOE_CUDA_ARCHS.

The configure tests need cmake and nvcc and skip without them (configuring compiles nothing but
CMake's own probes). The kernels themselves are checked on a GPU by tests/test_sm90_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_build_config import CMAKE, NVCC, needs_toolchain, one_line

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "tools" / "generate_kernels.py"

FULL_SM90 = [
    f"sm90_{dtype}_{dtype}_{tile}"
    for dtype in ("fp16", "bf16")
    for tile in ("m128n128k64_c1x1_cooperative", "m128n128k64_c2x1_cooperative",
                 "m128n256k64_c1x1_cooperative", "m64n128k64_c1x1_pingpong")
]
FAST_SM90 = [
    f"sm90_{dtype}_{dtype}_{tile}"
    for dtype in ("fp16", "bf16")
    for tile in ("m128n128k64_c1x1_cooperative", "m64n128k64_c1x1_pingpong")
]


@pytest.fixture(scope="module")
def gen():
    name = "_cutlass_moe_generate_kernels_sm90"
    spec = importlib.util.spec_from_file_location(name, GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def _list(*flags: str) -> list[str]:
    out = subprocess.run([sys.executable, str(GENERATOR), "--list", *flags], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.split()


# ------------------------------------------------------------------ the generator


@pytest.mark.parametrize("fast", [False, True])
def test_without_the_flag_no_sm90_tactic(gen, fast):
    names = [t.name for t in gen.tactics(fast)]
    assert names and not [n for n in names if n.startswith("sm90")]
    assert not any(isinstance(t, gen.Sm90Tactic) for t in gen.tactics(fast))
    assert _list(*(["--fast"] if fast else [])) == names


@pytest.mark.parametrize("fast", [False, True])
def test_with_the_flag_the_sm90_family_comes_last(gen, fast):
    plain = [t.name for t in gen.tactics(fast)]
    found = gen.tactics(fast, sm90=True)
    names = [t.name for t in found]
    expected = FAST_SM90 if fast else FULL_SM90
    assert names == plain + expected
    assert _list("--sm90", *(["--fast"] if fast else [])) == names
    for t in found[len(plain):]:
        assert isinstance(t, gen.Sm90Tactic)
        assert t.gemms == gen.GEMM1 | gen.GEMM2
        assert t.required_cc == 90
        assert t.weight_tag == t.dtype  # 16-bit weights only
        assert t.tile_k == 64 and t.schedule in gen.SM90_SCHEDULES
        # Cooperative tiles split their rows over two consumer warp groups.
        rows = t.tile_m // 2 if t.schedule == "cooperative" else t.tile_m
        assert t.warp_group_tile == (rows, t.tile_n, t.tile_k)


def test_sm90_tactic_rules(gen):
    with pytest.raises(ValueError, match="schedule"):
        gen.Sm90Tactic("bf16", 128, 128, 64, 1, 1, "basic")
    with pytest.raises(ValueError, match="at least 128 rows"):
        gen.Sm90Tactic("bf16", 64, 128, 64, 1, 1, "cooperative")


def _generate(tmp_path: Path, *flags: str) -> tuple[Path, list[Path]]:
    out_dir = tmp_path / ("gen" + "".join(flags).replace("-", "_"))
    printed = subprocess.run(
        [sys.executable, str(GENERATOR), "--out-dir", str(out_dir), *flags], check=True,
        stdout=subprocess.PIPE, text=True).stdout
    return out_dir, [Path(p) for p in printed.split(";")]


@pytest.mark.parametrize("fast", [False, True])
def test_the_flag_only_adds_sm90_files_and_registry_entries(tmp_path, fast):
    """Every file of the plain generation is unchanged with --sm90 except the registry, which
    only gains the sm90 entries; the sm90 instances are files of their own, one tactic each."""
    extra = ["--fast"] if fast else []
    plain_dir, plain_files = _generate(tmp_path, *extra)
    sm90_dir, sm90_files = _generate(tmp_path, "--sm90", *extra)
    plain_names = {p.name for p in plain_files}
    new = [p for p in sm90_files if p.name not in plain_names]
    expected = FAST_SM90 if fast else FULL_SM90
    assert sorted(p.name for p in new) == sorted(
        f"sm90_grouped_gemm_{d}_{i}.cu" for d in ("fp16", "bf16")
        for i in range(len(expected) // 2))
    assert not [p for p in plain_files if p.name.startswith("sm90")]
    for path in plain_files:
        if path.name == "tactic_registry.cu":
            continue
        assert (sm90_dir / path.name).read_text() == path.read_text(), path.name
    registry = (sm90_dir / "tactic_registry.cu").read_text().splitlines()
    plain_registry = (plain_dir / "tactic_registry.cu").read_text().splitlines()
    assert [line for line in registry if "sm90_" not in line] == plain_registry
    assert sum(f"kTactic_{name};" in line for line in registry for name in expected) == len(
        expected)
    defined = []
    for path in new:
        text = path.read_text()
        assert '#include "grouped_gemm/sm90_grouped_gemm.cuh"' in text
        found = re.findall(r'extern const GemmTactic kTactic_(\w+) = \{', text)
        assert len(found) == 1, path.name  # one instance per file (memory)
        defined += found
    assert sorted(defined) == sorted(expected)


def test_sm90_instance_and_registry_entry(tmp_path):
    sm90_dir, _ = _generate(tmp_path, "--sm90")
    texts = {p.name: p.read_text() for p in sm90_dir.glob("sm90_grouped_gemm_*.cu")}
    name = "sm90_bf16_bf16_m128n128k64_c2x1_cooperative"
    (text,) = [t for t in texts.values() if f'"{name}"' in t]
    kernel = f"Kernel_{name}"
    assert (f"using {kernel} = grouped_gemm::Sm90GroupedGemm<cutlass::bfloat16_t, 128, 128, 64, "
            f"2, 1, false>;") in text
    # GemmTactic's members in order: ..., warp tile = one consumer warp group's (64x128x64),
    # stages/threads/shared memory from the kernel, both GEMMs, not gated, no split, no decode,
    # entry points, then required_cc 90 and the kernel workspace size.
    entry = " ".join(text[text.index(f"extern const GemmTactic kTactic_{name}"):].split())
    assert entry.startswith(
        f'extern const GemmTactic kTactic_{name} = {{ "{name}", DType::kBFloat16, '
        f"DType::kBFloat16, 128, 128, 64, 64, 128, 64, {kernel}::kStages, {kernel}::kThreads, "
        f"{kernel}::kSmemBytes, 3, false, 1, false, &{kernel}::prepare, &{kernel}::launch, 90, "
        f"&{kernel}::workspace_bytes}};")
    (pingpong,) = [t for t in texts.values() if '"sm90_fp16_fp16_m64n128k64_c1x1_pingpong"' in t]
    assert "Sm90GroupedGemm<cutlass::half_t, 64, 128, 64, 1, 1, true>;" in pingpong


def test_tactic_header_keeps_older_registry_entries_valid():
    """Entries of the other families end at `launch`: every GemmTactic member after it has a
    default (required_cc 0: any GPU; no kernel workspace)."""
    text = (ROOT / "include" / "cutlass_moe" / "tactic.h").read_text()
    body = text[text.index("struct GemmTactic {"):]
    body = body[body.index("(*launch)"):body.index("};")]
    declarations = [line.strip() for line in body.splitlines()[1:]
                    if line.strip() and not line.strip().startswith("//")]
    assert declarations == ["int required_cc = 0;",
                            "size_t (*workspace_bytes)(int ctas) = nullptr;"]


# ------------------------------------------------------------------ CMake and packaging


def test_the_cmake_option_is_off_by_default():
    text = (ROOT / "CMakeLists.txt").read_text()
    match = re.search(r'option\(CUTLASS_MOE_SM90_TACTICS\s+"[^"]*"\s+(\w+)\)', text)
    assert match and match.group(1) == "OFF"
    # The generator is asked for the sm90 tactics only when the option took effect.
    assert re.search(r"if\(_sm90_tactics\)\s+list\(APPEND _gen_args --sm90\)", text)
    assert re.search(r"if\(_sm90_tactics\)\s+list\(APPEND _list_args --sm90\)", text)
    # Their own object library, sm_90a machine code only.
    library = text[text.index("add_library(cutlass_moe_sm90 OBJECT"):]
    library = library[:library.index("endif()")]
    assert 'CUDA_ARCHITECTURES "90a-real"' in library
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert ('CUTLASS_MOE_SM90_TACTICS = { env = "CUTLASS_MOE_SM90_TACTICS", default = "OFF" }'
            in pyproject)


def _configure_sm90(build_dir: Path, archs: str, option: str, fast: bool = True) -> str:
    """``cmake -S <repo> -B build_dir`` (as test_build_config.configure) with
    CUTLASS_MOE_SM90_TACTICS=option; its output on one line."""
    env = dict(os.environ)
    env.pop("CMAKE_BUILD_PARALLEL_LEVEL", None)
    args = [CMAKE, "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={NVCC}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-DCUTLASS_MOE_CUDA_ARCHS={archs}",
            f"-DCUTLASS_MOE_FAST_BUILD={'ON' if fast else 'OFF'}",
            f"-DCUTLASS_MOE_SM90_TACTICS={option}"]
    try:
        import pybind11
    except ImportError:
        pass
    else:
        args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
    result = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600, check=False)
    return one_line(result.stdout)


@needs_toolchain
def test_configure_without_the_option_adds_no_sm90_tactic(tmp_path):
    text = _configure_sm90(tmp_path, "80;90a", "OFF")
    assert "sm90 tactics" not in text and "CUTLASS_MOE_SM90_TACTICS" not in text
    assert re.search(r"compiling \d+ tactics in \d+ generated files", text), text


@needs_toolchain
def test_configure_with_the_option_and_sm90(tmp_path):
    text = _configure_sm90(tmp_path, "80;90a", "ON")
    assert (f"plus {len(FAST_SM90)} sm90 tactics (CUTLASS_MOE_SM90_TACTICS) in {len(FAST_SM90)} "
            "files, compiled for sm_90a only (90a-real)") in text, text
    generated = sorted(p.name for p in (tmp_path / "generated").glob("sm90_grouped_gemm_*.cu"))
    assert len(generated) == len(FAST_SM90)


@needs_toolchain
def test_configure_with_the_option_but_no_sm90_arch_adds_nothing(tmp_path):
    text = _configure_sm90(tmp_path, "80;89", "ON")
    assert "CUTLASS_MOE_SM90_TACTICS=ON adds nothing to this build" in text, text
    assert "Add 90 or 90a" in text
    assert "sm90 tactics (CUTLASS_MOE_SM90_TACTICS) in" not in text
    assert not list((tmp_path / "generated").glob("sm90_grouped_gemm_*.cu"))
