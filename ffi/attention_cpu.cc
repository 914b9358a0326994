// CPU handler of jvt_attention: writes this step's K/V into the host-backend KV store, then
// computes causal attention over each slot's cached positions (fp32 math, online softmax).
// It is the reference twin of the CUDA kernels: same params, same safety rules.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace jvt {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0);
  if (absx >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (absx < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (absx < 0x33000000u) return sign;
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(absx >> 23);
    const uint32_t half_mant = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    const bool up = rem > halfway || (rem == halfway && (half_mant & 1));
    return sign | static_cast<uint16_t>(half_mant + up);
  }
  const uint32_t rounded = absx + 0xfffu + ((absx >> 13) & 1);  // round to nearest even
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

struct F32 {
  using T = float;
  static float load(T x) { return x; }
  static T store(float x) { return x; }
};
struct F16 {
  using T = uint16_t;
  static float load(T x) { return half_to_float(x); }
  static T store(float x) { return float_to_half(x); }
};
struct BF16 {
  using T = uint16_t;
  static float load(T x) { return bf16_to_float(x); }
  static T store(float x) { return float_to_bf16(x); }
};

// One validated sequence of the step.
struct Seq {
  int64_t first_row, rows, slot, len;
};

void set_error(const AttnParams& p, int32_t code) {
  __atomic_store_n(p.error_flag, code, __ATOMIC_RELAXED);
}

// Applies the safety rules; returns the sequences that may be touched.
std::vector<Seq> valid_sequences(const AttnParams& p) {
  std::vector<Seq> seqs;
  for (int64_t i = 0; i < p.num_seqs; ++i) {
    const int64_t start = p.seq_start[i], end = p.seq_start[i + 1];
    if (start == end || p.seq_slot[i] == kSlotMasked) continue;
    const int64_t slot = p.seq_slot[i], len = p.seq_len[i];
    if (start < 0 || end < start || end > p.num_rows || len < end - start) {
      set_error(p, kAttnErrLength);
    } else if (slot < 0 || slot >= p.slots) {
      set_error(p, kAttnErrSlot);
    } else if (len > __atomic_load_n(&p.capacity[slot], __ATOMIC_ACQUIRE)) {
      set_error(p, kAttnErrCapacity);
    } else {
      seqs.push_back({start, end - start, slot, len});
    }
  }
  return seqs;
}

void write_kv(const AttnParams& p, const std::vector<Seq>& seqs) {
  const int64_t row_bytes = int64_t{p.kv_heads} * p.head_dim * dtype_bytes(p.dtype);
  for (const Seq& s : seqs) {
    for (int64_t r = 0; r < s.rows; ++r) {
      const int64_t row = s.first_row + r, pos = s.len - s.rows + r;
      std::memcpy(kv_address(p, s.slot, pos, 0, 0),
                  static_cast<const uint8_t*>(p.k) + row * row_bytes, row_bytes);
      std::memcpy(kv_address(p, s.slot, pos, 1, 0),
                  static_cast<const uint8_t*>(p.v) + row * row_bytes, row_bytes);
    }
  }
}

constexpr int64_t kRowTile = 16;   // query rows of one sequence that share each K/V block
constexpr int64_t kKeyBlock = 64;  // keys converted to fp32 at a time

#define JVT_INLINE __attribute__((always_inline)) inline

// W-lane fp32 vectors in GCC's vector extensions: the tile kernel below is written once and
// inlined into one wrapper per kernel version, whose target attribute decides the registers
// (W = 16: AVX-512; W = 8: AVX2, or pairs of SSE registers in the portable version).
template <int W>
struct Lanes {  // (GCC drops vector_size on a dependent typedef used inside its own class)
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

template <int W>
struct Simd {
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;

  static JVT_INLINE F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static JVT_INLINE void store(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static JVT_INLINE F splat(float x) { return F{} + x; }

  static JVT_INLINE float sum(F v) {
    if constexpr (W == 16) {
      return Simd<8>::sum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    } else {
      static_assert(W == 8, "8 or 16 lanes");
      const auto h = __builtin_shufflevector(v, v, 0, 1, 2, 3) +
                     __builtin_shufflevector(v, v, 4, 5, 6, 7);
      const auto q = __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
      return q[0] + q[1];
    }
  }

  // e^x for x <= 0 (the scores minus their running maximum), to about 2 ulp: x = n ln2 + r
  // with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, 2^n through the exponent bits.
  // Below -87 (e^x < 2^-125, nothing next to the maximum's e^0 = 1) x is clamped there.
  static JVT_INLINE F exp(F x) {
    x = x < -87.0f ? splat(-87.0f) : x;
    const F magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const F n = (x * 1.44269504088896341f + magic) - magic;
    const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    F poly = splat(1.9875691500e-4f);
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const F er = poly * r * r + r + 1.0f;
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    F scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return er * scale;
  }
};

// Per-thread fp32 buffers of one work item (reused by every call on that thread). Rows of Dp
// floats: head_dim rounded up to the vector width, zero-padded.
struct Scratch {
  std::vector<float> q, acc, m, l;  // [nq, Dp] scaled q and sum p*V; [nq] max, sum p
  std::vector<float> k, v, s;       // [kKeyBlock, Dp] converted K and V rows; [kKeyBlock + W]
  std::vector<const float*> krow, vrow;  // [kKeyBlock] the block's K and V rows
};

// Rows [r0, r1) of sequence s (relative to its first row), the q heads of kv head g: online
// softmax over blocks of keys. Each key's score is a dot product over head_dim (vectors of W
// lanes), its p * V row added into the query's accumulator, so one pass reads each K and V row
// once per query and needs no transposition. fp32 KV rows are read where the store holds them
// (when head_dim is a multiple of W); other dtypes are converted once per block.
template <int W, typename E>
JVT_INLINE void attend_tile(const AttnParams& p, const Seq& s, int64_t r0, int64_t r1,
                            int32_t g, Scratch& w) {
  using V = Simd<W>;
  using F = typename V::F;
  using T = typename E::T;
  const int64_t D = p.head_dim, Dp = (D + W - 1) / W * W, group = p.q_heads / p.kv_heads;
  const int64_t nq = (r1 - r0) * group;
  const int64_t first_pos = s.len - s.rows, last = first_pos + r1 - 1;
  constexpr bool kDirect = std::is_same_v<E, F32>;
  const bool direct = kDirect && D == Dp;
  w.q.assign(nq * Dp, 0.0f);
  w.acc.assign(nq * Dp, 0.0f);
  w.m.assign(nq, -INFINITY);
  w.l.assign(nq, 0.0f);
  w.s.resize(kKeyBlock + W);
  w.krow.resize(kKeyBlock);
  w.vrow.resize(kKeyBlock);
  if (!direct) {
    w.k.resize(kKeyBlock * Dp);
    w.v.resize(kKeyBlock * Dp);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* qrow = static_cast<const T*>(p.q) + ((s.first_row + r) * p.q_heads + g * group) * D;
    for (int64_t i = 0; i < group; ++i) {
      float* q = &w.q[((r - r0) * group + i) * Dp];
      for (int64_t d = 0; d < D; ++d) q[d] = E::load(qrow[i * D + d]) * p.scale;
    }
  }
  for (int64_t t0 = 0; t0 <= last; t0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, last + 1 - t0);
    for (int64_t j = 0; j < nb; ++j) {
      const T* kt = reinterpret_cast<const T*>(kv_address(p, s.slot, t0 + j, 0, g));
      const T* vt = reinterpret_cast<const T*>(kv_address(p, s.slot, t0 + j, 1, g));
      if (direct) {
        w.krow[j] = reinterpret_cast<const float*>(kt);
        w.vrow[j] = reinterpret_cast<const float*>(vt);
      } else {
        float* kj = &w.k[j * Dp];
        float* vj = &w.v[j * Dp];
        for (int64_t d = 0; d < D; ++d) {
          kj[d] = E::load(kt[d]);
          vj[d] = E::load(vt[d]);
        }
        std::fill(kj + D, kj + Dp, 0.0f);  // padding lanes
        std::fill(vj + D, vj + Dp, 0.0f);
        w.krow[j] = kj;
        w.vrow[j] = vj;
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = std::min(nb, first_pos + r + 1 - t0);  // causal: keys <= position
      if (n <= 0) continue;
      for (int64_t i = (r - r0) * group; i < (r - r0 + 1) * group; ++i) {
        const float* q = &w.q[i * Dp];
        float* sc = w.s.data();
        float block_max = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = w.krow[j];
          F a = V::load(q) * V::load(kj);
          for (int64_t c = W; c < Dp; c += W) a += V::load(q + c) * V::load(kj + c);
          sc[j] = V::sum(a);
          block_max = std::max(block_max, sc[j]);
        }
        const float m_new = std::max(w.m[i], block_max);
        F psum = {};
        for (int64_t j = 0; j < n; j += W) {
          F e = V::exp(V::load(sc + j) - m_new);
          for (int64_t lane = n - j; lane < W; ++lane) e[lane] = 0.0f;  // past the last key
          V::store(sc + j, e);
          psum += e;
        }
        const float correction = std::exp(w.m[i] - m_new);  // 0 on the first block
        w.m[i] = m_new;
        w.l[i] = w.l[i] * correction + V::sum(psum);
        float* acc = &w.acc[i * Dp];
        for (int64_t c = 0; c < Dp; c += W) {
          F a = V::load(acc + c) * correction;
          for (int64_t j = 0; j < n; ++j) a += sc[j] * V::load(w.vrow[j] + c);
          V::store(acc + c, a);
        }
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    T* orow = static_cast<T*>(p.out) + ((s.first_row + r) * p.q_heads + g * group) * D;
    for (int64_t i = 0; i < group; ++i) {
      const int64_t k = (r - r0) * group + i;
      for (int64_t d = 0; d < D; ++d) orow[i * D + d] = E::store(w.acc[k * Dp + d] / w.l[k]);
    }
  }
}

// One work item: a tile of up to kRowTile rows of one sequence and one kv head.
struct Tile {
  int32_t seq;
  int64_t r0, r1;
  int32_t g;
};

using TileFn = void (*)(const AttnParams&, const Seq&, const Tile&);

template <typename E>
void tile_portable(const AttnParams& p, const Seq& s, const Tile& t) {
  thread_local Scratch scratch;
  attend_tile<8, E>(p, s, t.r0, t.r1, t.g, scratch);
}

#if defined(__x86_64__)
template <typename E>
JVT_AVX2 __attribute__((flatten)) void tile_avx2(const AttnParams& p, const Seq& s,
                                                 const Tile& t) {
  thread_local Scratch scratch;
  attend_tile<8, E>(p, s, t.r0, t.r1, t.g, scratch);
}

template <typename E>
JVT_AVX512 __attribute__((flatten)) void tile_avx512(const AttnParams& p, const Seq& s,
                                                     const Tile& t) {
  thread_local Scratch scratch;
  attend_tile<16, E>(p, s, t.r0, t.r1, t.g, scratch);
}
#endif

template <typename E>
TileFn tile_fn(CpuIsa isa) {
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512) return tile_avx512<E>;
  if (isa == CpuIsa::kAvx2) return tile_avx2<E>;
#endif
  return tile_portable<E>;
}

HelperPolicy g_helpers;

// Query-key products of a call below which it never asks the pool for helpers (about 50 us
// of one core's work; waking a pool thread can take as long).
constexpr int64_t kHelperWork = 1 << 12;

// Items taken from a shared counter by the calling thread and, for large steps, by helpers
// from XLA's intra-op pool (the policy of cpu_kernels.h decides whether they pay).
template <typename E>
void attend(ffi::ThreadPool& pool, const AttnParams& p, const std::vector<Seq>& seqs) {
  // Reused: this runs once per layer of every step. Helpers see it through the reference (a
  // thread_local named in their lambda would be their own, empty one).
  thread_local std::vector<Tile> buffer;
  std::vector<Tile>& tiles = buffer;
  tiles.clear();
  int64_t work = 0;  // query-key pairs
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (int64_t r0 = 0; r0 < seqs[i].rows; r0 += kRowTile) {
      for (int32_t g = 0; g < p.kv_heads; ++g) {
        tiles.push_back(
            {static_cast<int32_t>(i), r0, std::min(r0 + kRowTile, seqs[i].rows), g});
      }
    }
    work += seqs[i].rows * (seqs[i].len - seqs[i].rows) + seqs[i].rows * (seqs[i].rows + 1) / 2;
  }
  work *= p.q_heads;
  if (tiles.empty()) return;
  const TileFn fn = tile_fn<E>(cpu_isa());
  const int64_t items = static_cast<int64_t>(tiles.size());
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t wanted = work >= kHelperWork ? std::min(threads - 1, items - 1) : 0;
  g_helpers.run(pool, items, wanted, work,
                [&](int64_t i) { fn(p, seqs[tiles[i].seq], tiles[i]); });
}

ffi::Error attention_cpu(ffi::ThreadPool pool, int32_t ordinal, ffi::AnyBuffer q,
                         ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer seq_start,
                         ffi::AnyBuffer seq_slot, ffi::AnyBuffer seq_len,
                         ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> /*workspace*/, int32_t store_id,
                         int32_t layer, float scale) {
  std::string why;
  std::shared_ptr<KVStore> store = find_store_for(store_id, ordinal, &why);
  if (store && store->spec().device >= 0) {
    return ffi::Error::InvalidArgument(
        "jvt_attention: store " + std::to_string(store_id) +
        " lives on CUDA device " + std::to_string(store->spec().device) +
        "; the CPU op needs a host store (device=-1)");
  }
  AttnParams p;
  ffi::Error err = prepare_attention(q, k, v, seq_start, seq_slot, seq_len, *out, store_id,
                                     layer, scale, ordinal, /*device=*/-1,
                                     /*map_pending=*/true, &p);
  if (err.failure()) return err;
  std::memset(p.out, 0, out->size_bytes());
  const std::vector<Seq> seqs = valid_sequences(p);
  write_kv(p, seqs);
  switch (p.dtype) {
    case DType::kF32: attend<F32>(pool, p, seqs); break;
    case DType::kF16: attend<F16>(pool, p, seqs); break;
    case DType::kBF16: attend<BF16>(pool, p, seqs); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kAttentionCpuHandler, attention_cpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()         // XLA's intra-op pool (tiles)
                           .Ctx<ffi::DeviceOrdinal>()      // which member of a store group
                           .Arg<ffi::AnyBuffer>()          // q [T, Hq, D]
                           .Arg<ffi::AnyBuffer>()          // k [T, Hkv, D]
                           .Arg<ffi::AnyBuffer>()          // v [T, Hkv, D]
                           .Arg<ffi::AnyBuffer>()          // seq_start int32 [S+1]
                           .Arg<ffi::AnyBuffer>()          // seq_slot int32 [S]
                           .Arg<ffi::AnyBuffer>()          // seq_len int32 [S]
                           .Ret<ffi::AnyBuffer>()          // out [T, Hq, D]
                           .Ret<ffi::AnyBuffer>()          // workspace u8 [1], unused: both
                                                           // handlers take one call signature
                           .Attr<int32_t>("store_id")      // key of the native store registry
                           .Attr<int32_t>("layer")         // decoder layer in [0, layers)
                           .Attr<float>("scale"));         // softmax scale

XLA_FFI_Handler* const kJvtAttentionCpu = kAttentionCpuHandler;

}  // namespace jvt
