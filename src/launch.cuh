// Kernel launches of the run path, with programmatic dependent launch (PDL) where asked for.
//
// With PDL (sm_90 and newer), a kernel's blocks may be scheduled while the kernel before it on
// the stream is still running, which hides the launch latency between the dependent kernels of
// one MoE call. Correctness rests on one rule: every kernel launched here calls
// wait_on_dependencies() before it touches global memory. griddepcontrol.wait returns once the
// grids it depends on have completed and their writes are visible; without the launch attribute
// it returns at once, and below sm_90 it is compiled out (such code is never launched with PDL:
// see MoeRunner's per-device check).
// The small kernels (routing, gather, activation, finalize) let the next kernel launch right
// after their wait (allow_dependents: griddepcontrol.launch_dependents). The next grid launches
// once every block of this one has started (or exited), so its blocks never take the place of a
// block of this grid that has yet to run; they wait on free SMs and start work the moment this
// grid completes. The grouped GEMMs do not: the persistent blocks of the next GEMM would spread
// over the SMs left free by this one's, unevenly, and every block walks its own share of the
// tiles (measured on H100: Qwen3-30B-A3B T=1 went 57.5 -> 63.1 us with GEMMs that allowed it).
// Their dependents launch as their last blocks exit.
#pragma once

#include <cuda_runtime_api.h>

#include <utility>

#include "cutlass_moe/cuda_check.h"

namespace cutlass_moe {

__device__ __forceinline__ void wait_on_dependencies() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Launches `kernel` on `stream`, as a programmatic dependent of the previous work on the stream
// when `pdl` is set. `name` labels a failure.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   size_t smem_bytes, cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = pdl ? attribute : nullptr;
  config.numAttrs = pdl ? 1 : 0;
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (status != cudaSuccess) throw_cuda_error(status, name, __FILE__, __LINE__);
}

}  // namespace cutlass_moe
