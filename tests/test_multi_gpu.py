"""Expert and tensor parallelism on two GPUs through torch.distributed (NCCL); docs/parallelism.md.

Each test starts one process per GPU itself: this file, run as a script
(``python tests/test_multi_gpu.py CHECK``) with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set (a free TCP port on 127.0.0.1), exactly what ``torchrun``
sets, so ``torchrun --nproc-per-node=2 tests/test_multi_gpu.py CHECK`` runs a check by hand too.
A child sets its device, joins the NCCL process group, runs the check and destroys the group; a
failing child prints its traceback and exits non-zero, the parent then stops the other ranks
(which may be waiting in a collective) and raises an AssertionError holding the child's output.

NVLink multicast stays off in every process the tests start (``MULTICAST_OFF``): NCCL's NVLS
algorithms, PyTorch's symmetric-memory multicast and NVSHMEM's NVLS.

The layer: E_TOTAL experts, H, I, top-k as below, bf16, random inputs (never zeros), weights from
N(0, 1/fan_in), biases on both GEMMs. Every rank builds the full layer and the tokens on the CPU
from the same seeded generator, then moves its slice to its GPU. Outputs are summed over ranks
with ``all_reduce(SUM)`` in float32 (bf16 outputs are converted first) and compared with
``reference_moe`` in float32 on the full weights (relative L2 error <= 1e-2, the bf16 bound).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

# Run as a child process (a script), this file finds the package as conftest does under pytest:
# an installed cutlass_moe wins, a plain source checkout falls back to python/. The modules that
# need that path are imported after it.
_REPO = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("cutlass_moe") is None:
    sys.path.insert(0, str(_REPO / "python"))
_helpers = importlib.import_module("_helpers")  # tests/: the script's own directory
cutlass_moe = importlib.import_module("cutlass_moe")
autotuner = importlib.import_module("cutlass_moe.autotuner")
cutlass_fused_moe = cutlass_moe.cutlass_fused_moe
reference_moe = cutlass_moe.reference_moe
record_error, rel_l2 = _helpers.record_error, _helpers.rel_l2

#: NVLink multicast off, in the parent and in every process it starts.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

WORLD_SIZE = 2
E_TOTAL, HIDDEN, INTER, TOP_K = 8, 256, 128, 2
DTYPE = torch.bfloat16
TOKENS = (1, 7, 64)
OUT_DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = 1e-2  # relative L2 error against reference_moe, bf16 inputs
#: The all-reduced float32 output of EP ranks running the same tactics as the one-GPU call on
#: all experts: every (token, choice) product is computed by the same kernel code, only the
#: fp32 sums over choices may be grouped differently.
SAME_TACTICS_TOLERANCE = 1e-5
#: The test's own slicing, checked with reference_moe alone (float32 reassociation only).
SLICING_TOLERANCE = 1e-5

_TIMEOUT_S = 300.0  # one check on all ranks, process start and NCCL set-up included
_COLLECTIVE_TIMEOUT = timedelta(seconds=120)
_ERROR_TAG = "CUTLASS_MOE_REL_L2"  # "TAG key value" lines: the parent records them
_THIS_FILE = pathlib.Path(__file__).resolve()


# ------------------------------------------------------------------------------------ the layer


class Layer(NamedTuple):
    fc1: torch.Tensor  # [E, 2I, H], rows [up | gate]
    fc2: torch.Tensor  # [E, H, I]
    b1: torch.Tensor | None  # [E, 2I]
    b2: torch.Tensor | None  # [E, H]

    def to(self, device: torch.device) -> Layer:
        return Layer(*(None if t is None else t.contiguous().to(device) for t in self))


def full_layer(seed: int) -> Layer:
    """The whole layer on the CPU, the same on every rank: weights from N(0, 1/fan_in), biases
    large enough that a bias added twice or not at all is far outside the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    fc1 = torch.randn(E_TOTAL, 2 * INTER, HIDDEN, generator=gen) * HIDDEN**-0.5
    fc2 = torch.randn(E_TOTAL, HIDDEN, INTER, generator=gen) * INTER**-0.5
    b1 = torch.randn(E_TOTAL, 2 * INTER, generator=gen) * 0.5
    b2 = torch.randn(E_TOTAL, HIDDEN, generator=gen) * 0.5
    return Layer(fc1.to(DTYPE), fc2.to(DTYPE), b1.to(DTYPE), b2.to(DTYPE))


