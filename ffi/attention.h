// The jvt_attention XLA FFI op: one plain params struct shared by the CPU handler
// (attention_cpu.cc) and the CUDA handler (cuda/attention_handler.cu), plus the host-side
// validation both handlers run before touching memory. See docs/ops.md for the contract.
//
// Packed ragged batch: sequence i owns rows [seq_start[i], seq_start[i+1]) of q/k/v/out; its
// n_i = seq_start[i+1] - seq_start[i] new tokens take positions [seq_len[i] - n_i, seq_len[i])
// of slot seq_slot[i]. Row r of sequence i (position p) writes its K/V at (slot, p, layer) and
// attends causally to positions [0, p] of that slot. Rows covered by no valid sequence are
// padding: out = 0, nothing written.
//
// Safety (checked on the device, per sequence, by every kernel): a sequence with n_i > 0 is
// skipped -- nothing read or written, its rows' output 0, *error_flag set to the code below --
// when its slot is outside [0, slots), seq_len > capacity[slot], seq_len < n_i, or its row
// range is not inside [0, T]. Sequences with n_i == 0 are ignored (their slot may be -1), and
// so are sequences whose slot is kSlotMasked (their rows are padding: output 0, nothing read or
// written, no error): the K-step decode call masks the rows that finished inside the call.
#pragma once

#include <cstdint>
#include <exception>
#include <string>

#include "kv_store.h"
#include "xla/ffi/api/ffi.h"

