// Element conversions and 16-byte vector loads/stores shared by the elementwise kernels
// (activation, finalize). Math is done in fp32; storage is fp16, bf16 or fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

namespace cutlass_moe {
namespace vector_access {

constexpr int kVectorBytes = 16;
constexpr int kVectorWidth = 8;  // 16-bit elements per 16-byte vector

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Whether rows of `row_elems` elements in these buffers can be read and written 8 elements at a
// time with 16-byte accesses: the row length a multiple of 8 and every (non-null) base aligned.
inline bool vectorisable(int64_t row_elems, std::initializer_list<const void*> buffers) {
  if (row_elems % kVectorWidth != 0) return false;
  for (const void* ptr : buffers) {
    if (ptr != nullptr && !is_aligned(ptr, kVectorBytes)) return false;
  }
  return true;
}

// Up to 16 bytes of consecutive elements; alignas makes it one 128-bit access.
template <typename T, int kCount>
struct alignas(sizeof(T) * kCount) Elements {
  T v[kCount];
};

// Loads in pieces of at most 16 bytes (8 fp32 inputs are two 128-bit loads; see store_floats).
template <typename T, int kWidth>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[kWidth]) {
  constexpr int kPiece = (sizeof(T) * kWidth > kVectorBytes) ? kVectorBytes / sizeof(T) : kWidth;
  static_assert(kWidth % kPiece == 0, "load width must split into whole pieces");
#pragma unroll
  for (int p = 0; p < kWidth / kPiece; ++p) {
    const Elements<T, kPiece> loaded = reinterpret_cast<const Elements<T, kPiece>*>(src)[p];
#pragma unroll
    for (int i = 0; i < kPiece; ++i) dst[p * kPiece + i] = to_float(loaded.v[i]);
  }
}

// Stores in pieces of at most 16 bytes: 8 fp32 outputs are two 128-bit stores, because a row of
// a 16-byte aligned fp32 tensor is only guaranteed 16-byte (not 32-byte) alignment.
template <typename T, int kWidth>
__device__ __forceinline__ void store_floats(T* dst, const float (&src)[kWidth]) {
  constexpr int kPiece = (sizeof(T) * kWidth > kVectorBytes) ? kVectorBytes / sizeof(T) : kWidth;
  static_assert(kWidth % kPiece == 0, "store width must split into whole pieces");
#pragma unroll
  for (int p = 0; p < kWidth / kPiece; ++p) {
    Elements<T, kPiece> packed;
#pragma unroll
    for (int i = 0; i < kPiece; ++i) packed.v[i] = from_float<T>(src[p * kPiece + i]);
    reinterpret_cast<Elements<T, kPiece>*>(dst)[p] = packed;
  }
}

}  // namespace vector_access
}  // namespace cutlass_moe
