// Elementwise stage between GEMM1 and GEMM2: fc1 bias, then the activation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {

// Optional parameters of the activations that take any (device pointers, null = absent).
struct ActivationParams {
  const float* swiglu_alpha = nullptr;         // [E] Swiglu (clamped form)
  const float* swiglu_beta = nullptr;          // [E] Swiglu
  const float* swiglu_limit = nullptr;         // [E] Swiglu; SwigluStep (default 7)
  const float* situ_beta = nullptr;            // [E] Situ (default 4)
  const float* situ_linear_beta = nullptr;     // [E] Situ (default 25)
  const float* clamped_relu2_limit = nullptr;  // [1] ClampedRelu2, model-wide
};

// For each permuted row d < expert_first_token_offset[E] with local expert e = permuted_expert[d]:
//   h = fc1_out[d, :] (+ fc1_bias[e, :] when non-null)          (N1 = 2I gated, else I columns)
//   gated:     up = h[:I], gate = h[I:]
//     swiglu:      a = up * silu(gate)
//                  clamped (any of swiglu_alpha/beta/limit non-null; missing: 1, 0, +inf):
//                    g = min(gate, limit[e]); u = clamp(up, -limit[e], limit[e]) + beta[e];
//                    a = g * sigmoid(alpha[e] * g) * u
//     geglu:       a = up * gelu(gate)                          (erf GELU)
//     geglu_tanh:  a = up * gelu_tanh(gate)
//     swiglu_step: a = min(silu(gate), L) * clamp(up, -L, L), L = swiglu_limit[e] or 7
//     situ:        a = b*tanh(gate/b)*sigmoid(gate) * lb*tanh(up/lb),
//                  b = situ_beta[e] or 4, lb = situ_linear_beta[e] or 25
//   others:    a = act(h)  (identity, relu, gelu (erf), silu, relu2 = relu(h)^2,
//                           clamped_relu2 = (L * tanh(relu(h) / L))^2 with L = limit[0])
// act_out[d, :] = a, rounded to dtype; math in fp32. Rows past the kept count are untouched.
// permuted_expert is needed with a bias or per-expert parameters. ClampedRelu2 without
// clamped_relu2_limit computes with L = 1 (the tuner's timing runs only; run_moe refuses it).
void launch_activation(DType dtype, Activation activation, const void* fc1_out, void* act_out,
                       int64_t expanded_rows, int64_t inter_size,
                       const int64_t* expert_first_token_offset, int num_experts,
                       const int32_t* permuted_expert, const void* fc1_bias,
                       const ActivationParams& params, cudaStream_t stream, bool pdl = false);

}  // namespace cutlass_moe