namespace jvt {

// Values written to the store's error flag (any nonzero value makes KVStore.check() raise).
enum AttnError : int32_t {
  kAttnErrSlot = 1,      // seq_slot outside [0, slots)
  kAttnErrCapacity = 2,  // seq_len beyond the slot's mapped capacity
  kAttnErrLength = 3,    // seq_len < number of new tokens, or a row range outside [0, T]
};

// seq_slot value of a sequence whose rows are masked out of this call (see above).
constexpr int32_t kSlotMasked = -2;

// Everything a kernel needs. Pointers are device pointers on CUDA, host pointers on the CPU.
struct AttnParams {
  const void* q;             // [T, Hq, D] queries, dtype
  const void* k;             // [T, Hkv, D] this step's keys, dtype
  const void* v;             // [T, Hkv, D] this step's values, dtype
  void* out;                 // [T, Hq, D] output, dtype
  const int32_t* seq_start;  // [S+1] first row of each sequence (device memory)
  const int32_t* seq_slot;   // [S] KV-store slot of each sequence (device memory)
  const int32_t* seq_len;    // [S] KV length of each sequence after this step (device memory)
  int64_t num_rows;          // T: rows of q/k/v/out, padding included
  int64_t num_seqs;          // S: sequence entries
  int32_t q_heads;           // Hq
  int32_t kv_heads;          // Hkv; q head h reads kv head h / (Hq / Hkv)
  int32_t head_dim;          // D
  DType dtype;               // element type of q, k, v, out and the KV store
  float scale;               // softmax scale applied to q . k
  uint8_t* kv_base;          // store->base(): start of the virtual reservation
  int64_t slot_stride;       // bytes between slot s and slot s + 1
  int64_t token_bytes;       // bytes between position p and p + 1 of one slot
  int64_t k_offset;          // bytes from a token's start to this layer's K, kv head 0
  int64_t v_offset;          // bytes from a token's start to this layer's V, kv head 0
  int32_t slots;             // number of slots; capacity has this many entries
  const int32_t* capacity;   // [slots] mapped capacity in tokens (device-readable)
  int32_t* error_flag;       // int32 set to an AttnError on a safety violation (device-writable)
};

// Byte address of element 0 of head `h` of K (kv = 0) or V (kv = 1) at (slot, pos).
inline uint8_t* kv_address(const AttnParams& p, int64_t slot, int64_t pos, int kv, int64_t h) {
  return p.kv_base + slot * p.slot_stride + pos * p.token_bytes +
         (kv ? p.v_offset : p.k_offset) + h * p.head_dim * dtype_bytes(p.dtype);
}

inline bool ffi_dtype_to_jvt(xla::ffi::DataType t, DType* out) {
  switch (t) {
    case xla::ffi::DataType::F32: *out = DType::kF32; return true;
    case xla::ffi::DataType::F16: *out = DType::kF16; return true;
    case xla::ffi::DataType::BF16: *out = DType::kBF16; return true;
    default: return false;
  }
}

// Host-side part shared by both handlers: find the store (store_id names a store, or a
// tensor-parallel group whose member for XLA's device `ordinal` is used), check that it lives
// where the handler runs (device -1: the host handler; N >= 0: the CUDA handler on device N), check every
// buffer's shape and dtype against it and the layer attribute, map pending extensions
// (apply_pending) when map_pending (the host handler; the CUDA handler leaves that to the
// engine, before dispatch, so that it does no host work under a CUDA graph), fill *params. Never reads device buffers. Returns an InvalidArgument error
// naming what was wrong.
inline xla::ffi::Error prepare_attention(
    xla::ffi::AnyBuffer q, xla::ffi::AnyBuffer k, xla::ffi::AnyBuffer v,
    xla::ffi::AnyBuffer seq_start, xla::ffi::AnyBuffer seq_slot, xla::ffi::AnyBuffer seq_len,
    xla::ffi::AnyBuffer out, int32_t store_id, int32_t layer, float scale, int32_t ordinal,
    int32_t device, bool map_pending, AttnParams* params) {
  using xla::ffi::Error;
  auto fail = [](const std::string& what) {
    return Error::InvalidArgument("jvt_attention: " + what);
  };
  std::string why;
  std::shared_ptr<KVStore> store = find_store_for(store_id, ordinal, &why);
  if (!store) return fail(why);
  const KVSpec& spec = store->spec();
  if (spec.device != device) {
    auto where = [](int32_t d) { return d < 0 ? std::string("cpu") : "cuda:" + std::to_string(d); };
    return fail("store " + std::to_string(store_id) + " lives on " + where(spec.device) +
                " but the op runs on " + where(device) +
                " (create the KVStore on the device the jitted step runs on)");
  }
  if (layer < 0 || layer >= spec.layers) {
    return fail("layer " + std::to_string(layer) + " outside [0, " +
                std::to_string(spec.layers) + ")");
  }
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || od.size() != 3) {
    return fail("q, k, v and out must have rank 3");
  }
  DType dt;
  if (!ffi_dtype_to_jvt(q.element_type(), &dt)) return fail("q dtype must be f32, f16 or bf16");
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type() ||
      out.element_type() != q.element_type()) {
    return fail("q, k, v and out must share one dtype");
  }
  if (dt != spec.dtype) return fail("q/k/v dtype differs from the store's dtype");
  const int64_t T = qd[0], Hq = qd[1], D = qd[2];
  if (kd[0] != T || vd[0] != T || od[0] != T) return fail("q, k, v, out row counts differ");
  if (kd[1] != spec.kv_heads || vd[1] != spec.kv_heads) {
    return fail("k/v heads must equal the store's kv_heads " + std::to_string(spec.kv_heads));
  }
  if (D != spec.head_dim || kd[2] != D || vd[2] != D) {
    return fail("head_dim must equal the store's head_dim " + std::to_string(spec.head_dim));
  }
  if (Hq <= 0 || Hq % spec.kv_heads != 0 || od[1] != Hq || od[2] != D) {
    return fail("q heads must be a positive multiple of kv_heads and match out");
  }
  for (auto* m : {&seq_start, &seq_slot, &seq_len}) {
    if (m->element_type() != xla::ffi::DataType::S32 || m->dimensions().size() != 1) {
      return fail("seq_start, seq_slot and seq_len must be int32 vectors");
    }
  }
  const int64_t S = seq_slot.dimensions()[0];
  if (seq_len.dimensions()[0] != S || seq_start.dimensions()[0] != S + 1) {
    return fail("seq_start must have S+1 entries and seq_slot, seq_len S entries");
  }
  // A failed mapping (driver or OS error) must not unwind through XLA's C frames.
  try {
    if (map_pending) store->apply_pending();
  } catch (const std::exception& e) {
    return Error::Internal(std::string("jvt_attention: mapping pending KV chunks failed: ") +
                           e.what());
  }
  const KVLayout& lay = store->layout();
  const int64_t layer_bytes = 2 * spec.kv_heads * spec.head_dim * lay.elem_bytes;
  *params = AttnParams{
      q.untyped_data(), k.untyped_data(), v.untyped_data(), out.untyped_data(),
      static_cast<const int32_t*>(seq_start.untyped_data()),
      static_cast<const int32_t*>(seq_slot.untyped_data()),
      static_cast<const int32_t*>(seq_len.untyped_data()),
      T, S, static_cast<int32_t>(Hq), spec.kv_heads, spec.head_dim, dt, scale,
      store->base(), lay.slot_stride, lay.token_bytes,
      layer * layer_bytes, layer * layer_bytes + layer_bytes / 2,
      spec.slots, store->capacity_table_device(), store->error_flag_device()};
  return Error::Success();
}

// Handlers (defined in attention_cpu.cc and cuda/attention_handler.cu). Binding:
//   Arg q, Arg k, Arg v, Arg seq_start, Arg seq_slot, Arg seq_len, Ret out,
//   Ret workspace, Attr<int32_t> store_id, Attr<int32_t> layer, Attr<float> scale,
//   Ctx<DeviceOrdinal> first (before it, on CUDA: Ctx<PlatformStream<cudaStream_t>>; on the
//   host: Ctx<ThreadPool>, XLA's intra-op pool). The
//   workspace (u8) is attention_workspace_bytes on CUDA and 1 byte, unused, on the host: one
//   call signature for both, so a host store reaching the CUDA handler gets its error, not a
//   result-count mismatch.
extern XLA_FFI_Handler* const kJvtAttentionCpu;
#ifdef JVT_WITH_CUDA
extern XLA_FFI_Handler* const kJvtAttentionCuda;
// Bytes of the CUDA handler's workspace result for a call of these static shapes (throws
// std::invalid_argument for shapes the kernels do not support).
int64_t attention_workspace_bytes(int64_t rows, int64_t seqs, int32_t q_heads, int32_t kv_heads,
                                  int32_t head_dim, DType dtype);
#endif

}  // namespace jvt
