// Kernel 1: write this step's K and V rows into the KV store at (slot, position, layer).
//
// The copy is dtype-agnostic: one thread moves one 16-byte vector. In the store, a layer's
// K heads and then its V heads are contiguous inside a token, exactly like a row of k / v,
// so vector j of a row's K lands at k_offset + 16 * j of its token.
#pragma once

#include <cstdint>

#include "ragged_rows.cuh"

namespace jvt::cuda {

// row_vecs: 16-byte vectors in one row of k (= of v); the host checks it is exact.
__global__ void append_kv_kernel(AttnParams p, const int32_t* seq_ok, int64_t row_vecs) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= p.num_rows * 2 * row_vecs) return;
  const int64_t row = idx / (2 * row_vecs);
  const int64_t rem = idx % (2 * row_vecs);
  const bool is_v = rem >= row_vecs;
  const int64_t vec = is_v ? rem - row_vecs : rem;
  const RowTarget t = locate_row(p, seq_ok, row);
  if (t.slot == kRowSkipped) return;
  const uint4* src = static_cast<const uint4*>(is_v ? p.v : p.k) + row * row_vecs + vec;
  uint8_t* token = p.kv_base + t.slot * p.slot_stride + t.pos * p.token_bytes;
  reinterpret_cast<uint4*>(token + (is_v ? p.v_offset : p.k_offset))[vec] = *src;
}

}  // namespace jvt::cuda
