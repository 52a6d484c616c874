// Status checks: every CUDA call and every launch goes through these.
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace cutlass_moe {

// Thrown for bad arguments; the binding maps it to Python's ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* what, const char* file,
                                          int line) {
  std::ostringstream msg;
  msg << "CUDA error " << cudaGetErrorName(status) << " (" << cudaGetErrorString(status)
      << ") in " << what << " at " << file << ":" << line;
  throw std::runtime_error(msg.str());
}

}  // namespace cutlass_moe

#define CUTLASS_MOE_CHECK_CUDA(expr)                                                    \
  do {                                                                                  \
    cudaError_t cutlass_moe_status_ = (expr);                                           \
    if (cutlass_moe_status_ != cudaSuccess) {                                           \
      ::cutlass_moe::throw_cuda_error(cutlass_moe_status_, #expr, __FILE__, __LINE__);  \
    }                                                                                   \
  } while (0)

// After a <<<...>>> launch: reports (and clears) a launch error, naming the kernel.
#define CUTLASS_MOE_CHECK_LAUNCH(name)                                                  \
  do {                                                                                  \
    cudaError_t cutlass_moe_status_ = cudaGetLastError();                               \
    if (cutlass_moe_status_ != cudaSuccess) {                                           \
      ::cutlass_moe::throw_cuda_error(cutlass_moe_status_, "launch of " name, __FILE__, \
                                      __LINE__);                                        \
    }                                                                                   \
  } while (0)
