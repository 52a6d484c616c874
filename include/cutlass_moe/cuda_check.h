// Status checks: every CUDA call and every launch goes through these.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace cutlass_moe {

// Thrown for bad arguments; the binding maps it to Python's ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Also resets the runtime's last-error state, so that the next, unrelated launch check
// (cudaGetLastError) does not report this error again. Sticky errors (a kernel fault, which
// corrupts the context) cannot be cleared: every later call reports them.
// The message is built without iostreams: where the toolchain links libstdc++ statically into
// the module, formatting a number through an ostringstream crashed once torch was imported.
[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* what, const char* file,
                                          int line) {
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(status) + " (" +
                           cudaGetErrorString(status) + ") in " + what + " at " + file + ":" +
                           std::to_string(line));
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
