// The fused gated GEMM1's combining op: out = act(gate) * up on one access of both halves,
// where gate and up are GEMM1's two outputs (already rounded to the activation dtype, with the
// fc1 bias added, exactly as the unfused path's GEMM1 output is) and act is SiLU (SwiGLU),
// exact GELU (GeGLU), or gpt-oss's clamped SwiGLU.
#pragma once

#include <limits>

#include "activation_math.cuh"
#include "cutlass/array.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass_moe/problem.h"

namespace cutlass_moe {
namespace grouped_gemm {

// Launch-wide description of the gated activation; per-expert clamp values are looked up with
// the problem (local expert) index.
struct GatedActivationParams {
  int activation = static_cast<int>(Activation::kSwiglu);  // kSwiglu or kGeglu
  const float* swiglu_alpha = nullptr;                      // [E] each optional (SwiGLU only)
  const float* swiglu_beta = nullptr;
  const float* swiglu_limit = nullptr;
};

template <typename Element, int kCount>
class GatedActivationOp {
 public:
  using Fragment = cutlass::Array<Element, kCount>;

  CUTLASS_DEVICE
  GatedActivationOp(GatedActivationParams const& params, int expert)
      : geglu_(params.activation == static_cast<int>(Activation::kGeglu)),
        clamped_(!geglu_ && (params.swiglu_alpha != nullptr || params.swiglu_beta != nullptr ||
                             params.swiglu_limit != nullptr)),
        alpha_(params.swiglu_alpha != nullptr ? params.swiglu_alpha[expert] : 1.0f),
        beta_(params.swiglu_beta != nullptr ? params.swiglu_beta[expert] : 0.0f),
        limit_(params.swiglu_limit != nullptr ? params.swiglu_limit[expert] : std::numeric_limits<float>::infinity()) {}

  CUTLASS_DEVICE
  Fragment operator()(Fragment const& gate, Fragment const& up) const {
    cutlass::NumericArrayConverter<float, Element, kCount> to_float;
    cutlass::NumericArrayConverter<Element, float, kCount> to_output;
    const cutlass::Array<float, kCount> g = to_float(gate);
    const cutlass::Array<float, kCount> u = to_float(up);
    cutlass::Array<float, kCount> result;
    if (geglu_) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCount; ++i) {
        result[i] = u[i] * activation_math::activate<Activation::kGeglu>(g[i]);
      }
    } else if (clamped_) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCount; ++i) {
        result[i] = activation_math::clamped_swiglu(g[i], u[i], alpha_, beta_, limit_);
      }
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCount; ++i) {
        result[i] = u[i] * activation_math::activate<Activation::kSwiglu>(g[i]);
      }
    }
    return to_output(result);
  }

 private:
  bool geglu_;
  bool clamped_;
  float alpha_, beta_, limit_;
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
