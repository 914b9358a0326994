// Kernel 2: FlashDecoding-style split-KV attention for any mix of decode rows and prefill
// chunks, plus the merge kernel that combines the splits.
//
// Grid: x = row, y = (kv head, block of HB query heads of its GQA group), z = split of the
// row's key range [0, pos]. A CTA finds its row's slot and position on the device, so the
// host needs only static shapes. Inside a CTA, kLanes threads share one token (16 bytes of K
// and of V each) and kGroups token groups walk the split's keys independently, each with its
// own fp32 online softmax (exp2 of scores pre-scaled by scale * log2(e)); the groups are
// combined in shared memory at the end. The HB query heads reuse every K/V load (GQA
// packing). With one split the CTA writes `out`; otherwise it writes a normalised partial
// output and its log2-sum-exp2 to scratch, and merge_splits_kernel combines them.
#pragma once

#include <cstdint>

#include "ragged_rows.cuh"
#include "vec16.cuh"

namespace jvt::cuda {

constexpr int kMaxSplits = 64;  // merge_splits_kernel: warp 0 holds two splits per lane

struct SplitKV {
  int32_t num_splits;   // key ranges per row; 1: the attention kernel writes out directly
  int32_t head_blocks;  // CTAs per kv head: ceil(group / HB)
  float* partial_o;     // [num_splits, T, Hq, D] normalised output of each split (scratch)
  float* partial_lse;   // [num_splits, T, Hq] log2-sum-exp2 of each split; -inf when empty
  int32_t prefill_min_rows;  // rows of sequences this long are left to prefill_attention
};

template <int D, int HB>
struct SplitKVConfig {
  static constexpr int kThreads = 128;
  static constexpr int kLanes = D / kVec;                // threads per token
  static constexpr int kGroups = kThreads / kLanes;      // tokens in flight per step
  static constexpr int kUnroll = HB >= 8 ? 2 : 4;        // steps whose loads are issued together
  static constexpr int kTile = kGroups * kUnroll;        // keys per CTA iteration
  static_assert(D % kVec == 0 && kThreads % kLanes == 0 && kLanes <= 32);
};

__device__ __forceinline__ uint4 load_nc(const uint8_t* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

template <typename T, int D, int HB>
__global__ void __launch_bounds__(SplitKVConfig<D, HB>::kThreads)
split_kv_attention_kernel(AttnParams p, SplitKV sk, const int32_t* seq_ok) {
  using C = SplitKVConfig<D, HB>;
  const int64_t row = blockIdx.x;
  const int group = p.q_heads / p.kv_heads;
  const int kv_head = blockIdx.y / sk.head_blocks;
  const int head_in_group = (blockIdx.y % sk.head_blocks) * HB;
  const int heads = min(HB, group - head_in_group);
  const int64_t q_head0 = int64_t(kv_head) * group + head_in_group;
  const int split = blockIdx.z;
  const int lane = threadIdx.x % C::kLanes;
  const int tgroup = threadIdx.x / C::kLanes;

  const RowTarget target = locate_row(p, seq_ok, row);
  // Rows of long sequences are computed by prefill_attention_kernel, launched after this one
  // (and after the merge): here they only get the empty-split treatment.
  const bool skip = target.slot == kRowSkipped || target.rows >= sk.prefill_min_rows;
  const int len = skip ? 0 : target.pos + 1;
  const int per_split =
      (len + sk.num_splits * C::kTile - 1) / (sk.num_splits * C::kTile) * C::kTile;
  const int kv_begin = split * per_split;
  const int kv_end = min(len, kv_begin + per_split);
  const int64_t plane = p.num_rows * p.q_heads;  // (row, head) entries per split

  if (kv_begin >= kv_end) {  // padding, rejected, prefill rows, or a split past the keys
    if (sk.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + (row * p.q_heads + q_head0) * D;
      for (int i = threadIdx.x; i < heads * D; i += C::kThreads) out[i] = from_float<T>(0.f);
    } else if (threadIdx.x < heads) {
      sk.partial_lse[split * plane + row * p.q_heads + q_head0 + threadIdx.x] = -INFINITY;
    }
    return;
  }

  float q[HB][kVec];
  const float q_scale = p.scale * 1.4426950408889634f;  // exp2 domain
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    if (g < heads) {
      const T* qrow = static_cast<const T*>(p.q) + ((row * p.q_heads + q_head0 + g) * D);
      unpack8<T>(*reinterpret_cast<const uint4*>(qrow + lane * kVec), q[g]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[g][e] *= q_scale;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[g][e] = 0.f;
    }
  }

  const int64_t head_bytes = (int64_t(kv_head) * D + lane * kVec) * sizeof(T);
  const uint8_t* slot_base = p.kv_base + target.slot * p.slot_stride;
  const uint8_t* k_base = slot_base + p.k_offset + head_bytes;
  const uint8_t* v_base = slot_base + p.v_offset + head_bytes;

  float m[HB], l[HB], acc[HB][kVec];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  // Software pipeline: the next tile's K/V loads are in flight while this tile is computed.
  uint4 kr[C::kUnroll], vr[C::kUnroll];
  auto load_tile = [&](int t0, uint4 (&kt)[C::kUnroll], uint4 (&vt)[C::kUnroll]) {
#pragma unroll
    for (int u = 0; u < C::kUnroll; ++u) {
      const int t = t0 + u * C::kGroups + tgroup;
      if (t < kv_end) {
        kt[u] = load_nc(k_base + t * p.token_bytes);
        vt[u] = load_nc(v_base + t * p.token_bytes);
      } else {
        kt[u] = vt[u] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  load_tile(kv_begin, kr, vr);
  for (int t0 = kv_begin; t0 < kv_end; t0 += C::kTile) {
    uint4 kn[C::kUnroll], vn[C::kUnroll];
    load_tile(t0 + C::kTile, kn, vn);
    float s[C::kUnroll][HB];
#pragma unroll
    for (int u = 0; u < C::kUnroll; ++u) {
      float kf[kVec];
      unpack8<T>(kr[u], kf);
      const bool valid = t0 + u * C::kGroups + tgroup < kv_end;
#pragma unroll
      for (int g = 0; g < HB; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][e], kf[e], dot);
#pragma unroll
        for (int off = C::kLanes / 2; off > 0; off /= 2) {
          dot += __shfl_xor_sync(0xffffffffu, dot, off);
        }
        s[u][g] = valid ? dot : -INFINITY;
      }
    }
    float ref[HB];  // exponent reference of this step; 0 while a group has seen no key
#pragma unroll
    for (int g = 0; g < HB; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < C::kUnroll; ++u) mx = fmaxf(mx, s[u][g]);
      ref[g] = mx == -INFINITY ? 0.f : mx;
      const float corr = fast_exp2(m[g] - ref[g]);
      m[g] = mx;
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= corr;
    }
#pragma unroll
    for (int u = 0; u < C::kUnroll; ++u) {
      float vf[kVec];
      unpack8<T>(vr[u], vf);
#pragma unroll
      for (int g = 0; g < HB; ++g) {
        const float pr = fast_exp2(s[u][g] - ref[g]);
        l[g] += pr;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(pr, vf[e], acc[g][e]);
      }
    }
#pragma unroll
    for (int u = 0; u < C::kUnroll; ++u) {
      kr[u] = kn[u];
      vr[u] = vn[u];
    }
  }

  // Combine the token groups: each holds (m, l, acc) over its own subset of the keys.
  __shared__ float s_acc[C::kGroups][HB][D];
  __shared__ float s_m[C::kGroups][HB];
  __shared__ float s_l[C::kGroups][HB];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) s_acc[tgroup][g][lane * kVec + e] = acc[g][e];
    if (lane == 0) {
      s_m[tgroup][g] = m[g];
      s_l[tgroup][g] = l[g];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads * D; i += C::kThreads) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < C::kGroups; ++j) mx = fmaxf(mx, s_m[j][g]);
    float sum = 0.f, o = 0.f;  // mx is finite: the split has at least one key
#pragma unroll
    for (int j = 0; j < C::kGroups; ++j) {
      const float w = fast_exp2(s_m[j][g] - mx);
      sum += s_l[j][g] * w;
      o += s_acc[j][g][d] * w;
    }
    const int64_t entry = row * p.q_heads + q_head0 + g;
    if (sk.num_splits == 1) {
      static_cast<T*>(p.out)[entry * D + d] = from_float<T>(o / sum);
    } else {
      sk.partial_o[(split * plane + entry) * D + d] = o / sum;
      if (d == 0) sk.partial_lse[split * plane + entry] = mx + __log2f(sum);
    }
  }
}