def expert_slice(layer: Layer, rank: int, world_size: int) -> Layer:
    """Expert parallelism: rank r holds global experts [r*E_local, (r+1)*E_local) of every
    tensor, biases included."""
    local = E_TOTAL // world_size
    experts = slice(rank * local, (rank + 1) * local)
    return Layer(*(None if t is None else t[experts].contiguous() for t in layer))


def inter_slice(layer: Layer, rank: int, world_size: int) -> Layer:
    """Tensor parallelism: rank r holds columns [r*I/n, (r+1)*I/n) of I: fc1's up rows and gate
    rows of that range, concatenated as [up_r; gate_r]; fc2's columns of that range; the fc1
    bias like fc1's rows; the whole fc2 bias (the op adds it on tp_rank 0 only)."""
    part = INTER // world_size
    cols = slice(rank * part, (rank + 1) * part)

    def gated_rows(t: torch.Tensor) -> torch.Tensor:  # [E, 2I, ...] -> [E, 2I/n, ...]
        up, gate = t[:, :INTER], t[:, INTER:]
        return torch.cat([up[:, cols], gate[:, cols]], dim=1).contiguous()

    return Layer(
        gated_rows(layer.fc1),
        layer.fc2[:, :, cols].contiguous(),
        None if layer.b1 is None else gated_rows(layer.b1),
        layer.b2,
    )


def empty_experts(world_size: int) -> list[int]:
    """One expert per rank (its local expert 1) that no token is routed to."""
    local = E_TOTAL // world_size
    return [r * local + 1 for r in range(world_size)] if local > 1 else []


def tokens(num_tokens: int, seed: int, world_size: int, routing: str = "mixed"):
    """``(x [T, H] bf16, ids [T, k] int32, scales [T, k] float32)`` on the CPU, the same on every
    rank. Softmax/top-k routing over all experts (so most tokens have choices on both ranks),
    one expert per rank left without rows, and ids outside every range: row 0's last choice is
    -1, row 1's first is E_TOTAL, row 2 has no valid choice at all (its output row is zero).
    ``routing="last_rank_only"`` sends every valid choice to the last rank's experts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(DTYPE)
    logits = torch.randn(num_tokens, E_TOTAL, generator=gen)
    logits[:, empty_experts(world_size)] = float("-inf")
    if routing == "last_rank_only":
        logits[:, : E_TOTAL - E_TOTAL // world_size] = float("-inf")
    elif routing != "mixed":
        raise ValueError(routing)
    scales, ids = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)
    scales = scales / scales.sum(dim=-1, keepdim=True)
    ids = ids.to(torch.int32)
    ids[0, TOP_K - 1] = -1
    if num_tokens > 1:
        ids[1, 0] = E_TOTAL
    if num_tokens > 2:
        ids[2] = torch.where(torch.arange(TOP_K) % 2 == 0, -5, E_TOTAL + 3).to(torch.int32)
    return x, ids, scales.to(torch.float32)


# ---------------------------------------------------------------------- helpers of the checks


def _call_into(out: torch.Tensor, x, ids, scales, layer: Layer, **kwargs) -> None:
    """``cutlass_fused_moe`` of ``layer`` writing ``out`` (its dtype is the output dtype)."""
    result = cutlass_fused_moe(x, ids, scales, layer.fc1, layer.fc2, out.dtype,
                               fc1_expert_biases=layer.b1, fc2_expert_biases=layer.b2,
                               output=out, **kwargs)
    assert result[0] is out


def _moe(x, ids, scales, layer: Layer, out_dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """``cutlass_fused_moe`` into a NaN-poisoned ``output=``, checked to be fully written."""
    out = torch.full((x.shape[0], HIDDEN), float("nan"), dtype=out_dtype, device=x.device)
    _call_into(out, x, ids, scales, layer, **kwargs)
    assert not out.isnan().any(), "some output elements were not written"
    return out


def _reference(x, ids, scales, layer: Layer, **parallel: int) -> torch.Tensor:
    return reference_moe(x, ids, scales, layer.fc1, layer.fc2, fc1_expert_biases=layer.b1,
                         fc2_expert_biases=layer.b2, **parallel)


def _last_tactics() -> tuple[str, str]:
    """The tactics the most recent call of this process ran (to force them on another call)."""
    tuner = autotuner.get_tuner()
    chosen = tuner.last_selection(1), tuner.last_selection(2)
    assert chosen[0] is not None and chosen[1] is not None, "no tactic was selected"
    return chosen[0].tactic, chosen[1].tactic


def _all_reduce(out: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in float32 (a bf16 output is converted before the all-reduce)."""
    summed = out.to(torch.float32).clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def _expect_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str,
                  key: str | None = None) -> None:
    err = rel_l2(out.float(), ref.float())
    if key is not None:
        print(f"{_ERROR_TAG} {key} {err!r}", flush=True)
    assert err <= tol, f"{what}: relative L2 error {err:.3g} > {tol:g}"


