// MoeRunner: one per (activation dtype, weight dtype, output dtype); enumerates tactics, sizes the
// workspace and runs a whole MoE call (or a single GEMM for profiling) on a CUDA stream.
//
// Python binding (cutlass_moe._C.MoeRunner), pointers passed as integers (0 = null):
//   MoeRunner(act_dtype: int, weight_dtype: int, out_dtype: int)        DType values
//   .tactics(gemm: int) -> list[dict]      runnable on the current device; gemm is 1 or 2
//   .all_tactics(gemm: int) -> list[dict]  compiled into this build, runnable or not
//       dict keys: name, gemm, tile_m, tile_n, tile_k, warp_m, warp_n, warp_k, stages,
//                  smem_bytes, threads, runnable, act_dtype, weight_dtype ("fp16", "int8", ...),
//                  gated, activations, split_k (GEMM2 split over K into this many fp32 partial
//                  sums, 1 for none; such tactics run only up to SPLIT_K_MAX_ROWS rows T*k)
//   .workspace_size(num_tokens, hidden_size, inter_size, num_experts, top_k, activation,
//            tactic1="", tactic2="", has_fc1_bias=False) -> int
//       bytes run_moe needs with these tactics ("": any tactic of that GEMM, the most any
//       needs) and fc1 bias presence (which decides whether the activation stage runs after a
//       plain GEMM1 with Identity); see MoeRunner::workspace_size.
//   .pdl_supported() -> bool   programmatic dependent launch is used on the current device
//   .run_moe(num_tokens, hidden_size, inter_size, num_experts, top_k, expert_start, activation,
//            input, token_selected_experts, token_final_scales, fc1_weights, fc2_weights,
//            fc1_bias, fc2_bias, swiglu_alpha, swiglu_beta, swiglu_limit, output,
//            workspace, workspace_bytes, tactic1: str, tactic2: str, stream: int,
//            fc1_scales=0, fc2_scales=0, enable_pdl=True, situ_beta=0, situ_linear_beta=0,
//            clamped_relu2_limit=0, fc1_zeros=0, fc2_zeros=0, fc1_group_size=0,
//            fc2_group_size=0) -> None
//       activation: an Activation value (problem.h). swiglu_alpha/beta/limit, situ_beta and
//       situ_linear_beta: optional [E] float32 (swiglu_limit is also SwigluStep's limit);
//       clamped_relu2_limit: [1] float32, required with ClampedRelu2.
//       int8 weights (weight_dtype kInt8): [E, N, K] row-major (K contiguous), with per-output-
//       channel scales fc1_scales [E, N1] and fc2_scales [E, H] in the activation dtype.
//       int4 weights (weight_dtype kInt4): bytes [E, N, K/2], two nibbles q per byte (low one
//       first along K); weight (n, k) = (q - zero) * scale with group-wise scales fc1_scales
//       [E, H/G1, N1], fc2_scales [E, I/G2, H] (G1 = fc1_group_size, G2 = fc2_group_size:
//       multiples of 32 dividing K; K itself is per-channel) and optional zero points
//       fc1_zeros/fc2_zeros shaped alike (both or neither; absent: zero = 8), all in the
//       activation dtype. H and I must be multiples of 32.
//       fp8 weights (kFp8E4m3): e4m3 [E, N, K] with float32 scales [E, K/G, N]; mxfp4 weights
//       (kMxfp4): e2m1 bytes [E, N, K/2] (low nibble first) with e8m0 scales [E, K/32, N] and
//       group sizes 32. Neither takes zero points.
//   .prepare_gemm_profile(gemm, num_tokens, hidden_size, inter_size, num_experts, top_k,
//            activation, weights, workspace, workspace_bytes, seed, stream, scales=0, zeros=0,
//            group_size=0) -> None
//       writes synthetic routing (seed 0: balanced rows per expert; otherwise uniform random
//       experts drawn from the seed) and random GEMM inputs into the workspace.
//   .run_gemm_profile(gemm, tactic: str, num_tokens, hidden_size, inter_size, num_experts, top_k,
//            activation, workspace, workspace_bytes, stream, group_size=0) -> None
//       runs only that GEMM on what prepare_gemm_profile left in the workspace (for the tuner);
//       int4: both calls take that GEMM's group size.
//       Both profiling calls need workspace_size(...) with no tactic names.
//   _fail_cuda_call_for_tests() -> None   (module function, for tests)
//       makes one CUDA runtime call that fails without side effects, so always raises
//       RuntimeError; a later call must not see that error again.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "cutlass_moe/problem.h"
#include "cutlass_moe/tactic.h"

namespace cutlass_moe {

class MoeRunner {
 public:
  MoeRunner(DType act_dtype, DType weight_dtype, DType out_dtype);
  ~MoeRunner();

  DType act_dtype() const { return act_dtype_; }
  DType weight_dtype() const { return weight_dtype_; }
  DType out_dtype() const { return out_dtype_; }

  // Tactics for GEMM `gemm` (1 or 2): all compiled ones, or only those this device can run.
  std::vector<TacticDescriptor> tactics(int gemm, bool runnable_only) const;

  // Workspace bytes run_moe needs for `problem` with these tactics. Buffers are reserved only
  // for what the tactics use: a plain GEMM1 needs the gathered rows [T*k, H] and its output
  // [T*k, N1], plus [T*k, I] when the activation stage runs (not for Identity without fc1 bias);
  // a fused gated GEMM1 needs only [T*k, I]; GEMM2 needs [T*k, H] (shared with the gathered
  // rows), or fp32 partial sums [splits, T*k, H] when split over K. An empty name stands for any
  // tactic of that GEMM (the most any of them needs, which profiling also uses). Unknown
  // tactics, a fused gated one with a non-gated activation and a split one for more than
  // kSplitKMaxRows rows raise InvalidArgument, as in run_moe (runnability is not checked).
  size_t workspace_size(const MoeProblem& problem, const std::string& tactic1 = "",
                        const std::string& tactic2 = "", bool has_fc1_bias = false) const;

  // Whether run_moe(..., enable_pdl=true) launches with programmatic dependent launch on the
  // current device: an sm_90+ GPU running code built for sm_90+.
  bool pdl_supported() const;

  // enable_pdl: launch the call's kernels as programmatic dependents of one another (and of
  // the stream's previous kernel) where the GPU and the build support it (sm_90+).
  // ptrs.workspace_bytes must be at least workspace_size(problem, tactic1, tactic2,
  // ptrs.fc1_bias != nullptr); a smaller workspace raises InvalidArgument naming both sizes.
  void run_moe(const MoeProblem& problem, const MoePointers& ptrs, const std::string& tactic1,
               const std::string& tactic2, cudaStream_t stream, bool enable_pdl = true) const;

  void prepare_gemm_profile(int gemm, const MoeProblem& problem, const void* weights,
                            const void* scales, const void* zeros, void* workspace,
                            size_t workspace_bytes, uint64_t seed, cudaStream_t stream) const;

  void run_gemm_profile(int gemm, const std::string& tactic, const MoeProblem& problem,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) const;

 private:
  struct Impl;
  DType act_dtype_, weight_dtype_, out_dtype_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cutlass_moe