// Grid (row, q head), D threads: out = sum_s w_s o_s with w_s = exp2(lse_s - max) / sum.
// Warp 0 turns the split's lse values into weights; a row whose splits are all empty
// (padding, rejected sequence) gets zeros.
template <typename T>
__global__ void merge_splits_kernel(AttnParams p, SplitKV sk) {
  static_assert(kMaxSplits <= 64, "warp 0 holds two splits per lane");
  __shared__ float weight[kMaxSplits];
  const int64_t plane = p.num_rows * p.q_heads;
  const int64_t entry = blockIdx.x * int64_t(p.q_heads) + blockIdx.y;
  if (threadIdx.x < 32) {
    float lse[2], mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int s = threadIdx.x + 32 * j;
      lse[j] = s < sk.num_splits ? sk.partial_lse[s * plane + entry] : -INFINITY;
      mx = fmaxf(mx, lse[j]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float w[2], sum = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      w[j] = lse[j] == -INFINITY ? 0.f : fast_exp2(lse[j] - mx);
      sum += w[j];
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int s = threadIdx.x + 32 * j;
      if (s < sk.num_splits) weight[s] = sum > 0.f ? w[j] / sum : 0.f;
    }
  }
  __syncthreads();
  const int d = threadIdx.x;
  float o = 0.f;
  for (int s = 0; s < sk.num_splits; ++s) {
    if (weight[s] != 0.f) o += weight[s] * sk.partial_o[(s * plane + entry) * p.head_dim + d];
  }
  static_cast<T*>(p.out)[entry * p.head_dim + d] = from_float<T>(o);
}

}  // namespace jvt::cuda
