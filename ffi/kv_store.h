// The native KV store: every slot is one contiguous virtual range, backed by physical
// chunks mapped on demand. This header is the contract between the store, the Python
// binding and the attention FFI handlers. See docs/kv_store.md.
//
// Layout (token-major, all layers interleaved):
//   slot s, token t, layer l, K|V kv (0|1), kv head h, element d lives at
//   base + s * slot_stride + t * token_bytes
//        + ((l * 2 + kv) * kv_heads + h) * head_dim * elem_bytes + d * elem_bytes
// chunk_bytes is a multiple of token_bytes (chunk_bytes = lcm(granularity, token_bytes)),
// so no token straddles a chunk and the address of a token is simply t * token_bytes.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace jvt {

enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
int dtype_bytes(DType dtype);

struct KVSpec {
  int32_t layers = 0;         // decoder layers stored per token
  int32_t kv_heads = 0;       // KV heads (per device shard)
  int32_t head_dim = 0;       // elements per head
  DType dtype = DType::kBF16; // element type of K and V
  int32_t slots = 0;          // sequences that can be resident at once
  int64_t max_tokens = 0;     // per-slot capacity limit (virtual)
  int64_t budget_bytes = 0;   // physical memory the pool may create, in bytes
  int32_t device = -1;        // -1: host backend; N >= 0: CUDA device N
};

// Derived sizes; computed once by the store from the spec and the backend granularity.
struct KVLayout {
  int64_t elem_bytes = 0;       // bytes per element
  int64_t token_bytes = 0;      // layers * 2 * kv_heads * head_dim * elem_bytes
  int64_t chunk_bytes = 0;      // lcm(granularity, token_bytes)
  int64_t tokens_per_chunk = 0; // chunk_bytes / token_bytes
  int64_t chunks_per_slot = 0;  // ceil(max_tokens / tokens_per_chunk)
  int64_t slot_stride = 0;      // chunks_per_slot * chunk_bytes
  int64_t budget_chunks = 0;    // budget_bytes / chunk_bytes (floor)
};

// Thrown when a reserve would need more physical chunks than the budget allows.
// The store's state is unchanged when it is thrown.
struct KVCacheFullError : std::runtime_error {
  KVCacheFullError(const std::string& what, int64_t needed, int64_t available)
      : std::runtime_error(what), needed_chunks(needed), available_chunks(available) {}
  int64_t needed_chunks;
  int64_t available_chunks;
};

struct KVStats {
  int64_t chunks_created = 0;  // physical chunks allocated from the driver/OS (never freed)
  int64_t chunks_in_use = 0;   // chunks referenced by at least one slot (incl. pending/draining)
  int64_t chunks_free = 0;     // created chunks sitting in the pool
  int64_t chunks_shared = 0;   // chunks with refcount > 1
  int64_t mapped_bytes = 0;    // bytes of virtual range currently backed (sum over slots)
  int64_t pending_jobs = 0;    // slots with an extension queued, not yet mapped
  int64_t fence_step = -1;     // latest fence(step); -1 before the first
  int64_t retired_step = -1;   // latest retire(step); -1 before the first
  std::vector<int64_t> reserved_tokens;  // per slot: tokens reserved (0 = empty)
  std::vector<int64_t> mapped_tokens;    // per slot: capacity actually mapped now
  std::vector<int32_t> draining;         // per slot: 1 while a release waits for retire
};

// Whether a CUDA store can be created here; on false, *why says what is missing.
bool cuda_backend_available(std::string* why);

class KVStore;

// Handlers find a store through a small integer id (an FFI attribute); never a raw pointer.
int32_t register_store(std::shared_ptr<KVStore> store);
void unregister_store(int32_t id);
std::shared_ptr<KVStore> find_store(int32_t id);  // nullptr when unknown

