// One-time, per-device set-up shared by every grouped-GEMM tactic: raise the kernel's dynamic
// shared-memory limit and report its occupancy (0 when it cannot run on this device).
#pragma once

#include <cuda_runtime_api.h>

#include "cutlass/device_kernel.h"
#include "cutlass_moe/cuda_check.h"

namespace cutlass_moe {
namespace grouped_gemm {

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
        cutlass::Kernel<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  int blocks_per_sm = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, cutlass::Kernel<GemmKernel>, threads, smem_bytes));
  return blocks_per_sm;
}

}  // namespace grouped_gemm
}  // namespace cutlass_moe
