// Elementwise stage between GEMM1 and GEMM2: fc1 bias, then the activation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {

// For each permuted row d < expert_first_token_offset[E] with local expert e = permuted_expert[d]:
//   h = fc1_out[d, :] (+ fc1_bias[e, :] when non-null)          (N1 = 2I gated, else I columns)
//   gated:     up = h[:I], gate = h[I:]
//     swiglu:  a = up * silu(gate)
//              clamped (alpha/beta/limit non-null, per expert):
//                g = min(gate, limit[e]); u = clamp(up, -limit[e], limit[e]) + beta[e];
//                a = g * sigmoid(alpha[e] * g) * u
//     geglu:   a = up * gelu(gate)
//   others:    a = act(h)  (identity, relu, gelu (erf), silu)
// act_out[d, :] = a, rounded to dtype; math in fp32. Rows past the kept count are untouched.
void launch_activation(DType dtype, Activation activation, const void* fc1_out, void* act_out,
                       int64_t expanded_rows, int64_t inter_size,
                       const int64_t* expert_first_token_offset, int num_experts,
                       const int32_t* permuted_expert, const void* fc1_bias,
                       const float* swiglu_alpha, const float* swiglu_beta,
                       const float* swiglu_limit, cudaStream_t stream, bool pdl = false);

}  // namespace cutlass_moe
