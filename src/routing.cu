// Routing: expert ids -> per-expert offsets, a stable permutation, and the gathered input rows.
//
// The T*k flat entries (i = t*k + j) are split into chunks, one thread block per chunk and a
// contiguous segment of the chunk per warp. Three launches, grids sized from (T*k, E) only:
//   1. count_chunk_experts:  per-chunk histogram over local experts -> scratch[chunk][E]
//   2. scan_chunk_counts:    one block; per expert, exclusive scan over chunks (in place), then an
//                            exclusive scan over experts -> expert_first_token_offset[0..E]
//   3. scatter_ranks:        each block recounts its chunk per warp, turns the per-warp counts into
//                            bases, and gives every entry its stable destination row.
// When T*k fits one chunk (kSingleChunkMaxEntries, the decode regime) a single launch of
// scatter_ranks<true> does all three steps in one block and needs no scratch: launch latency,
// not bandwidth, is what costs there.
// Destination order is (local expert, flat index i), i.e. stable in (t, j), as routing.h promises.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>

#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/problem.h"
#include "cutlass_moe/routing.h"
#include "gemm_args.cuh"
#include "launch.cuh"
#include "vector_access.cuh"

namespace cutlass_moe {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Routing blocks: 8 warps, each owning a contiguous segment of the block's chunk.
constexpr int kRoutingWarps = 8;
constexpr int kRoutingThreads = kRoutingWarps * kWarpSize;
// A warp reads the ids of kRoundsPerBatch rounds (32 entries each) before using any of them, so
// their load latencies overlap; a warp's segment is a whole number of such batches.
constexpr int kRoundsPerBatch = 4;
constexpr int64_t kEntriesPerBatch = kRoundsPerBatch * kWarpSize;
// Chunks grow with T*k beyond this count so the single-block scan stays short.
constexpr int64_t kMaxChunks = 256;
// Up to this many entries one block routes everything in a single launch. Measured on H100
// (E = 128, k = 8): one block is faster up to T*k = 2048 (9.0 vs 9.5 us), beyond that the
// scattered stores of a single SM dominate (16.5 us at 4096 against ~10 us for three launches).
constexpr int64_t kSingleChunkMaxEntries = 2048;
constexpr int kScanMaxThreads = 1024;
// The scan reads this many chunk counts of one expert before writing any back: the writes could
// alias the later reads as far as the compiler knows, so unbatched reads would each wait a full
// memory latency.
constexpr int kScanBatch = 16;
// kernel 3 keeps an int32 table [kRoutingWarps][E] in shared memory; 99 KB is the opt-in limit
// of the smallest supported part (sm_86/89), so this bounds E to 3168. Round down to 3072.
constexpr int kMaxLocalExperts = 3072;
// Dynamic shared memory of the routing kernels at E_local = kMaxLocalExperts: kernel 3's
// per-warp table needs the opt-in above 48 KB; kernels 1-2's [E] table (plus the scan's 128-byte
// static warp sums) stays within the default 48 KB, so their attribute is never touched.
constexpr size_t kScatterMaxSmem = size_t(kRoutingWarps) * kMaxLocalExperts * sizeof(int32_t);
constexpr size_t kExpertTableMaxSmem = size_t(kMaxLocalExperts) * sizeof(int32_t);
static_assert(kExpertTableMaxSmem + 1024 <= 48 * 1024,
              "kernels 1-2 would need the dynamic shared-memory opt-in");

// Gather: one 16-byte unit per thread, at most this many threads per block (128 measured faster
// than 256 on H100 for H = 2048).
constexpr int kGatherMaxThreads = 128;
constexpr int kMaxGridY = 65535;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct ChunkLayout {
  int64_t entries_per_warp = 0;   // multiple of kEntriesPerBatch
  int64_t entries_per_chunk = 0;  // kRoutingWarps * entries_per_warp
  int64_t num_chunks = 0;
};

ChunkLayout chunk_layout(int64_t expanded_rows) {
  ChunkLayout layout;
  const int64_t max_chunks = expanded_rows <= kSingleChunkMaxEntries ? 1 : kMaxChunks;
  const int64_t batches = ceil_div(expanded_rows, max_chunks * kRoutingWarps * kEntriesPerBatch);
  layout.entries_per_warp = std::max<int64_t>(1, batches) * kEntriesPerBatch;
  layout.entries_per_chunk = layout.entries_per_warp * kRoutingWarps;
  layout.num_chunks = ceil_div(expanded_rows, layout.entries_per_chunk);
  return layout;
}

// Local expert of flat entry i, or -1 when i is past the end or the id is not on this rank.
// The subtraction is done in 64 bits so INT_MIN / INT_MAX ids cannot overflow.
__device__ __forceinline__ int local_expert_or_dropped(const int32_t* __restrict__ expert_ids,
                                                       int64_t i, int64_t num_entries,
                                                       int expert_start, int num_experts) {
  if (i >= num_entries) return -1;
  const int64_t local = static_cast<int64_t>(expert_ids[i]) - expert_start;
  return (local >= 0 && local < num_experts) ? static_cast<int>(local) : -1;
}

__device__ __forceinline__ unsigned lanes_below_mask(int lane) { return (1u << lane) - 1u; }

// The local experts of one batch of a warp's entries: round r, lane l holds entry
// batch_begin + r * 32 + l (-1 past the end or off this rank). Loaded up front so the rounds'
// loads are in flight together.
__device__ __forceinline__ void load_batch_keys(const int32_t* __restrict__ expert_ids,
                                                int64_t batch_begin, int lane,
                                                int64_t num_entries, int expert_start,
                                                int num_experts, int (&keys)[kRoundsPerBatch]) {
#pragma unroll
  for (int r = 0; r < kRoundsPerBatch; ++r) {
    keys[r] = local_expert_or_dropped(expert_ids, batch_begin + r * kWarpSize + lane,
                                      num_entries, expert_start, num_experts);
  }
}

// Kernel 1: histogram of one chunk over local experts. Lanes with the same expert are grouped
// with __match_any_sync so that one shared atomic per (warp, round, expert) is issued, which
// keeps hot experts (all tokens to one expert) from serialising on a single address.
__global__ void __launch_bounds__(kRoutingThreads)
    count_chunk_experts_kernel(const int32_t* __restrict__ expert_ids, int64_t num_entries,
                               int64_t entries_per_warp, int64_t entries_per_chunk,
                               int expert_start, int num_experts, int32_t* __restrict__ chunk_counts) {
  wait_on_dependencies();
  allow_dependents();
  extern __shared__ int32_t expert_counts[];  // [num_experts]
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) expert_counts[e] = 0;
  __syncthreads();

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_begin = blockIdx.x * entries_per_chunk + warp * entries_per_warp;
  for (int64_t batch = 0; batch < entries_per_warp; batch += kEntriesPerBatch) {
    if (warp_begin + batch >= num_entries) break;  // uniform across the warp
    int keys[kRoundsPerBatch];
    load_batch_keys(expert_ids, warp_begin + batch, lane, num_entries, expert_start, num_experts,
                    keys);
#pragma unroll
    for (int r = 0; r < kRoundsPerBatch; ++r) {
      const unsigned peers = __match_any_sync(kFullWarpMask, keys[r]);
      if (keys[r] >= 0 && lane == __ffs(peers) - 1) {
        atomicAdd(&expert_counts[keys[r]], __popc(peers));
      }
    }
  }
  __syncthreads();

