// Per-device set-up and launch shared by every grouped-GEMM tactic.
#pragma once

#include <cuda_runtime_api.h>

#include "cutlass/cutlass.h"
#include "cutlass_moe/cuda_check.h"
#include "launch.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

// The kernel entry of a CUTLASS kernel-level operator (what cutlass::Kernel<Operator> does),
// preceded by the wait of a programmatically dependent launch (see launch.cuh).
template <typename Operator>
__global__ void grouped_kernel(typename Operator::Params params) {
  wait_on_dependencies();
  extern __shared__ int shared_storage_base[];
  auto* shared_storage = reinterpret_cast<typename Operator::SharedStorage*>(shared_storage_base);
  Operator op;
  op(params, *shared_storage);
}

// Raises the kernel's dynamic shared-memory limit on the current device and reports its
// occupancy (blocks per SM; 0 when it cannot run on this device).
template <typename GemmKernel>
int prepare_kernel(int threads, int smem_bytes) {
  int device = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaGetDevice(&device));
  int smem_optin = 0;
  CUTLASS_MOE_CHECK_CUDA(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem_bytes > smem_optin) return 0;
  if (smem_bytes > (48 << 10)) {
    CUTLASS_MOE_CHECK_CUDA(cudaFuncSetAttribute(
        grouped_kernel<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  int blocks_per_sm = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, grouped_kernel<GemmKernel>, threads, smem_bytes));
  return blocks_per_sm;
}

template <typename GemmKernel>
void launch_grouped_kernel(const typename GemmKernel::Params& params, int threadblock_count,
                           int threads, int smem_bytes, cudaStream_t stream, bool pdl) {
  launch_kernel("grouped GEMM", grouped_kernel<GemmKernel>, dim3(threadblock_count),
                dim3(threads), static_cast<size_t>(smem_bytes), stream, pdl, params);
}

}  // namespace grouped_gemm
}  // namespace cutlass_moe