// A tensor-parallel group: one registered store per device, keyed by the device ordinal XLA
// runs a shard on. Group ids come from the same counter as store ids, so an id names either a
// store or a group. register_group throws std::invalid_argument for an unknown member id or a
// repeated ordinal.
int32_t register_group(const std::vector<std::pair<int32_t, int32_t>>& ordinal_and_store);
void unregister_group(int32_t id);
// The (ordinal, store id) members of group `id`, in ordinal order; empty when id is no group.
std::vector<std::pair<int32_t, int32_t>> group_members(int32_t id);
// The store `id` names for a handler running on device `ordinal`: the store itself, or the
// group's member for that ordinal; nullptr when there is none (*why says which).
std::shared_ptr<KVStore> find_store_for(int32_t id, int32_t ordinal, std::string* why);

class KVStore {
 public:
  explicit KVStore(const KVSpec& spec);  // throws std::invalid_argument on a bad spec
  ~KVStore();
  KVStore(const KVStore&) = delete;
  KVStore& operator=(const KVStore&) = delete;

  const KVSpec& spec() const;
  const KVLayout& layout() const;

  // Grow slot to hold at least n_tokens (monotone: a smaller n is a no-op). Budget is
  // accounted immediately (KVCacheFullError, state unchanged); the mapping itself is queued
  // for the background mapper thread.
  void reserve(int32_t slot, int64_t n_tokens);
  // Complete every queued extension on the calling thread. One atomic load when none is queued.
  void apply_pending();
  // Change the physical budget (chunks are created lazily, so this allocates nothing); throws
  // std::invalid_argument when it holds no chunk or fewer chunks than are handed out already.
  void set_budget_bytes(int64_t budget_bytes);
  // Map the whole chunks among the first n_tokens of src into the empty slot dst (refcounted,
  // zero copy). Returns the number of tokens shared (a multiple of tokens_per_chunk).
  int64_t share(int32_t dst, int32_t src, int64_t n_tokens);
  // Give the slot's chunks back. The unmapping waits until retire(step) with step >= the
  // fence current at release time; until then the slot is draining and cannot be reserved.
  void release(int32_t slot);
  // The engine's step counter as of the latest enqueued device work (monotone).
  void fence(int64_t step);
  // Every step <= step has finished on the device: unmap what was released up to it.
  void retire(int64_t step);

  KVStats stats() const;

  // For kernels. base(): start of the virtual reservation. capacity_table(): int32 [slots]
  // mapped capacity in tokens, readable by the device (host memory on the host backend,
  // host-mapped pinned memory on CUDA). error_flag(): int32, device-writable; nonzero after
  // a kernel saw a position beyond a slot's capacity.
  uint8_t* base() const;
  const int32_t* capacity_table_device() const;
  int32_t* error_flag_device() const;
  // Read and clear the error flag (host side).
  int32_t take_error();
  // Host view of the capacity table (the same memory the device reads).
  const int32_t* capacity_table_host() const;
  // The physical chunk ids backing a slot, in order (introspection for tests and stats).
  std::vector<int64_t> slot_chunks(int32_t slot) const;

  // Test hooks: copy one token's K and V of one layer in/out (bytes: 2 * kv_heads * head_dim *
  // elem_bytes, K then V). Complete pending mappings first; throw std::invalid_argument for a
  // position beyond the slot's mapped capacity.
  void write_token(int32_t slot, int64_t pos, int32_t layer, const void* src);
  void read_token(int32_t slot, int64_t pos, int32_t layer, void* dst);

  // Preemption by swapping: copy the first n_tokens * token_bytes bytes of the slot's
  // contiguous range (base + slot * slot_stride) out to / in from host memory. Complete pending
  // mappings first; throw std::invalid_argument unless 0 <= n_tokens <= the slot's mapped
  // capacity. The copy is complete when the call returns (Backend::copy). Precondition, the
  // caller's to keep: no enqueued device step still writes those positions (swap_out) or
  // touches the slot at all (swap_in).
  void swap_out(int32_t slot, int64_t n_tokens, void* host);
  void swap_in(int32_t slot, int64_t n_tokens, const void* host);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace jvt