  int32_t* counts_row = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts_row[e] = expert_counts[e];
}

// Exclusive scan of one int32 per thread across the block (blockDim.x a multiple of 32, <= 1024).
__device__ int32_t block_exclusive_scan(int32_t value, int32_t* block_total) {
  __shared__ int32_t warp_sums[kScanMaxThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  int32_t inclusive = value;
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const int32_t lower = __shfl_up_sync(kFullWarpMask, inclusive, delta);
    if (lane >= delta) inclusive += lower;
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();

  if (warp == 0) {
    int32_t warp_inclusive = lane < num_warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int delta = 1; delta < kWarpSize; delta *= 2) {
      const int32_t lower = __shfl_up_sync(kFullWarpMask, warp_inclusive, delta);
      if (lane >= delta) warp_inclusive += lower;
    }
    if (lane < num_warps) warp_sums[lane] = warp_inclusive;
  }
  __syncthreads();

  *block_total = warp_sums[num_warps - 1];
  const int32_t warps_below = warp == 0 ? 0 : warp_sums[warp - 1];
  return warps_below + inclusive - value;
}

// Kernel 2 (one block): chunk_counts[c][e] becomes the number of rows of expert e in chunks < c;
// expert_first_token_offset gets the exclusive scan of the per-expert totals, and the grouped
// GEMMs' arguments are written from it (when asked). Each thread owns a contiguous run of
// experts so that the scan over experts is a single block-wide scan.
__global__ void __launch_bounds__(kScanMaxThreads)
    scan_chunk_counts_kernel(int32_t* __restrict__ chunk_counts, int64_t num_chunks, int num_experts,
                             int64_t* __restrict__ expert_first_token_offset,
                             bool write_gemm_args, GemmArgsWriter gemm_args) {
  wait_on_dependencies();
  allow_dependents();
  extern __shared__ int32_t expert_totals[];  // [num_experts], each entry used by one thread only
  const int experts_per_thread = static_cast<int>(ceil_div(num_experts, blockDim.x));
  const int first_expert = min(num_experts, static_cast<int>(threadIdx.x) * experts_per_thread);
  const int end_expert = min(num_experts, first_expert + experts_per_thread);

  int32_t thread_total = 0;
  for (int e = first_expert; e < end_expert; ++e) {
    int32_t running = 0;
    for (int64_t first_chunk = 0; first_chunk < num_chunks; first_chunk += kScanBatch) {
      int32_t* column = chunk_counts + first_chunk * num_experts + e;
      const int64_t batch = min(static_cast<int64_t>(kScanBatch), num_chunks - first_chunk);
      int32_t rows[kScanBatch];
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) rows[b] = b < batch ? column[b * num_experts] : 0;
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) {
        if (b < batch) column[b * num_experts] = running;
        running += rows[b];
      }
    }
    expert_totals[e] = running;
    thread_total += running;
  }

  int32_t kept_rows = 0;
  int32_t offset = block_exclusive_scan(thread_total, &kept_rows);
  for (int e = first_expert; e < end_expert; ++e) {
    expert_first_token_offset[e] = offset;
    if (write_gemm_args) gemm_args.write(e, offset, expert_totals[e]);
    offset += expert_totals[e];
  }
  if (threadIdx.x == 0) expert_first_token_offset[num_experts] = kept_rows;
}

