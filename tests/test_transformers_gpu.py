"""``experts_implementation="cutlass_moe"`` for Hugging Face transformers on a GPU.

The tiny random models of tests/test_transformers.py (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3, gpt-oss, OLMoE) on CUDA with the compiled kernels: experts and logits against
eager within the op tests' bf16 bound, greedy generation token for token, CUDA graphs of a
decode step (manual capture, and generate() with a static cache and torch.compile
"reduce-overhead"), prepare() in bf16 and int8, and the README example as written.
"""

from __future__ import annotations

import copy
import gc
import pathlib
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cutlass_moe.integrations.transformers as tx
from _helpers import record_error, rel_l2
from test_transformers import (  # noqa: F401 (_fresh_warnings: the autouse fixture)
    FAMILIES,
    _fresh_warnings,
    eager_experts,
    fallback_warnings,
    logits_three_ways,
    no_fallback,
    one_moe_layer,
    reference_of,
    routing,
    tiny_model,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
#: The op tests' bound (tests/test_fused_moe_gpu.py): relative L2 error against float32 math.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def gpu_model(family: str, dtype=torch.bfloat16, implementation="cutlass_moe", **overrides):
    model = tiny_model(family, dtype, implementation, **overrides).to(DEVICE)
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def _first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    differ = (a != b).nonzero()
    return None if differ.numel() == 0 else int(differ[0, -1])


def assert_same_tokens_up_to_ties(model, prompt, got, expected, what: str) -> None:
    """Greedy tokens equal, except after a step where the eager model's own top two logits
    are within bf16 rounding of each other (there either choice is right)."""
    step = _first_divergence(got, expected)
    if step is None:
        return
    model.set_experts_implementation("eager")
    with torch.no_grad():
        logits = model(expected[:, :step]).logits[0, -1].float()
    top = logits.topk(2).values
    margin = float(top[0] - top[1])
    assert margin <= 2e-2 * float(logits.abs().max()), (
        f"{what}: tokens differ at position {step} ({got[0, step:].tolist()} vs "
        f"{expected[0, step:].tolist()}) where eager's top-2 margin is {margin:.3g}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 4, 37, 300])
def test_experts_match_the_reference(family, tokens):
    model = gpu_model(family)
    for _, module in tx.experts_modules(model):
        num_experts, hidden = module.down_proj.shape[0], 32
        gen = torch.Generator().manual_seed(tokens)
        x = (torch.randn(tokens, hidden, generator=gen) * 2).to(DEVICE, torch.bfloat16)
        ids, weights = routing(tokens, num_experts, seed=tokens)
        ids, weights = ids.to(DEVICE), weights.to(DEVICE)
        with torch.no_grad(), no_fallback():
            out = module(x, ids, weights)
        expected = reference_of(tx.convert_experts(module), x, ids, weights, torch.float32)
        err = record_error(torch.bfloat16, rel_l2(out.float(), expected))
        assert err <= TOLERANCE[torch.bfloat16], f"{family}: {err:.3g}"
        exact = eager_experts(copy.deepcopy(module).double(), x.double(), ids, weights.double())
        assert rel_l2(out.float(), exact) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family):
    """One MoE layer (the router sees the same input in both runs), bf16: the logits with
    cutlass_moe are within the op tests' bound of eager's and of the float32 model's."""
    model = gpu_model(family, **one_moe_layer(family))
    tokens = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(DEVICE)
    out, eager, exact = logits_three_ways(model, tokens)
    record_error("transformers_logits_bfloat16_vs_float32_model", rel_l2(out, exact))
    assert rel_l2(out, eager) <= TOLERANCE[torch.bfloat16]
    assert rel_l2(out, exact) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_generation_falls_back_and_equals_eager(family):
    """A float32 model: the experts run transformers' eager forward (one warning), so 16
    greedy tokens equal eager's token for token."""
    model = gpu_model(family, torch.float32)
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = model.generate(prompt, max_new_tokens=16, do_sample=False)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "torch.float32" in messages[0]
    model.set_experts_implementation("eager")
    assert torch.equal(got, model.generate(prompt, max_new_tokens=16, do_sample=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_generation_follows_eager(family):
    model = gpu_model(family)
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with no_fallback():
        got = model.generate(prompt, max_new_tokens=16, do_sample=False)
    model.set_experts_implementation("eager")
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert got.shape == expected.shape == (1, 22)
    assert_same_tokens_up_to_ties(model, prompt, got, expected, family)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_cuda_graph_capture_of_a_decode_step(family):
    """Manual capture of the experts' decode call after one eager call: replays give the
    eager results (same kernels and tactics: bitwise)."""
    model = gpu_model(family)
    _, module = tx.experts_modules(model)[0]
    num_experts = module.down_proj.shape[0]
    static_x = torch.randn(4, 32, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(4, num_experts)
    static_ids, static_w = ids.to(DEVICE), weights.to(DEVICE)
    with torch.no_grad(), no_fallback():
        module(static_x, static_ids, static_w)  # builds the converted weights
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            module(static_x, static_ids, static_w)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = module(static_x, static_ids, static_w)
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(4, 32, generator=gen).to(DEVICE, torch.bfloat16)
            ids, weights = routing(4, num_experts, seed=seed + 10)
            static_x.copy_(x)
            static_ids.copy_(ids)
            static_w.copy_(weights)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, module(x, ids.to(DEVICE), weights.to(DEVICE)))


def test_first_call_during_capture_is_refused():
    model = gpu_model("mixtral")
    _, module = tx.experts_modules(model)[0]
    x = torch.randn(2, 32, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = (t.to(DEVICE) for t in routing(2, 4))
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), pytest.raises(RuntimeError, match="capture"), torch.cuda.graph(graph):
        module(x, ids, weights)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_generate_with_static_cache_and_reduce_overhead(family):
    """generate() compiles the decode step with a static cache (torch.compile
    "reduce-overhead": CUDA graphs); the experts run cutlass_moe inside it."""
    model = gpu_model(family)
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with no_fallback():
        plain = model.generate(prompt, max_new_tokens=16, do_sample=False)
        config = transformers.CompileConfig(mode="reduce-overhead")
        compiled = model.generate(prompt, max_new_tokens=16, do_sample=False,
                                  cache_implementation="static", compile_config=config)
        again = model.generate(prompt, max_new_tokens=16, do_sample=False,
                               cache_implementation="static", compile_config=config)
    assert torch.equal(compiled, again)
    assert_same_tokens_up_to_ties(model, prompt, compiled, plain, f"{family} compiled")


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_prepare_on_the_gpu(weights):
    sizes = {**one_moe_layer("qwen3_moe"), "moe_intermediate_size": 128}  # KBs, not bytes
    model = gpu_model("qwen3_moe", implementation="eager", **sizes)
    original = gpu_model("qwen3_moe", implementation="eager", **sizes)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    gc.collect()
    before = torch.cuda.memory_allocated()
    expert_bytes = sum(p.nbytes for _, m in tx.experts_modules(model)
                       for p in m.parameters(recurse=False))
    report = tx.prepare(model, weights=weights)
    gc.collect()
    after = torch.cuda.memory_allocated()
    assert all(v.startswith("cutlass_moe: Swiglu") for v in report.values())
    if weights == "bf16":
        assert after <= before + 4096  # the float32 activation parameters at most
    else:
        assert after <= before - 0.4 * expert_bytes  # int8: half, plus the scales
    with torch.no_grad(), no_fallback():
        out = model(tokens).logits.float()
    with torch.no_grad():
        eager = original(tokens).logits.float()
    assert rel_l2(out, eager) <= (TOLERANCE[torch.bfloat16] if weights == "bf16" else 3e-2)


def _readme_example() -> str:
    text = README.read_text()
    section = text.split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_example_runs_as_written(capsys):
    with no_fallback():
        exec(compile(_readme_example(), "README.md", "exec"), {})  # noqa: S102
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 2 and all(line.startswith("[") for line in lines[:2])
