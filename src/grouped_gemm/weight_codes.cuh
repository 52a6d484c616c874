// Exact fp32 values of the quantised weight codes and scale codes the group-scaled formats use
// (docs/architecture.md, "FP8 and MXFP4 weights"); shared by the tensor-core mainloop and the
// weight-streaming decode kernels.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"

namespace cutlass_moe {
namespace grouped_gemm {

// FP8 e4m3 code (low 8 bits): its exponent and mantissa bits placed at fp32 bits 26..20 read as
// the value times 2^-120 (subnormal codes included), so one multiply by 2^120 restores it.
CUTLASS_DEVICE float e4m3_value(uint32_t code) {
  return __uint_as_float(((code & 0x7Fu) << 20) | ((code & 0x80u) << 24)) *
         __uint_as_float(0x7B800000u);  // 2^120
}

// e2m1 code (low 4 bits, `s e e m`): bits 2..0 placed at fp32 bits 24..22 read as the value
// times 2^-126 (the subnormal code 0b001 included), restored by one multiply by 2^126.
CUTLASS_DEVICE float e2m1_value(uint32_t code) {
  return __uint_as_float(((code & 0x7u) << 22) | ((code & 0x8u) << 28)) *
         __uint_as_float(0x7E800000u);  // 2^126
}

// e8m0 scale byte x: 2^(x - 127); x = 255 is NaN.
CUTLASS_DEVICE float e8m0_value(uint32_t x) {
  return x == 0 ? __uint_as_float(0x00400000u)  // 2^-127
                : x == 255 ? __uint_as_float(0x7FC00000u) : __uint_as_float(x << 23);
}

}  // namespace grouped_gemm
}  // namespace cutlass_moe