// Kernel 3: stable destination rows. Each warp first counts its own segment per expert, the
// block turns those counts into per-(warp, expert) next-free rows (global base of the chunk plus
// the rows of earlier warps), then each warp walks its segment in order: a lane's row is the
// next free row plus the number of lower lanes with the same expert.
// kSingleChunk: the grid is one block covering all entries; it derives the expert offsets from
// its own counts (and writes them, and the grouped GEMMs' arguments when asked) instead of
// reading kernels 1-2's results.
template <bool kSingleChunk>
__global__ void __launch_bounds__(kRoutingThreads)
    scatter_ranks_kernel(const int32_t* __restrict__ expert_ids, int64_t num_tokens, int top_k,
                         int64_t entries_per_warp, int64_t entries_per_chunk, int expert_start,
                         int num_experts, const int32_t* __restrict__ chunk_bases,
                         int64_t* __restrict__ expert_first_token_offset,
                         int32_t* __restrict__ permuted_to_source,
                         int32_t* __restrict__ source_to_permuted,
                         int32_t* __restrict__ permuted_expert,
                         int32_t* __restrict__ permuted_token, bool write_gemm_args,
                         GemmArgsWriter gemm_args) {
  wait_on_dependencies();
  allow_dependents();
  extern __shared__ int32_t warp_next_row[];  // [kRoutingWarps][num_experts]
  const int64_t num_entries = num_tokens * top_k;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  int32_t* my_next_row = warp_next_row + warp * num_experts;
  const int64_t warp_begin = blockIdx.x * entries_per_chunk + warp * entries_per_warp;

  for (int idx = threadIdx.x; idx < kRoutingWarps * num_experts; idx += blockDim.x) {
    warp_next_row[idx] = 0;
  }
  __syncthreads();

  // Per-warp counts. Only this warp touches its table row; __syncwarp orders the leaders'
  // updates between rounds (a later round's leader may be a different lane).
  for (int64_t batch = 0; batch < entries_per_warp; batch += kEntriesPerBatch) {
    if (warp_begin + batch >= num_entries) break;  // uniform across the warp
    int keys[kRoundsPerBatch];
    load_batch_keys(expert_ids, warp_begin + batch, lane, num_entries, expert_start, num_experts,
                    keys);
#pragma unroll
    for (int r = 0; r < kRoundsPerBatch; ++r) {
      const unsigned peers = __match_any_sync(kFullWarpMask, keys[r]);
      if (keys[r] >= 0 && lane == __ffs(peers) - 1) my_next_row[keys[r]] += __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();

  // Counts -> first row of each (warp, expert) in the permuted order. Values are < T*k < 2^31.
  if constexpr (kSingleChunk) {
    // Each thread owns a contiguous run of experts so one block-wide scan orders them all.
    const int experts_per_thread = static_cast<int>(ceil_div(num_experts, blockDim.x));
    const int first_expert = min(num_experts, static_cast<int>(threadIdx.x) * experts_per_thread);
    const int end_expert = min(num_experts, first_expert + experts_per_thread);
    int32_t thread_rows = 0;
    for (int e = first_expert; e < end_expert; ++e) {
      for (int w = 0; w < kRoutingWarps; ++w) thread_rows += warp_next_row[w * num_experts + e];
    }
    int32_t kept_rows = 0;
    int32_t next_row = block_exclusive_scan(thread_rows, &kept_rows);
    for (int e = first_expert; e < end_expert; ++e) {
      const int32_t first_row = next_row;
      expert_first_token_offset[e] = first_row;
      for (int w = 0; w < kRoutingWarps; ++w) {
        const int32_t rows = warp_next_row[w * num_experts + e];
        warp_next_row[w * num_experts + e] = next_row;
        next_row += rows;
      }
      if (write_gemm_args) gemm_args.write(e, first_row, next_row - first_row);
    }
    if (threadIdx.x == 0) expert_first_token_offset[num_experts] = kept_rows;
  } else {
    const int32_t* bases_row = chunk_bases + static_cast<int64_t>(blockIdx.x) * num_experts;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int32_t next_row = static_cast<int32_t>(expert_first_token_offset[e]) + bases_row[e];
      for (int w = 0; w < kRoutingWarps; ++w) {
        const int32_t rows = warp_next_row[w * num_experts + e];
        warp_next_row[w * num_experts + e] = next_row;
        next_row += rows;
      }
    }
  }
  __syncthreads();

  for (int64_t batch = 0; batch < entries_per_warp; batch += kEntriesPerBatch) {
    if (warp_begin + batch >= num_entries) break;  // uniform across the warp
    int keys[kRoundsPerBatch];
    load_batch_keys(expert_ids, warp_begin + batch, lane, num_entries, expert_start, num_experts,
                    keys);
#pragma unroll
    for (int r = 0; r < kRoundsPerBatch; ++r) {
      const int64_t i = warp_begin + batch + r * kWarpSize + lane;
      const int key = keys[r];
      const unsigned peers = __match_any_sync(kFullWarpMask, key);
      if (i < num_entries) {
        // 32-bit arithmetic is exact here (i < T*k < 2^31) and avoids a 64-bit division.
        const uint32_t flat = static_cast<uint32_t>(i);
        const uint32_t token = flat / static_cast<uint32_t>(top_k);
        const uint32_t choice = flat - token * static_cast<uint32_t>(top_k);
        const int32_t source_row =
            static_cast<int32_t>(token + choice * static_cast<uint32_t>(num_tokens));
        if (key >= 0) {
          const int32_t dest_row = my_next_row[key] + __popc(peers & lanes_below_mask(lane));
          permuted_to_source[dest_row] = source_row;
          permuted_expert[dest_row] = key;
          permuted_token[dest_row] = static_cast<int32_t>(token);
          source_to_permuted[source_row] = dest_row;
        } else {
          source_to_permuted[source_row] = -1;
        }
      }
      __syncwarp();  // every lane has read my_next_row before the leader advances it
      if (key >= 0 && lane == __ffs(peers) - 1) my_next_row[key] += __popc(peers);
      __syncwarp();
    }
  }
}

// Gather: one 16-byte unit (or one element) per thread; blockIdx.x = permuted row,
// blockIdx.y = column tile. Rows past the kept count exit at once.
template <typename Unit>
__global__ void __launch_bounds__(kGatherMaxThreads)
    gather_rows_kernel(const Unit* __restrict__ input, const int32_t* __restrict__ permuted_to_source,
                       const int64_t* __restrict__ expert_first_token_offset, int num_experts,
                       int64_t num_tokens, int64_t units_per_row, Unit* __restrict__ gathered) {
  wait_on_dependencies();
  allow_dependents();
  const int64_t dest_row = blockIdx.x;
  // Both loads are issued before the branch so their latencies overlap; the map entry of a row
  // past the kept count is in bounds (the map has T*k entries) and simply unused.
  const int64_t kept_rows = expert_first_token_offset[num_experts];
  const int32_t source_row = permuted_to_source[dest_row];
  if (dest_row >= kept_rows) return;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (unit >= units_per_row) return;
  const int64_t token = source_row % num_tokens;
  // Streaming store: the gathered copy is not re-read by this kernel, and marking it evict-first
  // keeps the (k times re-read) input rows in L2. With 128-thread blocks this measured 163 -> 132 us
  // on H100 for T*k = 65536, H = 2048.
  __stcs(&gathered[dest_row * units_per_row + unit], __ldg(&input[token * units_per_row + unit]));
}

// Raises `kernel`'s dynamic shared-memory limit on the current device to `wanted` bytes, or to
// as much as the device allows beside the kernel's static shared memory, and returns the limit
// now in force.
template <typename Kernel>
size_t raise_dynamic_smem_limit(Kernel kernel, size_t wanted, int device) {
  int optin = 0;
  CUTLASS_MOE_CHECK_CUDA(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes = {};
  CUTLASS_MOE_CHECK_CUDA(cudaFuncGetAttributes(&attributes, kernel));
  const size_t optin_bytes = static_cast<size_t>(std::max(optin, 0));
  const size_t available =
      optin_bytes > attributes.sharedSizeBytes ? optin_bytes - attributes.sharedSizeBytes : 0;
  const size_t limit = std::min(wanted, available);
  if (limit > static_cast<size_t>(std::max(attributes.maxDynamicSharedSizeBytes, 0))) {
    CUTLASS_MOE_CHECK_CUDA(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  }
  return limit;
}

// Dynamic shared memory kernel 3 may take on one device.
struct ScatterSmemLimits {
  size_t single_chunk = 0;  // scatter_ranks_kernel<true>
  size_t multi_chunk = 0;   // scatter_ranks_kernel<false>
};

// The kernel attribute is process-wide (per device), so it is raised once per device, to what
// the largest E_local needs, and never changed again: were it set per call to that call's need,
// a call on another host thread could shrink it between this call's set and its launch.
ScatterSmemLimits scatter_smem_limits() {
  static std::mutex mutex;
  static std::map<int, ScatterSmemLimits> limits;  // by device
  int device = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto found = limits.find(device);
  if (found != limits.end()) return found->second;
  ScatterSmemLimits set;
  set.single_chunk = raise_dynamic_smem_limit(scatter_ranks_kernel<true>, kScatterMaxSmem, device);
  set.multi_chunk = raise_dynamic_smem_limit(scatter_ranks_kernel<false>, kScatterMaxSmem, device);
  limits.emplace(device, set);
  return set;
}

void check_routing_shape(int64_t expanded_rows, int num_experts) {
  if (num_experts < 1 || num_experts > kMaxLocalExperts) {
    throw InvalidArgument("routing: num_experts must be in [1, " +
                          std::to_string(kMaxLocalExperts) + "], got " +
                          std::to_string(num_experts));
  }
  if (expanded_rows < 0 || expanded_rows > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("routing: num_tokens * top_k must be in [0, 2^31), got " +
                          std::to_string(expanded_rows));
  }
}

// T * k without overflow; rejects what the int32 maps cannot index.
int64_t checked_expanded_rows(int64_t num_tokens, int top_k) {
  if (num_tokens < 0) throw InvalidArgument("routing: num_tokens must be >= 0");
  if (top_k < 1) throw InvalidArgument("routing: top_k must be >= 1, got " + std::to_string(top_k));
  if (num_tokens > std::numeric_limits<int32_t>::max() / top_k) {
    throw InvalidArgument("routing: num_tokens * top_k must be < 2^31");
  }
  return num_tokens * top_k;
}

}  // namespace

size_t routing_scratch_size(int64_t expanded_rows, int num_experts) {
  check_routing_shape(expanded_rows, num_experts);
  const ChunkLayout layout = chunk_layout(expanded_rows);
  if (layout.num_chunks <= 1) return 0;  // the single-block path needs no scratch
  const size_t bytes = static_cast<size_t>(layout.num_chunks) * num_experts * sizeof(int32_t);
  return (bytes + 255) / 256 * 256;  // so callers can carve the next buffer aligned
}

void launch_routing(const int32_t* token_selected_experts, int64_t num_tokens, int top_k,
                    int num_experts, int expert_start, int64_t* expert_first_token_offset,
                    int32_t* permuted_to_source, int32_t* source_to_permuted,
                    int32_t* permuted_expert, int32_t* permuted_token, void* scratch,
                    size_t scratch_bytes, cudaStream_t stream, const GemmArgsWriter* gemm_args,
                    bool pdl) {
  const int64_t num_entries = checked_expanded_rows(num_tokens, top_k);
  check_routing_shape(num_entries, num_experts);
  if (expert_first_token_offset == nullptr) {
    throw InvalidArgument("routing: expert_first_token_offset must not be null");
  }
  if (num_entries == 0) {
    // No rows: offsets are all zero and the maps are empty.
    CUTLASS_MOE_CHECK_CUDA(cudaMemsetAsync(expert_first_token_offset, 0,
                                           (num_experts + 1) * sizeof(int64_t), stream));
    return;
  }
  if (token_selected_experts == nullptr || permuted_to_source == nullptr ||
      source_to_permuted == nullptr || permuted_expert == nullptr || permuted_token == nullptr) {
    throw InvalidArgument("routing: a required device pointer is null");
  }

  const bool write_gemm_args = gemm_args != nullptr;
  const GemmArgsWriter args_value = write_gemm_args ? *gemm_args : GemmArgsWriter{};
  const ChunkLayout layout = chunk_layout(num_entries);
  const size_t scatter_smem = static_cast<size_t>(kRoutingWarps) * num_experts * sizeof(int32_t);
  const ScatterSmemLimits smem_limits = scatter_smem_limits();
  const size_t smem_limit =
      layout.num_chunks == 1 ? smem_limits.single_chunk : smem_limits.multi_chunk;
  if (scatter_smem > smem_limit) {
    throw InvalidArgument("routing: " + std::to_string(num_experts) + " local experts need " +
                          std::to_string(scatter_smem) +
                          " bytes of shared memory per block, more than the " +
                          std::to_string(smem_limit) + " this GPU allows (at most " +
                          std::to_string(smem_limit / (kRoutingWarps * sizeof(int32_t))) +
                          " local experts)");
  }
  if (layout.num_chunks == 1) {
    launch_kernel("scatter_ranks_kernel<single chunk>", scatter_ranks_kernel<true>, dim3(1),
                  dim3(kRoutingThreads), scatter_smem, stream, pdl, token_selected_experts,
                  num_tokens, top_k, layout.entries_per_warp, layout.entries_per_chunk,
                  expert_start, num_experts, nullptr, expert_first_token_offset,
                  permuted_to_source, source_to_permuted, permuted_expert, permuted_token,
                  write_gemm_args, args_value);
    return;
  }

  const size_t needed = routing_scratch_size(num_entries, num_experts);
  if (scratch == nullptr || scratch_bytes < needed) {
    throw InvalidArgument("routing: scratch has " + std::to_string(scratch_bytes) +
                          " bytes, needs " + std::to_string(needed));
  }
  if (!vector_access::is_aligned(scratch, alignof(int32_t))) {
    throw InvalidArgument("routing: scratch must be 4-byte aligned");
  }
  auto* chunk_counts = static_cast<int32_t*>(scratch);
  const unsigned num_chunks = static_cast<unsigned>(layout.num_chunks);

  const size_t count_smem = num_experts * sizeof(int32_t);
  launch_kernel("count_chunk_experts_kernel", count_chunk_experts_kernel, dim3(num_chunks),
                dim3(kRoutingThreads), count_smem, stream, pdl, token_selected_experts,
                num_entries, layout.entries_per_warp, layout.entries_per_chunk, expert_start,
                num_experts, chunk_counts);

  const int scan_threads = static_cast<int>(
      std::min<int64_t>(kScanMaxThreads, ceil_div(num_experts, kWarpSize) * kWarpSize));
  const size_t scan_smem = num_experts * sizeof(int32_t);
  launch_kernel("scan_chunk_counts_kernel", scan_chunk_counts_kernel, dim3(1), dim3(scan_threads),
                scan_smem, stream, pdl, chunk_counts, layout.num_chunks, num_experts,
                expert_first_token_offset, write_gemm_args, args_value);

  launch_kernel("scatter_ranks_kernel", scatter_ranks_kernel<false>, dim3(num_chunks),
                dim3(kRoutingThreads), scatter_smem, stream, pdl, token_selected_experts,
                num_tokens, top_k, layout.entries_per_warp, layout.entries_per_chunk,
                expert_start, num_experts, static_cast<const int32_t*>(chunk_counts),
                expert_first_token_offset, permuted_to_source, source_to_permuted,
                permuted_expert, permuted_token, false, args_value);
}

void launch_gather_rows(DType dtype, const void* input, const int32_t* permuted_to_source,
                        const int64_t* expert_first_token_offset, int num_experts,
                        int64_t num_tokens, int top_k, int64_t hidden_size, void* gathered,
                        cudaStream_t stream, bool pdl) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    throw InvalidArgument("gather_rows: dtype must be float16 or bfloat16");
  }
  if (num_experts < 1) throw InvalidArgument("gather_rows: num_experts must be >= 1");
  if (hidden_size < 0) throw InvalidArgument("gather_rows: hidden_size must be >= 0");
  const int64_t num_rows = checked_expanded_rows(num_tokens, top_k);
  if (num_rows == 0 || hidden_size == 0) return;
  if (input == nullptr || permuted_to_source == nullptr || expert_first_token_offset == nullptr ||
      gathered == nullptr) {
    throw InvalidArgument("gather_rows: a required device pointer is null");
  }

  // Both dtypes are 2 bytes and the copy is bitwise, so the kernel only sees 16-byte units
  // (8 elements) or, when rows or pointers are not 16-byte aligned, single 2-byte elements.
  constexpr int64_t kElementBytes = 2;
  const int64_t row_bytes = hidden_size * kElementBytes;
  const bool vectorised =
      row_bytes % 16 == 0 && vector_access::is_aligned(input, 16) && vector_access::is_aligned(gathered, 16);
  const int64_t units_per_row = vectorised ? row_bytes / 16 : hidden_size;

  // Spread a row's units evenly over the fewest tiles of at most kGatherMaxThreads threads.
  const int64_t tiles = ceil_div(units_per_row, kGatherMaxThreads);
  if (tiles > kMaxGridY) throw InvalidArgument("gather_rows: hidden_size too large");
  const int threads =
      static_cast<int>(ceil_div(ceil_div(units_per_row, tiles), kWarpSize) * kWarpSize);
  const dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(tiles));

  if (vectorised) {
    launch_kernel("gather_rows_kernel", gather_rows_kernel<uint4>, grid, dim3(threads), 0, stream,
                  pdl, static_cast<const uint4*>(input), permuted_to_source,
                  expert_first_token_offset, num_experts, num_tokens, units_per_row,
                  static_cast<uint4*>(gathered));
  } else {
    launch_kernel("gather_rows_kernel", gather_rows_kernel<uint16_t>, grid, dim3(threads), 0,
                  stream, pdl, static_cast<const uint16_t*>(input), permuted_to_source,
                  expert_first_token_offset, num_experts, num_tokens, units_per_row,
                  static_cast<uint16_t*>(gathered));
  }
}

}  // namespace cutlass_moe
