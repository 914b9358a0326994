// 16-byte vectors of 8 half-precision elements (f16 or bf16) <-> 8 floats, and exp2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace jvt::cuda {

constexpr int kVec = 8;  // elements per 16-byte vector

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[kVec]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if constexpr (std::is_same_v<T, __half>) {
      f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    } else {
      f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
    }
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// exp2 on the SFU; exp2(-inf) = 0, which the online softmax relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace jvt::cuda
