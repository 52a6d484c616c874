"""Shared test helpers: relative error, random MoE problems, a naive reference."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from cutlass_moe import _ext

#: Worst relative L2 error seen per output-vs-reference dtype in this session (reported by
#: conftest's terminal summary): a passing suite still shows how close it came to the bound.
WORST_ERRORS: dict[str, float] = {}


def record_error(dtype: torch.dtype | str, err: float) -> float:
    """Remembers ``err`` as a candidate for the worst error of ``dtype`` (or of a named
    comparison such as ``"int8_vs_unquantized_bfloat16"``); returns ``err``."""
    key = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), err)
    return err


def descriptors(runner: Any, gemm: int) -> list[dict[str, Any]]:
    """A runner's runnable tactic descriptors of GEMM ``gemm`` as the package sees them
    (activations as ActivationType members)."""
    return [_ext.descriptor(d) for d in runner.tactics(gemm)]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; 0 for two empty tensors."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    if denom == 0.0:
        return 0.0 if out64.norm().item() == 0.0 else float("inf")
    return (out64 - ref64).norm().item() / denom


def random_routing(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax/top-k routing of random logits: ``(ids int32 [T, k], scales float32 [T, k])``
    with distinct ids per row and scales summing to 1."""
    logits = torch.randn(num_tokens, num_experts, device=device, generator=generator)
    scales, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    scales = scales / scales.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids.to(torch.int32), scales.to(torch.float32)


def random_tokens(
    num_tokens: int,
    hidden_size: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``x [T, H]`` in ``dtype`` and :func:`random_routing` from one seeded generator:
    ``(x, ids int32 [T, k], scales float32 [T, k])``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, device=device, dtype=dtype, generator=gen)
    ids, scales = random_routing(num_tokens, num_experts, top_k, device, gen)
    return x, ids, scales


def random_weights(
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    gated: bool,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fc1 [E, 2I or I, H]`` and ``fc2 [E, H, I]`` drawn from N(0, 1/fan_in)."""
    n1 = 2 * inter_size if gated else inter_size
    fc1 = torch.randn(num_experts, n1, hidden_size, device=device, generator=generator)
    fc2 = torch.randn(num_experts, hidden_size, inter_size, device=device, generator=generator)
    return (fc1 * hidden_size**-0.5).to(dtype), (fc2 * inter_size**-0.5).to(dtype)


def naive_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """Activation of one row ``h`` written out from the definitions (gated: ``[up | gate]``)."""
    if name in ("Swiglu", "Geglu"):
        half = h.shape[-1] // 2
        up, gate = h[..., :half], h[..., half:]
        if name == "Swiglu":
            return up * gate * torch.sigmoid(gate)
        return up * 0.5 * gate * (1.0 + torch.erf(gate / 2.0**0.5))
    if name == "Gelu":
        return 0.5 * h * (1.0 + torch.erf(h / 2.0**0.5))
    if name == "Relu":
        return torch.clamp_min(h, 0.0)
    if name == "Silu":
        return h * torch.sigmoid(h)
    if name == "Identity":
        return h
    raise ValueError(name)


def naive_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    scales: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    activation: str,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    clamp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tp_rank: int = 0,
    ep_rank: int = 0,
) -> torch.Tensor:
    """Per-token, per-choice Python loop in float64 (the slowest, plainest definition)."""
    num_tokens, hidden_size = x.shape
    num_experts = fc1.shape[0]
    out = torch.zeros(num_tokens, hidden_size, dtype=torch.float64)
    for t in range(num_tokens):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - ep_rank * num_experts
            if not 0 <= e < num_experts:
                continue
            h = fc1[e].double() @ x[t].double()
            if b1 is not None:
                h = h + b1[e].double()
            if clamp is not None:
                alpha, beta, limit = (float(v[e]) for v in clamp)
                half = h.shape[0] // 2
                up, gate = h[:half], h[half:]
                g = torch.clamp(gate, max=limit)
                u = torch.clamp(up, -limit, limit) + beta
                a = g * torch.sigmoid(alpha * g) * u
            else:
                a = naive_activation(h, activation)
            y = fc2[e].double() @ a
            if b2 is not None and tp_rank == 0:
                y = y + b2[e].double()
            out[t] += float(scales[t, j]) * y
    return out



def check_over_tile_groups(descs, run, ref, rows, k, error_key, tolerance) -> list[str]:
    """Grouped GEMMs walk an expert's row bands in groups whose A rows (16-bit, depth ``k``) fit
    in ``TILE_GROUP_BYTES`` (src/grouped_gemm/tile_order.cuh). Runs every unsplit tactic of
    ``descs`` (``run(name) -> output``) against ``ref`` on experts of at least ``rows`` rows,
    having checked that the shape gives each tactic several groups, the last one partial.
    Returns the failures; errors are recorded under ``error_key``."""
    from cutlass_moe import _ext

    group_bytes = _ext.load_extension().TILE_GROUP_BYTES
    failures = []
    for desc in descs:
        if int(desc.get("split_k", 1)) > 1:
            continue  # decode-only: at most SPLIT_K_MAX_ROWS rows
        tile_m = int(desc["tile_m"])
        bands = -(-rows // tile_m)
        per_group = max(1, min(bands, group_bytes // (tile_m * k * 2)))
        assert bands > per_group and bands % per_group, (desc["name"], bands, per_group)
        try:
            err = record_error(error_key, rel_l2(run(desc["name"]).float(), ref))
        except (RuntimeError, ValueError, AssertionError) as exc:  # report every bad tactic
            failures.append(f"{desc['name']}: {exc}")
            continue
        if not err <= tolerance:
            failures.append(f"{desc['name']}: rel err {err:.3g}")
    return failures


def clamped_swiglu_params(num_experts: int, generator: torch.Generator) -> dict:
    """Per-expert ``swiglu_alpha`` in [1, 2), ``swiglu_beta`` in [0, 1) and ``swiglu_limit`` in
    [1, 2) (float32, on the generator's device, drawn in that order), as keyword arguments of
    cutlass_fused_moe."""

    def draw(low: float) -> torch.Tensor:
        return torch.rand(num_experts, device=generator.device, generator=generator) + low

    return {"swiglu_alpha": draw(1.0), "swiglu_beta": draw(0.0), "swiglu_limit": draw(1.0)}


class FakeEvent:
    """A stand-in for torch.cuda.Event on a machine without a GPU: every interval between two
    events lasts ``elapsed_ms`` (a class attribute tests may set); ``log``, when set to a
    list, records each ``record`` call."""

    elapsed_ms = 1e-3
    log: list[str] | None = None

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        if self.log is not None:
            self.log.append("event")

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return self.elapsed_ms


def run_in_threads(worker: Callable[..., object], count: int, indexed: bool = True) -> None:
    """Runs ``worker(i)`` (or ``worker()`` when not ``indexed``) on ``count`` threads started
    together, and waits for all of them."""
    threads = [threading.Thread(target=worker, args=(i,) if indexed else ())
               for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def captured_graph(call: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``call`` captured in a CUDA graph, after one warm-up run on a side stream outside capture
    (first-call set-up: tuner lookups, workspace and argument caches)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph
