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

// Attention of one row for the q heads sharing kv head g, keys at positions [0, pos].
template <typename E>
void attend_row(const AttnParams& p, const Seq& s, int64_t row, int64_t pos, int32_t g,
                std::vector<float>& scratch) {
  using T = typename E::T;
  const int32_t D = p.head_dim, group = p.q_heads / p.kv_heads;
  scratch.assign(static_cast<size_t>(group) * (2 * D + 2) + D, 0.0f);
  float* q = scratch.data();             // [group, D] scaled queries
  float* acc = q + group * D;            // [group, D] running sum of p * V
  float* m = acc + group * D;            // [group] running max
  float* l = m + group;                  // [group] running sum of p
  float* k = l + group;                  // [D] current key
  const T* qrow = static_cast<const T*>(p.q) + (row * p.q_heads + int64_t{g} * group) * D;
  for (int32_t j = 0; j < group * D; ++j) q[j] = E::load(qrow[j]) * p.scale;
  std::fill(m, m + group, -INFINITY);
  for (int64_t t = 0; t <= pos; ++t) {
    const T* kt = reinterpret_cast<const T*>(kv_address(p, s.slot, t, 0, g));
    const T* vt = reinterpret_cast<const T*>(kv_address(p, s.slot, t, 1, g));
    for (int32_t d = 0; d < D; ++d) k[d] = E::load(kt[d]);
    for (int32_t h = 0; h < group; ++h) {
      float score = 0.0f;
      for (int32_t d = 0; d < D; ++d) score += q[h * D + d] * k[d];
      const float m_new = std::max(m[h], score);
      const float correction = std::exp(m[h] - m_new), weight = std::exp(score - m_new);
      m[h] = m_new;
      l[h] = l[h] * correction + weight;
      for (int32_t d = 0; d < D; ++d) {
        acc[h * D + d] = acc[h * D + d] * correction + weight * E::load(vt[d]);
      }
    }
  }
  T* orow = static_cast<T*>(p.out) + (row * p.q_heads + int64_t{g} * group) * D;
  for (int32_t h = 0; h < group; ++h) {
    for (int32_t d = 0; d < D; ++d) orow[h * D + d] = E::store(acc[h * D + d] / l[h]);
  }
}

// Work item w covers (row w / kv_heads of the valid rows, kv head w % kv_heads); threads take
// items from a shared counter. Small steps run on the calling thread (spawning costs ~30 us).
template <typename E>
void attend(const AttnParams& p, const std::vector<Seq>& seqs) {
  std::vector<std::pair<int32_t, int64_t>> rows;  // (sequence index, row within it)
  int64_t work = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (int64_t r = 0; r < seqs[i].rows; ++r) {
      rows.emplace_back(static_cast<int32_t>(i), r);
      work += seqs[i].len - seqs[i].rows + r + 1;
    }
  }
  const int64_t items = static_cast<int64_t>(rows.size()) * p.kv_heads;
  std::atomic<int64_t> next{0};
  auto run = [&] {
    std::vector<float> scratch;
    for (int64_t w = next++; w < items; w = next++) {
      const auto [i, r] = rows[w / p.kv_heads];
      const Seq& s = seqs[i];
      attend_row<E>(p, s, s.first_row + r, s.len - s.rows + r,
                    static_cast<int32_t>(w % p.kv_heads), scratch);
    }
  };
  const int64_t flops = work * p.q_heads * p.head_dim;
  const int64_t threads = std::min<int64_t>(
      {std::max(1u, std::thread::hardware_concurrency()), items, 1 + flops / (1 << 20)});
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run);
  run();
  for (std::thread& t : pool) t.join();
}

ffi::Error attention_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer seq_start, ffi::AnyBuffer seq_slot,
                         ffi::AnyBuffer seq_len, ffi::Result<ffi::AnyBuffer> out,
                         int32_t store_id, int32_t layer, float scale) {
  std::shared_ptr<KVStore> store = find_store(store_id);
  if (store && store->spec().device >= 0) {
    return ffi::Error::InvalidArgument(
        "jvt_attention: store " + std::to_string(store_id) +
        " lives on CUDA device " + std::to_string(store->spec().device) +
        "; the CPU op needs a host store (device=-1)");
  }
  AttnParams p;
  ffi::Error err = prepare_attention(q, k, v, seq_start, seq_slot, seq_len, *out, store_id,
                                     layer, scale, &p);
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
                           .Arg<ffi::AnyBuffer>()          // q [T, Hq, D]
                           .Arg<ffi::AnyBuffer>()          // k [T, Hkv, D]
                           .Arg<ffi::AnyBuffer>()          // v [T, Hkv, D]
                           .Arg<ffi::AnyBuffer>()          // seq_start int32 [S+1]
                           .Arg<ffi::AnyBuffer>()          // seq_slot int32 [S]
                           .Arg<ffi::AnyBuffer>()          // seq_len int32 [S]
                           .Ret<ffi::AnyBuffer>()          // out [T, Hq, D]
                           .Attr<int32_t>("store_id")      // key of the native store registry
                           .Attr<int32_t>("layer")         // decoder layer in [0, layers)
                           .Attr<float>("scale"));         // softmax scale

XLA_FFI_Handler* const kJvtAttentionCpu = kAttentionCpuHandler;

}  // namespace jvt
