"""Assembling an MoE layer's kernel tensors from per-expert projections read out of a
checkpoint: the part the int4 and FP8 importers share (``load_int4_experts``,
``load_fp8_experts``). fc1 is ``[up; gate]`` (the kernels' row order), fc2 is ``down``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def read_expert_layers(
    func: str,
    prefix: str,
    num_experts: int,
    fc1_parts: Sequence[str],
    down: str,
    read: Callable[[str], Any],
    arrays: Callable[[Any], tuple[tuple[str, torch.Tensor], ...]],
    check: Callable[[Any, Any, str, str], None] | None = None,
) -> dict[str, list[Any]]:
    """``{projection: [layer of expert 0, 1, ...]}`` with ``read(f"{prefix}.{e}.{proj}")``.

    Every expert of a projection, and fc1's parts among themselves, must agree in the shapes of
    ``arrays(layer)`` (named tensors, e.g. weights and scales): a ValueError starting with
    ``func`` names the first disagreeing tensor. ``check(layer, first, where, first_where)``
    adds a format's own rule between a layer and the first one of its GEMM."""
    layers: dict[str, list[Any]] = {p: [] for p in (*fc1_parts, down)}
    first: dict[str, tuple[str, Any]] = {}
    for e in range(num_experts):
        for proj in (*fc1_parts, down):
            where = f"{prefix}.{e}.{proj}"
            layer = read(where)
            role = "fc2" if proj == down else "fc1"
            if role in first:
                name0, ref = first[role]
                for (what, a), (_, b) in zip(arrays(layer), arrays(ref)):
                    if a.shape != b.shape:
                        same = down if role == "fc2" else " and ".join(fc1_parts)
                        raise ValueError(
                            f"{func}: {where} has {what} {list(a.shape)} (kernel layout) but "
                            f"{name0} has {list(b.shape)}: {same} of every expert must have one "
                            "shape and group size")
                if check is not None:
                    check(layer, ref, where, name0)
            else:
                first[role] = (where, layer)
            layers[proj].append(layer)
    return layers


def stack_experts(layers: dict[str, list[Any]], fc1_parts: Sequence[str], down: str,
                  tensor: Callable[[Any], torch.Tensor], dim: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fc1 [E, ...], fc2 [E, ...])`` of one per-layer tensor: fc1 joins fc1's parts along
    ``dim`` (0: weight rows; -1: the columns of ``[K/G, N]`` scales)."""
    fc1 = torch.stack([torch.cat([tensor(layers[p][e]) for p in fc1_parts], dim=dim)
                       for e in range(len(layers[down]))])
    fc2 = torch.stack([tensor(layer) for layer in layers[down]])
    return fc1, fc2
