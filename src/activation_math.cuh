// The activation formulas, in fp32, shared by the elementwise activation kernel, the fused
// gated GEMM1 epilogue and the decode kernels so that every path computes the same function
// (docs/architecture.md, "Activations", lists them with their sources).
//
// Comparisons are written so that NaN propagates, as in the torch reference (fmaxf/fminf would
// turn NaN into the other operand).
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {
namespace activation_math {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Defaults of the per-expert parameters when their arrays are not given (FlashInfer's values:
// SwigluStepAdaptor::limit, DEFAULT_SITU_BETA, DEFAULT_SITU_LINEAR_BETA).
constexpr float kSwigluStepDefaultLimit = 7.0f;
constexpr float kSituDefaultBeta = 4.0f;
constexpr float kSituDefaultLinearBeta = 25.0f;

__device__ __forceinline__ float relu(float x) { return x < 0.0f ? 0.0f : x; }

// GELU, tanh approximation (CUTLASS's GELU_taylor, torch's gelu(approximate="tanh")):
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.79788456080286535588f;
  constexpr float kCubic = 0.044715f;
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kCubic * x * x * x)));
}

// The elementwise function of an ungated activation, or act() of a gated one that computes
// up * act(gate) (SwiGLU, GeGLU, GeGLU-tanh). ClampedRelu2 takes a limit: see clamped_relu2.
template <Activation kAct>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kAct == Activation::kRelu) {
    return relu(x);
  } else if constexpr (kAct == Activation::kRelu2) {
    const float r = relu(x);
    return r * r;
  } else if constexpr (kAct == Activation::kGelu || kAct == Activation::kGeglu) {
    constexpr float kInvSqrt2 = 0.70710678118654752440f;
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));  // exact (erf) GELU, not the tanh form
  } else if constexpr (kAct == Activation::kGegluTanh) {
    return gelu_tanh(x);
  } else if constexpr (kAct == Activation::kSilu || kAct == Activation::kSwiglu ||
                       kAct == Activation::kSwigluStep) {
    return x * sigmoid(x);
  } else {
    return x;  // identity
  }
}

// Clamped squared ReLU (megatron-core's clamped_squared_relu): (limit * tanh(relu(x) / limit))^2.
__device__ __forceinline__ float clamped_relu2(float x, float limit) {
  const float c = limit * tanhf(relu(x) / limit);
  return c * c;
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

// SwiGLU-step (Step-3.x models): min(silu(gate), limit) * clamp(up, -limit, limit).
__device__ __forceinline__ float swiglu_step(float gate, float up, float limit) {
  float g = activate<Activation::kSilu>(gate);
  g = g > limit ? limit : g;
  float u = up > limit ? limit : up;
  u = u < -limit ? -limit : u;
  return g * u;
}

// SiTU-GLU: (beta * tanh(gate / beta) * sigmoid(gate)) * (linear_beta * tanh(up / linear_beta));
// the sigmoid reads the uncapped gate.
__device__ __forceinline__ float situ(float gate, float up, float beta, float linear_beta) {
  return (beta * tanhf(gate / beta) * sigmoid(gate)) * (linear_beta * tanhf(up / linear_beta));
}

// Per-expert parameters of the gated activations, one expert's values. Build it with
// gated_params() below (what every kernel does), or by hand:
//   clamped          any of swiglu_alpha/beta/limit was given (Swiglu: the clamped form;
//                    SwigluStep: `limit` replaces the default 7)
//   alpha/beta/limit swiglu_alpha[e], swiglu_beta[e], swiglu_limit[e] (defaults 1, 0, +inf)
//   situ_beta        situ_beta[e] (default 4); situ_linear_beta: situ_linear_beta[e] (default 25)
struct GatedParams {
  float alpha = 1.0f;
  float beta = 0.0f;
  float limit = __builtin_huge_valf();
  bool clamped = false;
  float situ_beta = kSituDefaultBeta;
  float situ_linear_beta = kSituDefaultLinearBeta;
};

// One expert's GatedParams from a launch's optional per-expert [E] float32 arrays: `args` is any
// struct with the members swiglu_alpha, swiglu_beta, swiglu_limit, situ_beta and
// situ_linear_beta (GatedEpilogueArgs of tactic.h, the fused epilogue's and the activation
// kernel's parameter structs). Null arrays leave the defaults.
template <typename Args>
__device__ __forceinline__ GatedParams gated_params(const Args& args, int64_t expert) {
  GatedParams p;
  p.clamped = args.swiglu_alpha != nullptr || args.swiglu_beta != nullptr ||
              args.swiglu_limit != nullptr;
  if (args.swiglu_alpha != nullptr) p.alpha = args.swiglu_alpha[expert];
  if (args.swiglu_beta != nullptr) p.beta = args.swiglu_beta[expert];
  if (args.swiglu_limit != nullptr) p.limit = args.swiglu_limit[expert];
  if (args.situ_beta != nullptr) p.situ_beta = args.situ_beta[expert];
  if (args.situ_linear_beta != nullptr) p.situ_linear_beta = args.situ_linear_beta[expert];
  return p;
}

// A gated activation known at compile time (kAct with is_gated(kAct)) of one element.
template <Activation kAct>
__device__ __forceinline__ float gated(float gate, float up, const GatedParams& params) {
  static_assert(is_gated(kAct), "gated() needs a gated activation");
  if constexpr (kAct == Activation::kSwiglu) {
    return params.clamped ? clamped_swiglu(gate, up, params.alpha, params.beta, params.limit)
                          : up * activate<Activation::kSwiglu>(gate);
  } else if constexpr (kAct == Activation::kSwigluStep) {
    return swiglu_step(gate, up, params.clamped ? params.limit : kSwigluStepDefaultLimit);
  } else if constexpr (kAct == Activation::kSitu) {
    return situ(gate, up, params.situ_beta, params.situ_linear_beta);
  } else {
    return up * activate<kAct>(gate);  // Geglu, GegluTanh
  }
}

// A gated activation chosen at run time, for kernels that serve several (the decode kernels):
// `activation` is a gated Activation value (is_gated); any other value computes SwiGLU.
__device__ __forceinline__ float gated(int activation, float gate, float up,
                                       const GatedParams& params) {
  switch (static_cast<Activation>(activation)) {
    case Activation::kGeglu:
      return gated<Activation::kGeglu>(gate, up, params);
    case Activation::kGegluTanh:
      return gated<Activation::kGegluTanh>(gate, up, params);
    case Activation::kSwigluStep:
      return gated<Activation::kSwigluStep>(gate, up, params);
    case Activation::kSitu:
      return gated<Activation::kSitu>(gate, up, params);
    default:
      return gated<Activation::kSwiglu>(gate, up, params);
  }
}

}  // namespace activation_math
}  // namespace cutlass_moe
