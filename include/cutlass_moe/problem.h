// One MoE call: shapes, options and device pointers shared by routing, GEMMs and finalize.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cutlass_moe {

// Element types crossing the Python boundary (values are part of the binding's ABI).
enum class DType : int {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kInt8 = 3,
  kInt4 = 4,      // weights only: two per byte, low nibble first, with group-wise scales
  kFp8E4m3 = 5,   // weights only: e4m3, float32 group-wise scales
  kMxfp4 = 6,     // weights only: e2m1 two per byte, e8m0 scales per 32 weights
};

// Weights dequantised by the group-scaled mainloop: [K/G, N] scales per expert.
constexpr bool is_group_scaled(DType t) {
  return t == DType::kInt4 || t == DType::kFp8E4m3 || t == DType::kMxfp4;
}

// Activations between GEMM1 and GEMM2 (values are part of the binding's ABI; Python's
// ActivationType carries FlashInfer's values and _ext maps them to these). Formulas: see
// docs/architecture.md, "Activations", and activation_math.cuh. Gated ones read GEMM1's 2I
// columns as up = h[:, :I], gate = h[:, I:].
enum class Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,           // exact (erf) GELU
  kSilu = 3,
  kSwiglu = 4,         // gated: a = up * silu(gate); clamped (gpt-oss) with swiglu_alpha/beta/limit
  kGeglu = 5,          // gated: a = up * gelu(gate), erf GELU
  kRelu2 = 6,          // a = relu(h)^2
  kSwigluStep = 7,     // gated: a = min(silu(gate), L) * clamp(up, -L, L), L = swiglu_limit[e] or 7
  kGegluTanh = 8,      // gated: a = up * gelu_tanh(gate)
  kSitu = 9,           // gated: a = b*tanh(gate/b)*sigmoid(gate) * lb*tanh(up/lb), b = 4, lb = 25
                       //        unless situ_beta[e] / situ_linear_beta[e] are given
  kClampedRelu2 = 10,  // a = (L * tanh(relu(h) / L))^2, L = clamped_relu2_limit[0] (model-wide)
};

// Number of Activation values: every value in [0, kActivationCount) names one.
constexpr int kActivationCount = 11;

constexpr bool is_valid_activation(int value) { return value >= 0 && value < kActivationCount; }

// Whether GEMM1 produces 2I columns [up | gate] for this activation (the one C++ rule).
constexpr bool is_gated(Activation act) {
  switch (act) {
    case Activation::kSwiglu:
    case Activation::kGeglu:
    case Activation::kSwigluStep:
    case Activation::kGegluTanh:
    case Activation::kSitu:
      return true;
    default:
      return false;
  }
}

// The activation's name as Python's ActivationType spells it ("Swiglu", "Relu2", ...), for messages.
inline const char* activation_name(Activation act) {
  switch (act) {
    case Activation::kIdentity: return "Identity";
    case Activation::kRelu: return "Relu";
    case Activation::kGelu: return "Gelu";
    case Activation::kSilu: return "Silu";
    case Activation::kSwiglu: return "Swiglu";
    case Activation::kGeglu: return "Geglu";
    case Activation::kRelu2: return "Relu2";
    case Activation::kSwigluStep: return "SwigluStep";
    case Activation::kGegluTanh: return "GegluTanh";
    case Activation::kSitu: return "Situ";
    case Activation::kClampedRelu2: return "ClampedRelu2";
  }
  return "unknown";
}

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kInt8:
      return 1;
    case DType::kFp8E4m3:
      return 1;
    case DType::kInt4:
    case DType::kMxfp4:
      return 0;  // not a whole byte: use dtype_bits
  }
  return 0;
}

inline size_t dtype_bits(DType t) {
  return t == DType::kInt4 || t == DType::kMxfp4 ? 4 : 8 * dtype_size(t);
}

// Bytes of one weight scale: int8 and int4 scales are in the activation dtype, fp8's float32,
// MXFP4's one e8m0 byte.
inline size_t scale_size(DType weight, DType act) {
  return weight == DType::kFp8E4m3 ? 4 : weight == DType::kMxfp4 ? 1 : dtype_size(act);
}

// Short name used in tactic names, messages and build info ("fp16", "bf16", "fp32", "int8").
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat32:
      return "fp32";
    case DType::kInt8:
      return "int8";
    case DType::kInt4:
      return "int4";
    case DType::kFp8E4m3:
      return "fp8";
    case DType::kMxfp4:
      return "mxfp4";
  }
  return "unknown";
}

// Shapes and options of one call. All sizes are this rank's local sizes.
struct MoeProblem {
  int64_t num_tokens = 0;   // T
  int64_t hidden_size = 0;  // H
  int64_t inter_size = 0;   // I (this TP rank's slice)
  int num_experts = 0;      // E_local
  int top_k = 0;            // k
  int expert_start = 0;     // first global expert id owned by this rank (ep_rank * E_local)
  Activation activation = Activation::kSwiglu;
  // Group-scaled weights only (int4, fp8, mxfp4): K elements per scale group of GEMM1 (K = H)
  // and GEMM2 (K = I); a group as long as K is per-channel; mxfp4: 32. 0 for other weights.
  int64_t fc1_group_size = 0;
  int64_t fc2_group_size = 0;

  int64_t expanded_rows() const { return num_tokens * top_k; }
  // Columns of GEMM1's output: 2*I for gated activations (up rows, then gate rows), else I.
  int64_t fc1_out_size() const { return is_gated(activation) ? 2 * inter_size : inter_size; }
};

// Device pointers of one call. Null means "absent" for the optional ones.
struct MoePointers {
  const void* input = nullptr;                     // [T, H] activation dtype
  const int32_t* token_selected_experts = nullptr;  // [T, k] global expert ids
  const float* token_final_scales = nullptr;        // [T, k]
  const void* fc1_weights = nullptr;                // [E, N1, H] weight dtype, N1 = fc1_out_size()
  const void* fc2_weights = nullptr;                // [E, H, I]  weight dtype
  const void* fc1_bias = nullptr;                   // [E, N1] activation dtype, optional
  const void* fc2_bias = nullptr;                   // [E, H]  activation dtype, optional
  // Weight scales: int8 [E, N1] / [E, H] (per channel, activation dtype); group-scaled formats
  // [E, H/G1, N1] / [E, I/G2, H] (per K-group of fc1_group_size / fc2_group_size elements):
  // int4 in the activation dtype, fp8 float32, mxfp4 e8m0 bytes.
  const void* fc1_scales = nullptr;
  const void* fc2_scales = nullptr;
  // int4 only, optional (both or neither): zero points shaped like the scales; a weight is
  // (q - zero) * scale, q the unsigned nibble; without them zero = 8 (symmetric).
  const void* fc1_zeros = nullptr;
  const void* fc2_zeros = nullptr;
  const float* swiglu_alpha = nullptr;              // [E] optional (clamped SwiGLU)
  const float* swiglu_beta = nullptr;               // [E] optional
  const float* swiglu_limit = nullptr;              // [E] optional (also SwigluStep's limit)
  const float* situ_beta = nullptr;                 // [E] optional (Situ; default 4)
  const float* situ_linear_beta = nullptr;          // [E] optional (Situ; default 25)
  const float* clamped_relu2_limit = nullptr;       // [1] ClampedRelu2's limit (required)
  void* output = nullptr;                           // [T, H] output dtype
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

}  // namespace cutlass_moe
