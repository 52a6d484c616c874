// Tactics: compiled grouped-GEMM configurations, described by stable names.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {

// What a tactic is; `name` is stable across builds and is what caches store.
struct TacticDescriptor {
  std::string name;  // e.g. "sm80_bf16_bf16_m64n128k64_w32x64x64_s4"
  DType act_dtype = DType::kBFloat16;
  DType weight_dtype = DType::kBFloat16;
  int tile_m = 0, tile_n = 0, tile_k = 0;
  int warp_m = 0, warp_n = 0, warp_k = 0;
  int stages = 0;
  int threads = 0;
  int smem_bytes = 0;
  int gemms = 0;          // bit 0: GEMM1, bit 1: GEMM2
  bool gated = false;     // fused gated GEMM1 (gather + both halves + SwiGLU/GeGLU)
  int split_k = 1;        // GEMM2 split over K into this many fp32 partial sums (1: no split)
  bool decode = false;    // weight-streaming decode kernel (few rows per expert), not CUTLASS
  int required_cc = 0;    // GemmTactic::required_cc (90: sm_90a code, compute capability 9.0 only)
  bool runnable = false;  // fits this device's shared memory and occupancy (and compute capability)
};

// Device-resident arguments of one grouped GEMM: D_e = A_e (M_e x K, row-major) * B_e (K x N,
// column-major, i.e. the expert weight [N, K] row-major) for e < problem_count. Problem sizes,
// pointers and leading dimensions live in device memory and are written by a device kernel.
// Weight-only quantised tactics (weight_dtype kInt8) also scale output column n of problem e by
// ptr_scale[e][n] (N values in the activation dtype); 16-bit tactics ignore ptr_scale.
// int4 tactics (weight_dtype kInt4) read B_e as packed nibbles ([N, K/2] bytes, low nibble
// first; ldb counts elements, i.e. nibbles) and dequantise weight (n, k) as
// (q - zero) * scale with scale = ptr_scale[e][(k / group_size) * N + n] and zero likewise from
// ptr_zero[e] (null: 8). In the gated set N is I but the scale rows hold 2I columns.
//
// Fused gated GEMM1 tactics (GemmTactic::gated) read it differently: problem e has N = I (the
// output width); ptr_a[e] is the token matrix, whose rows ptr_rows[e][0..M_e) feed the problem;
// ptr_b[e] is the expert's [2I, K] weight (up rows, then gate rows); `gated` describes the
// activation and the optional fc1 bias [E, 2I].
struct GatedEpilogueArgs {
  int activation = 0;  // a gated Activation (is_gated): kSwiglu, kGeglu, kSwigluStep, kGegluTanh, kSitu
  const void* bias = nullptr;
  // Per-expert [E] float32 parameters, each optional (activation_math::gated_params reads them):
  const float* swiglu_alpha = nullptr;      // Swiglu: clamped SwiGLU (gpt-oss)
  const float* swiglu_beta = nullptr;       // Swiglu
  const float* swiglu_limit = nullptr;      // Swiglu; SwigluStep's limit (default 7)
  const float* situ_beta = nullptr;         // Situ (default 4)
  const float* situ_linear_beta = nullptr;  // Situ (default 25)
};

struct GroupedGemmArgs {
  int problem_count = 0;
  void* problem_sizes = nullptr;  // cutlass::gemm::GemmCoord[problem_count]
  void** ptr_a = nullptr;
  void** ptr_b = nullptr;
  void** ptr_d = nullptr;
  int64_t* lda = nullptr;
  int64_t* ldb = nullptr;
  int64_t* ldd = nullptr;
  void** ptr_scale = nullptr;  // [problem_count] weight scales (int8: [N]; int4: [K/G, N])
  void** ptr_zero = nullptr;   // [problem_count] int4 zero points [K/G, N] (null entries: 8)
  int group_size = 0;          // int4: K elements per scale group
  int32_t** ptr_rows = nullptr;  // [problem_count] row indices (gated tactics only)
  GatedEpilogueArgs gated;       // gated tactics only
  bool pdl = false;  // launch as a programmatic dependent of the stream's previous kernel
  // Device scratch of tactics with GemmTactic::workspace_bytes (the sm90 tactics' per-CTA TMA
  // descriptor copies), 128-byte aligned; other tactics ignore it. Written by the kernel itself
  // before it is read, so it needs no initialisation.
  void* kernel_workspace = nullptr;
  size_t kernel_workspace_bytes = 0;
};

// Most persistent CTAs a tactic with kernel workspace launches, and so what the runner reserves
// kernel workspace for: the SM count of a full GH100 die (no compute capability 9.0 GPU has
// more; a GPU with more SMs would run such a tactic on this many).
constexpr int kMaxPersistentCtas = 144;

// Tactics that split GEMM2 over K run only for calls of at most this many expanded rows (T*k):
// the decode regime, where few output tiles leave SMs idle. Their fp32 partial sums need
// workspace in proportion to T*k.
constexpr int64_t kSplitKMaxRows = 128;

// Grouped GEMMs walk an expert's row bands (tiles of TileM rows) in groups whose A rows take at
// most this many bytes (at least one band per group), column band by column band, so each weight
// column band streams from DRAM about once per group (src/grouped_gemm/tile_order.cuh).
constexpr int64_t kTileGroupBytes = int64_t(16) << 20;

// One compiled tactic: its static description and entry points. Generated registry tables list
// these (see tools/generate_kernels.py).
struct GemmTactic {
  const char* name;
  DType act_dtype;
  DType weight_dtype;
  int tile_m, tile_n, tile_k;
  int warp_m, warp_n, warp_k;
  int stages;
  int threads;
  int smem_bytes;  // sizeof(SharedStorage)
  int gemms;       // bit 0: usable for GEMM1, bit 1: usable for GEMM2
  bool gated;      // fused gated GEMM1: serves only gated activations, reads tokens directly
  // GEMM2 only: K is cut into split_k slices, problem s * E + e multiplying slice s, and the
  // kernel writes fp32 partial sums (finalize adds them). 1: an ordinary GEMM.
  int split_k;
  // A weight-streaming decode kernel (src/grouped_gemm/decode_gemm.cuh) rather than a CUTLASS
  // tile kernel: tile_m is the rows per expert it takes in one pass, tile_n the output columns
  // of one block's work item; it reads the same arguments.
  bool decode;
  // Raises the kernel's dynamic shared-memory limit on the current device and returns its
  // occupancy (blocks per SM); 0 when it cannot run there.
  int (*prepare)();
  // Launches the grouped kernel with `threadblock_count` persistent blocks.
  void (*launch)(const GroupedGemmArgs& args, int threadblock_count, cudaStream_t stream);
  // The members below have defaults, so registry entries of tactics without them end at launch.
  // The one compute capability (10 * major + minor) whose arch-specific code the tactic is, or 0
  // for every GPU the build targets. 90: sm_90a code (TMA + wgmma: src/grouped_gemm/
  // sm90_grouped_gemm.cuh), which runs on compute capability 9.0 only; elsewhere the runner
  // lists it as not runnable and never calls its prepare or launch.
  int required_cc = 0;
  // Bytes of GroupedGemmArgs::kernel_workspace the tactic needs for `ctas` persistent CTAs; null
  // when it needs none. The runner reserves it for kMaxPersistentCtas.
  size_t (*workspace_bytes)(int ctas) = nullptr;
};

// Registry generated at build time: every tactic compiled into this build.
const GemmTactic* const* gemm_tactics(int* count);

}  // namespace cutlass_moe
