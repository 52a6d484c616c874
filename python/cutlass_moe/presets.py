"""Shapes of the MoE layers of known models, for ``cutlass-moe tune`` / ``bench`` and the demo.

Every preset is one MoE layer with SwiGLU experts: ``E`` experts, hidden size ``H``, expert
intermediate size ``I`` (GEMM1 weights ``[E, 2*I, H]``, GEMM2 ``[E, H, I]``) and ``k`` experts per
token. gpt-oss uses the clamped SwiGLU (``swiglu_alpha``/``swiglu_beta``/``swiglu_limit``); the
clamp does not change which GEMM kernel is fastest, so it is tuned as plain Swiglu.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    """One MoE layer's shape, and gpt-oss's SwiGLU clamp where it has one."""

    num_experts: int
    hidden_size: int
    inter_size: int
    top_k: int
    swiglu_alpha: float | None = None
    swiglu_beta: float | None = None
    swiglu_limit: float | None = None

    @property
    def fc1_rows(self) -> int:
        """GEMM1's output columns ``N1``: ``2*I`` (every preset is SwiGLU-gated)."""
        return 2 * self.inter_size

    @property
    def clamped_swiglu(self) -> bool:
        """Whether the layer uses gpt-oss's clamped SwiGLU."""
        return any(v is not None for v in (self.swiglu_alpha, self.swiglu_beta,
                                           self.swiglu_limit))

    def describe(self) -> str:
        """``"E=8 H=4096 I=14336 k=2"`` (plus the clamp when there is one)."""
        text = f"E={self.num_experts} H={self.hidden_size} I={self.inter_size} k={self.top_k}"
        if self.clamped_swiglu:
            text += (f", clamped SwiGLU alpha={self.swiglu_alpha} beta={self.swiglu_beta} "
                     f"limit={self.swiglu_limit}")
        return text


#: The four models the benchmark was designed around (docs/architecture.md, "Benchmark"), all
#: with plain SwiGLU.
CORE_PRESETS: dict[str, ModelPreset] = {
    "mixtral-8x7b": ModelPreset(num_experts=8, hidden_size=4096, inter_size=14336, top_k=2),
    "qwen1.5-moe-a2.7b": ModelPreset(num_experts=60, hidden_size=2048, inter_size=1408, top_k=4),
    "qwen3-30b-a3b": ModelPreset(num_experts=128, hidden_size=2048, inter_size=768, top_k=8),
    "deepseek-v2-lite": ModelPreset(num_experts=64, hidden_size=2048, inter_size=1408, top_k=6),
}

#: Every preset the command line and the demo know: the four above and gpt-oss-20b.
MODEL_PRESETS: dict[str, ModelPreset] = {
    **CORE_PRESETS,
    "gpt-oss-20b": ModelPreset(num_experts=32, hidden_size=2880, inter_size=2880, top_k=4,
                               swiglu_alpha=1.702, swiglu_beta=1.0, swiglu_limit=7.0),
}
