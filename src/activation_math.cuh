// The activation formulas, in fp32, shared by the elementwise activation kernel and the fused
// gated GEMM1 epilogue so that both paths compute the same function.
//
// Comparisons are written so that NaN propagates, as in the torch reference (fmaxf/fminf would
// turn NaN into the other operand).
#pragma once

#include <math_constants.h>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {
namespace activation_math {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <Activation kAct>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kAct == Activation::kRelu) {
    return x < 0.0f ? 0.0f : x;
  } else if constexpr (kAct == Activation::kGelu || kAct == Activation::kGeglu) {
    constexpr float kInvSqrt2 = 0.70710678118654752440f;
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));  // exact (erf) GELU, not the tanh form
  } else if constexpr (kAct == Activation::kSilu || kAct == Activation::kSwiglu) {
    return x * sigmoid(x);
  } else {
    return x;  // identity
  }
}

// Clamped SwiGLU (gpt-oss) of one element: gate clamped above at `limit`, up clamped to
// [-limit, limit], then gate * sigmoid(alpha * gate) * (up + beta).
__device__ __forceinline__ float clamped_swiglu(float gate, float up, float alpha, float beta,
                                                float limit) {
  const float g = gate > limit ? limit : gate;
  float u = up > limit ? limit : up;
  u = u < -limit ? -limit : u;
  return g * sigmoid(alpha * g) * (u + beta);
}

// Per-expert parameters of the gated activations that take any (the clamped SwiGLU's alpha,
// beta and limit today); kernels fill it from the per-expert arrays.
struct GatedParams {
  float alpha = 1.0f;
  float beta = 0.0f;
  float limit = __builtin_huge_valf();
  bool clamped = false;
};

// A gated activation chosen at run time, for kernels that serve several (the decode kernels):
// act(gate) * up, or the clamped SwiGLU. `activation` is a gated Activation value.
__device__ __forceinline__ float gated(int activation, float gate, float up,
                                       const GatedParams& params) {
  if (activation == static_cast<int>(Activation::kGeglu)) {
    return up * activate<Activation::kGeglu>(gate);
  }
  if (params.clamped) {
    return clamped_swiglu(gate, up, params.alpha, params.beta, params.limit);
  }
  return up * activate<Activation::kSwiglu>(gate);
}

}  // namespace activation_math
}  // namespace cutlass_moe
