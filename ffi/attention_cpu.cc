// CPU handler of jvt_attention: writes this step's K/V into the host-backend KV store, then
// computes causal attention over each slot's cached positions (fp32 math, online softmax).
// It is the reference twin of the CUDA kernels: same params, same safety rules.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "attention.h"

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
    if (start == end) continue;
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

// Per-thread fp32 buffers of one work item.
struct Scratch {
  std::vector<float> q, acc, m, l;  // [rows*group, D] scaled q and sum p*V; [rows*group] max, sum p
  std::vector<float> kt, v, s;      // [D, kKeyBlock] K transposed; [kKeyBlock, D] V; [kKeyBlock]
};

// Rows [r0, r1) of sequence s (relative to its first row), the q heads of kv head g: online
// softmax over key blocks; each block is converted once and reused by every row and head.
// The loops run over contiguous fp32 (keys for scores, head_dim for p*V) so they vectorise.
template <typename E>
void attend_tile(const AttnParams& p, const Seq& s, int64_t r0, int64_t r1, int32_t g,
                 Scratch& w) {
  using T = typename E::T;
  const int64_t D = p.head_dim, group = p.q_heads / p.kv_heads, nq = (r1 - r0) * group;
  const int64_t first_pos = s.len - s.rows, last = first_pos + r1 - 1;
  w.q.resize(nq * D);
  w.acc.assign(nq * D, 0.0f);
  w.m.assign(nq, -INFINITY);
  w.l.assign(nq, 0.0f);
  w.kt.resize(D * kKeyBlock);
  w.v.resize(kKeyBlock * D);
  w.s.resize(kKeyBlock);
  for (int64_t r = r0; r < r1; ++r) {
    const T* qrow = static_cast<const T*>(p.q) + ((s.first_row + r) * p.q_heads + g * group) * D;
    float* q = &w.q[(r - r0) * group * D];
    for (int64_t j = 0; j < group * D; ++j) q[j] = E::load(qrow[j]) * p.scale;
  }
  for (int64_t t0 = 0; t0 <= last; t0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, last + 1 - t0);
    for (int64_t j = 0; j < nb; ++j) {
      const T* kt = reinterpret_cast<const T*>(kv_address(p, s.slot, t0 + j, 0, g));
      const T* vt = reinterpret_cast<const T*>(kv_address(p, s.slot, t0 + j, 1, g));
      for (int64_t d = 0; d < D; ++d) {
        w.kt[d * kKeyBlock + j] = E::load(kt[d]);
        w.v[j * D + d] = E::load(vt[d]);
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = std::min(nb, first_pos + r + 1 - t0);  // causal: keys <= position
      if (n <= 0) continue;
      for (int64_t i = (r - r0) * group; i < (r - r0 + 1) * group; ++i) {
        float* sc = w.s.data();
        std::fill(sc, sc + n, 0.0f);
        for (int64_t d = 0; d < D; ++d) {
          const float qd = w.q[i * D + d];
          const float* kd = &w.kt[d * kKeyBlock];
          for (int64_t j = 0; j < n; ++j) sc[j] += qd * kd[j];
        }
        const float m_new = std::max(w.m[i], *std::max_element(sc, sc + n));
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = std::exp(sc[j] - m_new);
          sum += sc[j];
        }
        const float correction = std::exp(w.m[i] - m_new);
        w.m[i] = m_new;
        w.l[i] = w.l[i] * correction + sum;
        float* acc = &w.acc[i * D];
        for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
        for (int64_t j = 0; j < n; ++j) {
          const float pj = sc[j];
          const float* vj = &w.v[j * D];
          for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
        }
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    T* orow = static_cast<T*>(p.out) + ((s.first_row + r) * p.q_heads + g * group) * D;
    for (int64_t i = 0; i < group; ++i) {
      const int64_t k = (r - r0) * group + i;
      for (int64_t d = 0; d < D; ++d) orow[i * D + d] = E::store(w.acc[k * D + d] / w.l[k]);
    }
  }
}

// One work item per (tile of up to kRowTile rows of one sequence, kv head); threads take items
// from a shared counter. Small steps run on the calling thread (spawning costs ~30 us).
template <typename E>
void attend(const AttnParams& p, const std::vector<Seq>& seqs) {
  struct Tile {
    int32_t seq;
    int64_t r0, r1;
  };
  std::vector<Tile> tiles;
  int64_t work = 0;  // query-key pairs
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (int64_t r0 = 0; r0 < seqs[i].rows; r0 += kRowTile) {
      tiles.push_back({static_cast<int32_t>(i), r0, std::min(r0 + kRowTile, seqs[i].rows)});
    }
    work += seqs[i].rows * (seqs[i].len - seqs[i].rows) + seqs[i].rows * (seqs[i].rows + 1) / 2;
  }
  const int64_t items = static_cast<int64_t>(tiles.size()) * p.kv_heads;
  std::atomic<int64_t> next{0};
  auto run = [&] {
    Scratch scratch;
    for (int64_t w = next++; w < items; w = next++) {
      const Tile& t = tiles[w / p.kv_heads];
      attend_tile<E>(p, seqs[t.seq], t.r0, t.r1, static_cast<int32_t>(w % p.kv_heads), scratch);
    }
  };
  const int64_t flops = work * p.q_heads * p.head_dim * 4;
  const int64_t threads = std::min<int64_t>(
      {std::max(1u, std::thread::hardware_concurrency()), items, 1 + flops / (4 << 20)});
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run);
  run();
  for (std::thread& t : pool) t.join();
}

ffi::Error attention_cpu(int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer seq_start, ffi::AnyBuffer seq_slot,
                         ffi::AnyBuffer seq_len, ffi::Result<ffi::AnyBuffer> out,
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
    case DType::kF32: attend<F32>(p, seqs); break;
    case DType::kF16: attend<F16>(p, seqs); break;
    case DType::kBF16: attend<BF16>(p, seqs); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kAttentionCpuHandler, attention_cpu,
                       ffi::Ffi::Bind()
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
