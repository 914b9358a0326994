// Kernel 3: tensor-core causal attention for sequences with many new rows (prefill chunks),
// FlashAttention-2 style with mma.sync m16n8k16 (bf16/f16 inputs, fp32 accumulation).
//
// Work is found on the device: plan_prefill_tiles_kernel (one warp) gives every accepted
// sequence with at least kPrefillMinRows new rows ceil(n / 64) query tiles and writes the
// exclusive prefix sum tile_start[S + 1]; CTA (tile b, q head h) binary-searches it. A CTA
// computes 64 consecutive rows of one sequence for one q head (4 warps x 16 rows) over the
// keys [0, last position of the tile], 64 keys per step: K and V^T staged in shared memory,
// S = Q K^T and O += P V on tensor cores, fp32 online softmax on the accumulator fragments.
// The split-KV kernel leaves these rows to this kernel, which runs after it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ragged_rows.cuh"
#include "vec16.cuh"

namespace jvt::cuda {

constexpr int kPrefillMinRows = 32;  // sequences with this many new rows use kernel 3
constexpr int kTileRows = 64;        // query rows per CTA (16 per warp)
constexpr int kTileKeys = 64;        // keys per step

// tile_start[i]: first tile of sequence i (exclusive prefix sum of its tile count).
__global__ void plan_prefill_tiles_kernel(AttnParams p, const int32_t* seq_ok,
                                          int32_t* tile_start) {
  const int lane = threadIdx.x;
  int32_t offset = 0;
  for (int64_t base = 0; base < p.num_seqs; base += 32) {
    const int64_t i = base + lane;
    int32_t tiles = 0;
    if (i < p.num_seqs && seq_ok[i] != kRowSkipped) {
      const int32_t rows = p.seq_start[i + 1] - p.seq_start[i];
      if (rows >= kPrefillMinRows) tiles = (rows + kTileRows - 1) / kTileRows;
    }
    int32_t inclusive = tiles;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += up;
    }
    if (i < p.num_seqs) tile_start[i] = offset + inclusive - tiles;
    offset += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  if (lane == 0) tile_start[p.num_seqs] = offset;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&h);
  }
  return r;
}

