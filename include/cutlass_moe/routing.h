// Routing: expert ids -> per-expert offsets, a stable permutation and the gathered input rows.
//
// Conventions (expanded rows):
//   expanded_rows            = T * k
//   expanded source row      = t + j * T   for the j-th choice of token t
//   permuted (dest) row      = position after a stable sort by local expert id; within one
//                              expert, rows are ordered by (t, j) of token_selected_experts[t*k+j]
//   expert_first_token_offset[e] = number of kept rows routed to local experts < e;
//                              [E] = kept rows (rows whose expert is on this rank)
//   permuted_to_source[d]    = expanded source row of dest row d         (d < kept)
//   source_to_permuted[s]    = dest row of expanded source row s, or -1 when its expert is not
//                              on this rank (such rows contribute zero)
//   permuted_expert[d]       = local expert id of dest row d             (d < kept)
//   permuted_token[d]        = token t of dest row d                     (d < kept)
// Everything runs on the device; grid sizes depend only on (T, k, E), never on routed data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {

struct GemmArgsWriter;  // src/gemm_args.cuh

// Scratch bytes launch_routing needs for (T*k, E_local).
size_t routing_scratch_size(int64_t expanded_rows, int num_experts);

// Builds offsets and the permutation maps. Ids outside [expert_start, expert_start + E_local)
// (negative ones included) are dropped and never used to index memory. With `gemm_args`, the
// kernel that computes the offsets also writes the grouped GEMMs' arguments from them (no launch
// of its own); with no rows (T = 0) they are not written. `pdl`: launch as programmatic
// dependents (see src/launch.cuh).
void launch_routing(const int32_t* token_selected_experts, int64_t num_tokens, int top_k,
                    int num_experts, int expert_start, int64_t* expert_first_token_offset,
                    int32_t* permuted_to_source, int32_t* source_to_permuted,
                    int32_t* permuted_expert, int32_t* permuted_token, void* scratch,
                    size_t scratch_bytes, cudaStream_t stream,
                    const GemmArgsWriter* gemm_args = nullptr, bool pdl = false);

// gathered[d, :] = input[permuted_to_source[d] % T, :] for d < expert_first_token_offset[E].
// Rows at or past the kept count are left untouched. dtype: kFloat16 or kBFloat16.
void launch_gather_rows(DType dtype, const void* input, const int32_t* permuted_to_source,
                        const int64_t* expert_first_token_offset, int num_experts,
                        int64_t num_tokens, int top_k, int64_t hidden_size, void* gathered,
                        cudaStream_t stream, bool pdl = false);

}  // namespace cutlass_moe
