// The jvt_qmatmul XLA FFI op: y[T, N] = x[T, K] @ W^T for a weight W [N, K] kept in llama.cpp's
// GGML blocks of 32 values along K, read by the kernel as they are (W is never dequantized in
// memory). CPU only: quant_cpu.cc. Python face: jvt/qmatmul.py; module: models/quant.py.
//
// Block layouts (ggml-common.h; f16 little-endian; for the 4-bit types, value j < 16 of a
// block is the low nibble of its byte j and value j + 16 the high nibble):
//   Q4_0  f16 d, 16 bytes q          value = d * (q - 8)   18 bytes
//   Q4_1  f16 d, f16 m, 16 bytes q   value = d * q + m     20 bytes
//   Q8_0  f16 d, 32 int8 q           value = d * q         34 bytes
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jvt {

// GGML type ids (gguf.GGMLQuantizationType) of the formats the kernel reads.
enum class QType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };
constexpr int64_t kQBlockValues = 32;

// Bytes of one block of GGML type `qtype`, or 0 when the kernel does not read that type.
constexpr int64_t qblock_bytes(int32_t qtype) {
  return qtype == static_cast<int32_t>(QType::kQ4_0)   ? 18
         : qtype == static_cast<int32_t>(QType::kQ4_1) ? 20
         : qtype == static_cast<int32_t>(QType::kQ8_0) ? 34
                                                        : 0;
}

// Kernel versions: cpu_kernels.h (cpu_isa()).

// Binding: Ctx<ThreadPool>, Arg x f32 [T, K], Arg w u8 [N, K / 32 * block bytes],
// Ret y f32 [T, N], Attr<int32_t> qtype (a GGML type id above).
extern XLA_FFI_Handler* const kJvtQMatmulCpu;

}  // namespace jvt