// c += a * b for one m16n8k16 tile (A row-major 16x16, B column-major 16x8, fp32 C).
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Fragment ownership (PTX m16n8k16): lane = 4 * g + t. A: rows g and g + 8, columns 2t, 2t+1
// and 2t+8, 2t+9. B: k rows 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1) of column g. C: rows g, g + 8,
// columns 2t, 2t+1.
template <typename T, int D>
__global__ void __launch_bounds__(128)
prefill_attention_kernel(AttnParams p, const int32_t* seq_ok, const int32_t* tile_start) {
  constexpr int kKStride = D + 8;          // padded rows: conflict-free fragment reads
  constexpr int kVStride = kTileKeys + 8;
  __shared__ __align__(16) T s_k[kTileKeys * kKStride];  // [key][dim]
  __shared__ __align__(16) T s_vt[D * kVStride];         // [dim][key]

  // Which tile: the last sequence i with tile_start[i] <= b.
  const int32_t b = blockIdx.x;
  if (p.num_seqs == 0 || b >= tile_start[p.num_seqs]) return;
  int64_t lo = 0, hi = p.num_seqs;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (tile_start[mid] <= b) lo = mid; else hi = mid;
  }
  const int64_t seq = lo;
  const int32_t slot = seq_ok[seq];
  const int64_t start = p.seq_start[seq];
  const int32_t n = p.seq_start[seq + 1] - start;
  const int32_t len = p.seq_len[seq];
  const int32_t tile_row0 = (b - tile_start[seq]) * kTileRows;   // within the sequence
  const int32_t tile_rows = min(kTileRows, n - tile_row0);
  const int32_t pos0 = len - n + tile_row0;                    // position of the tile's row 0
  const int32_t key_end = pos0 + tile_rows;                      // keys [0, key_end)

  const int head = blockIdx.y;
  const int kv_head = head / (p.q_heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int r_lo = warp * 16 + g, r_hi = r_lo + 8;  // this thread's two rows in the tile

  // Q fragments straight from global memory; rows past the tile are zero.
  uint32_t qa[D / 16][4];
  const T* q = static_cast<const T*>(p.q);
  auto q_word = [&](int r, int d) -> uint32_t {
    if (r >= tile_rows) return 0u;
    const int64_t row = start + tile_row0 + r;
    return *reinterpret_cast<const uint32_t*>(q + (row * p.q_heads + head) * D + d);
  };
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    qa[kc][0] = q_word(r_lo, 16 * kc + 2 * t);
    qa[kc][1] = q_word(r_hi, 16 * kc + 2 * t);
    qa[kc][2] = q_word(r_lo, 16 * kc + 8 + 2 * t);
    qa[kc][3] = q_word(r_hi, 16 * kc + 8 + 2 * t);
  }

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float score_scale = p.scale * 1.4426950408889634f;
  const int32_t pos_lo = pos0 + r_lo, pos_hi = pos0 + r_hi;

  const uint8_t* slot_base = p.kv_base + slot * p.slot_stride;
  const int64_t head_bytes = int64_t(kv_head) * D * sizeof(T);
  constexpr int kVecsPerKey = D / kVec;

  for (int key0 = 0; key0 < key_end; key0 += kTileKeys) {
    __syncthreads();  // the previous step's fragments are read
    // Key-fastest: conflict-free stores into both K rows and V^T columns.
    for (int i = threadIdx.x; i < kTileKeys * kVecsPerKey; i += 128) {
      const int key = i % kTileKeys, vec = i / kTileKeys;
      uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
      if (key0 + key < key_end) {  // never read past the row range: it may be unmapped
        const uint8_t* token = slot_base + (key0 + key) * p.token_bytes + head_bytes + vec * 16;
        kr = __ldg(reinterpret_cast<const uint4*>(token + p.k_offset));
        vr = __ldg(reinterpret_cast<const uint4*>(token + p.v_offset));
      }
      *reinterpret_cast<uint4*>(&s_k[key * kKStride + vec * kVec]) = kr;
      const T* ve = reinterpret_cast<const T*>(&vr);
#pragma unroll
      for (int e = 0; e < kVec; ++e) s_vt[(vec * kVec + e) * kVStride + key] = ve[e];
    }
    __syncthreads();

    float s[kTileKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const T* krow = &s_k[(nt * 8 + g) * kKStride + 2 * t];
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        mma16816<T>(s[nt], qa[kc], *reinterpret_cast<const uint32_t*>(krow + 16 * kc),
                    *reinterpret_cast<const uint32_t*>(krow + 16 * kc + 8));
      }
    }
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = key0 + nt * 8 + 2 * t + e;
        s[nt][e] = key <= pos_lo ? s[nt][e] * score_scale : -INFINITY;
        s[nt][2 + e] = key <= pos_hi ? s[nt][2 + e] * score_scale : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[nt][e]);
        mx_hi = fmaxf(mx_hi, s[nt][2 + e]);
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {  // the 4 lanes of a quad share rows
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float ref_lo = mx_lo == -INFINITY ? 0.f : mx_lo;
    const float ref_hi = mx_hi == -INFINITY ? 0.f : mx_hi;
    const float corr_lo = fast_exp2(m_lo - ref_lo), corr_hi = fast_exp2(m_hi - ref_hi);
    m_lo = mx_lo;
    m_hi = mx_hi;
    l_lo *= corr_lo;
    l_hi *= corr_hi;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= corr_lo;
      o[dt][1] *= corr_lo;
      o[dt][2] *= corr_hi;
      o[dt][3] *= corr_hi;
    }
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt) {
      s[nt][0] = fast_exp2(s[nt][0] - ref_lo);
      s[nt][1] = fast_exp2(s[nt][1] - ref_lo);
      s[nt][2] = fast_exp2(s[nt][2] - ref_hi);
      s[nt][3] = fast_exp2(s[nt][3] - ref_hi);
      l_lo += s[nt][0] + s[nt][1];
      l_hi += s[nt][2] + s[nt][3];
    }
#pragma unroll
    for (int kc = 0; kc < kTileKeys / 16; ++kc) {
      // The C fragments of key tiles 2kc and 2kc+1 are exactly P's A fragment.
      const uint32_t pa[4] = {pack2<T>(s[2 * kc][0], s[2 * kc][1]),
                              pack2<T>(s[2 * kc][2], s[2 * kc][3]),
                              pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                              pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const T* vrow = &s_vt[(dt * 8 + g) * kVStride + 16 * kc + 2 * t];
        mma16816<T>(o[dt], pa, *reinterpret_cast<const uint32_t*>(vrow),
                    *reinterpret_cast<const uint32_t*>(vrow + 8));
      }
    }
  }

#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  T* out = static_cast<T*>(p.out);
  const int64_t row_lo = start + tile_row0 + r_lo, row_hi = start + tile_row0 + r_hi;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int d = dt * 8 + 2 * t;
    if (r_lo < tile_rows) {
      *reinterpret_cast<uint32_t*>(out + (row_lo * p.q_heads + head) * D + d) =
          pack2<T>(o[dt][0] / l_lo, o[dt][1] / l_lo);
    }
    if (r_hi < tile_rows) {
      *reinterpret_cast<uint32_t*>(out + (row_hi * p.q_heads + head) * D + d) =
          pack2<T>(o[dt][2] / l_hi, o[dt][3] / l_hi);
    }
  }
}

}  // namespace jvt::cuda