def _same_on_all_ranks(what: str, *tensors: torch.Tensor) -> None:
    """Checks that every rank holds the same tensors (the seeded generators agree)."""
    prints = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()])
                          for t in tensors]).reshape(-1)
    low, high = prints.clone(), prints.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    assert torch.equal(low, high), f"the ranks do not hold the same {what}"


def _out_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- the checks


def check_expert_parallel(rank: int, world_size: int, device: torch.device) -> None:
    """ep_size = world_size: rank r runs its experts' slice on the same tokens and global ids;
    the all-reduced output equals reference_moe and the one-GPU cutlass_fused_moe on all
    experts; each rank's own output equals reference_moe of its experts."""
    cpu_layer = full_layer(seed=1)
    full = cpu_layer.to(device)
    local = expert_slice(cpu_layer, rank, world_size).to(device)
    slices = [expert_slice(cpu_layer, r, world_size).to(device) for r in range(world_size)]
    _same_on_all_ranks("weights", *full)
    par = {"ep_size": world_size, "ep_rank": rank}
    cases = [(t, "mixed") for t in TOKENS] + [(7, "last_rank_only")]
    for num_tokens, routing in cases:
        x, ids, scales = (t.to(device) for t in tokens(num_tokens, 100 + num_tokens, world_size,
                                                       routing))
        _same_on_all_ranks("tokens", x, ids, scales)
        ref = _reference(x, ids, scales, full)
        case = f"rank {rank}, T={num_tokens}, {routing} routing"
        # The test's own slicing, with the reference alone.
        parts = sum(_reference(x, ids, scales, s, ep_size=world_size, ep_rank=r)
                    for r, s in enumerate(slices))
        _expect_close(parts, ref, SLICING_TOLERANCE, f"{case}: the expert slices' references")
        if num_tokens == 64:  # the routing covers what it should
            owner = torch.where(ids >= 0, ids // (E_TOTAL // world_size), -1)
            assert all((owner == r).any() for r in range(world_size)), case
        for out_dtype in OUT_DTYPES:
            where = f"{case}, {_out_name(out_dtype)} output"
            single = _moe(x, ids, scales, full, out_dtype)
            same_tactics = _last_tactics()
            partial = _moe(x, ids, scales, local, out_dtype, tactics=same_tactics, **par)
            _expect_close(partial, _reference(x, ids, scales, local, **par), TOLERANCE,
                          f"{where}: this rank's output vs reference_moe of its experts")
            if routing == "last_rank_only" and rank != world_size - 1:
                assert torch.count_nonzero(partial) == 0, f"{where}: a rank without rows"
            summed = _all_reduce(partial)
            _expect_close(summed, ref, TOLERANCE,
                          f"{where}: all-reduced output vs reference_moe on all experts",
                          key=_out_name(DTYPE))
            bound = SAME_TACTICS_TOLERANCE if out_dtype == torch.float32 else TOLERANCE
            _expect_close(summed, single, bound,
                          f"{where}: all-reduced output vs one-GPU cutlass_fused_moe "
                          f"(tactics {same_tactics})",
                          key=f"ep{world_size}_vs_one_gpu_{_out_name(out_dtype)}_output")
            if num_tokens > 2:
                assert torch.count_nonzero(summed[2]) == 0, f"{where}: row 2 has no valid id"


def check_tensor_parallel(rank: int, world_size: int, device: torch.device) -> None:
    """tp_size = world_size: rank r runs its slice of I; the all-reduced output equals the full
    layer; each rank's own output equals reference_moe of its slice (fc2 bias on rank 0
    only), and on other ranks the fc2 bias changes nothing."""
    cpu_layer = full_layer(seed=2)
    full = cpu_layer.to(device)
    local = inter_slice(cpu_layer, rank, world_size).to(device)
    slices = [inter_slice(cpu_layer, r, world_size).to(device) for r in range(world_size)]
    _same_on_all_ranks("weights", *full)
    par = {"tp_size": world_size, "tp_rank": rank}
    for num_tokens in TOKENS:
        x, ids, scales = (t.to(device) for t in tokens(num_tokens, 200 + num_tokens,
                                                       world_size))
        _same_on_all_ranks("tokens", x, ids, scales)
        ref = _reference(x, ids, scales, full)
        case = f"rank {rank}, T={num_tokens}"
        parts = sum(_reference(x, ids, scales, s, tp_size=world_size, tp_rank=r)
                    for r, s in enumerate(slices))
        _expect_close(parts, ref, SLICING_TOLERANCE, f"{case}: the I slices' references")
        for out_dtype in OUT_DTYPES:
            where = f"{case}, {_out_name(out_dtype)} output"
            partial = _moe(x, ids, scales, local, out_dtype, **par)
            same_tactics = _last_tactics()
            _expect_close(partial, _reference(x, ids, scales, local, **par), TOLERANCE,
                          f"{where}: this rank's output vs reference_moe of its slice")
            unbiased = _moe(x, ids, scales, local._replace(b2=None), out_dtype,
                            tactics=same_tactics, **par)
            if rank == 0:
                assert not torch.equal(partial, unbiased), f"{where}: fc2 bias not added"
            else:
                assert torch.equal(partial, unbiased), f"{where}: fc2 bias added off rank 0"
            summed = _all_reduce(partial)
            _expect_close(summed, ref, TOLERANCE,
                          f"{where}: all-reduced output vs reference_moe of the full layer",
                          key=_out_name(DTYPE))


def _check_graph(mode: str, rank: int, world_size: int, device: torch.device) -> None:
    """Per rank: one call captured in a CUDA graph (after an eager warm-up on a side stream),
    replayed with new tokens and routing copied into the captured tensors; each replay equals
    an eager call with the same inputs and tactics bitwise, and its all-reduce (outside the
    graph) equals reference_moe of the full layer."""
    cpu_layer = full_layer(seed=3)
    full = cpu_layer.to(device)
    if mode == "ep":
        local = expert_slice(cpu_layer, rank, world_size).to(device)
        par = {"ep_size": world_size, "ep_rank": rank}
    else:
        local = inter_slice(cpu_layer, rank, world_size).to(device)
        par = {"tp_size": world_size, "tp_rank": rank}
    for num_tokens in TOKENS:
        for out_dtype in OUT_DTYPES:
            where = f"rank {rank}, {mode}, T={num_tokens}, {_out_name(out_dtype)} output"
            x, ids, scales = (t.to(device) for t in tokens(num_tokens, 300, world_size))
            static_x, static_ids, static_scales = x.clone(), ids.clone(), scales.clone()
            static_out = torch.empty(num_tokens, HIDDEN, dtype=out_dtype, device=device)
            static = (static_out, static_x, static_ids, static_scales, local)
            torch.cuda.synchronize(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up outside capture (first-call set-up)
                _call_into(*static, **par)
            torch.cuda.current_stream(device).wait_stream(side)
            chosen = _last_tactics()
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's calls are checked during capture, not the NCCL
            # watchdog's event queries on work from earlier all-reduces.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                _call_into(*static, tactics=chosen, **par)
            for seed in (301, 302, 303):
                x, ids, scales = (t.to(device) for t in tokens(num_tokens, seed, world_size))
                static_x.copy_(x)
                static_ids.copy_(ids)
                static_scales.copy_(scales)
                static_out.fill_(float("nan"))
                graph.replay()
                eager = _moe(x, ids, scales, local, out_dtype, tactics=chosen, **par)
                assert torch.equal(static_out, eager), \
                    f"{where}, seed {seed}: replay differs from the eager call ({chosen})"
                summed = _all_reduce(static_out)
                _expect_close(summed, _reference(x, ids, scales, full), TOLERANCE,
                              f"{where}, seed {seed}: all-reduced replay vs reference_moe",
                              key=_out_name(DTYPE))
            del graph
            torch.cuda.synchronize(device)


def check_expert_parallel_graph(rank: int, world_size: int, device: torch.device) -> None:
    _check_graph("ep", rank, world_size, device)


def check_tensor_parallel_graph(rank: int, world_size: int, device: torch.device) -> None:
    _check_graph("tp", rank, world_size, device)


CHECKS: dict[str, Callable[[int, int, torch.device], None]] = {
    "expert_parallel": check_expert_parallel,
    "tensor_parallel": check_tensor_parallel,
    "expert_parallel_graph": check_expert_parallel_graph,
    "tensor_parallel_graph": check_tensor_parallel_graph,
}


# ------------------------------------------------------------------------ one process per GPU


def child_main(argv: list[str]) -> int:
    """One rank (``python tests/test_multi_gpu.py CHECK``, or under torchrun): device, NCCL
    process group, the check, the group destroyed. On failure the traceback goes to stderr
    and the exit status is 1; the group is then left alone, since another rank may be blocked
    in a collective with it (the parent stops that rank)."""
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: {_THIS_FILE.name} {{{','.join(CHECKS)}}} (with RANK, WORLD_SIZE, "
              "MASTER_ADDR and MASTER_PORT set, as torchrun does)", file=sys.stderr)
        return 2
    check = argv[0]
    os.environ.update(MULTICAST_OFF)  # before anything reads them
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    try:
        assert E_TOTAL % world_size == 0 and INTER % (8 * world_size) == 0, \
            f"{world_size} ranks do not divide E={E_TOTAL} and I={INTER}"
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size,
                                timeout=_COLLECTIVE_TIMEOUT)
        CHECKS[check](rank, world_size, device)
        torch.cuda.synchronize(device)
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    print(f"rank {rank}: {check} passed", flush=True)
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _record_errors(outputs: list[str]) -> None:
    for output in outputs:
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == _ERROR_TAG:
                record_error(parts[1], float(parts[2]))


def run_ranks(check: str, log_dir: pathlib.Path, world_size: int = WORLD_SIZE,
              timeout_s: float = _TIMEOUT_S) -> None:
    """Runs ``check`` in ``world_size`` child processes (rank r on GPU r) and waits for all of
    them; raises AssertionError with the output of the rank that failed first, or of every
    rank when they ran past ``timeout_s``."""
    env = dict(os.environ)
    env.update(MULTICAST_OFF)
    env.pop("CUTLASS_MOE_CHECK_INPUTS", None)  # the checks pass out-of-range ids on purpose
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world_size), PYTHONUNBUFFERED="1")
    logs = [log_dir / f"{check}-rank{rank}.log" for rank in range(world_size)]
    procs: list[subprocess.Popen] = []
    failed: int | None = None
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as sink:
                procs.append(subprocess.Popen(
                    [sys.executable, str(_THIS_FILE), check],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # a rank still running after another failed waits in a collective
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    _record_errors(outputs)
    if failed is not None:
        raise AssertionError(
            f"{check}: rank {failed} of {world_size} failed (exit status "
            f"{procs[failed].returncode}):\n{_tail(outputs[failed])}")
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- rank {r} (exit status {p.returncode}):\n{_tail(out, 30)}"
                           for r, (p, out) in enumerate(zip(procs, outputs)))
        raise AssertionError(f"{check}: the ranks ran past {timeout_s:.0f} s\n{report}")


# ------------------------------------------------------------------------------------ tests


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skips without two CUDA devices and NCCL; sets the multicast variables in this process
    too (the children get them from ``run_ranks`` as well)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"needs {WORLD_SIZE} CUDA devices, this process sees "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this PyTorch build has no NCCL backend for torch.distributed")
    for name, value in MULTICAST_OFF.items():
        monkeypatch.setenv(name, value)


@pytest.mark.gpu
def test_expert_parallel_all_reduce_matches_full_layer(two_gpus, tmp_path):
    run_ranks("expert_parallel", tmp_path)


@pytest.mark.gpu
def test_tensor_parallel_all_reduce_matches_full_layer(two_gpus, tmp_path):
    run_ranks("tensor_parallel", tmp_path)


@pytest.mark.gpu
def test_expert_parallel_cuda_graph_replay(two_gpus, tmp_path):
    run_ranks("expert_parallel_graph", tmp_path)


@pytest.mark.gpu
def test_tensor_parallel_cuda_graph_replay(two_gpus, tmp_path):
    run_ranks("tensor_parallel_graph", tmp_path)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
