// KVStore: chunk bookkeeping (pool, refcounts, budget, per-slot chunk lists), the background
// mapper thread, deferred unmapping (fence / retire) and the store registry.
// Design notes: docs/kv_store.md.
//
// Locking: `map_mu` serialises every backend call (create, map, unmap, copies) and is always
// taken before `mu`, which guards the bookkeeping. reserve / share / fence / stats only take
// `mu`, so the scheduler never waits on a driver call. A slot's `mapped` count changes only
// with both locks held.
#include "kv_store.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>

#include "backend.h"

namespace jvt {

int dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
  }
  throw std::invalid_argument("dtype: unknown value " + std::to_string(static_cast<int>(dtype)) +
                              " (allowed: 0=float32, 1=float16, 2=bfloat16)");
}

namespace {

constexpr int64_t kMaxChunkBytes = int64_t{1} << 30;     // keeps pathological lcm() out
constexpr int64_t kMaxReservation = int64_t{1} << 46;    // 64 TiB of virtual space per store

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_range(const char* name, int64_t v, int64_t lo, int64_t hi) {
  require(v >= lo && v <= hi, std::string(name) + "=" + std::to_string(v) + " out of range [" +
                                  std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

void validate_spec(const KVSpec& s) {
  check_range("layers", s.layers, 1, 4096);
  check_range("kv_heads", s.kv_heads, 1, 4096);
  check_range("head_dim", s.head_dim, 1, 4096);
  check_range("slots", s.slots, 1, 1 << 20);
  check_range("max_tokens", s.max_tokens, 1, INT32_MAX);
  check_range("device", s.device, -1, 1023);
  dtype_bytes(s.dtype);
}

KVLayout make_layout(const KVSpec& s, int64_t granularity) {
  KVLayout l;
  l.elem_bytes = dtype_bytes(s.dtype);
  l.token_bytes = int64_t{s.layers} * 2 * s.kv_heads * s.head_dim * l.elem_bytes;
  l.chunk_bytes = std::lcm(granularity, l.token_bytes);
  require(l.chunk_bytes <= kMaxChunkBytes,
          "chunk_bytes = lcm(" + std::to_string(granularity) + ", token_bytes=" +
              std::to_string(l.token_bytes) + ") = " + std::to_string(l.chunk_bytes) +
              " exceeds 1 GiB; choose layers/kv_heads/head_dim whose token size shares more "
              "factors of two with the granularity");
  l.tokens_per_chunk = l.chunk_bytes / l.token_bytes;
  l.chunks_per_slot = (s.max_tokens + l.tokens_per_chunk - 1) / l.tokens_per_chunk;
  l.slot_stride = l.chunks_per_slot * l.chunk_bytes;
  require(l.slot_stride <= kMaxReservation / s.slots,
          "slots * max_tokens too large: the reservation would be " + std::to_string(s.slots) +
              " x " + std::to_string(l.slot_stride) + " bytes (allowed: at most 2^46 bytes)");
  require(s.budget_bytes >= l.chunk_bytes,
          "budget_bytes=" + std::to_string(s.budget_bytes) + " holds no chunk (chunk_bytes=" +
              std::to_string(l.chunk_bytes) + "); allowed: budget_bytes >= chunk_bytes");
  l.budget_chunks = s.budget_bytes / l.chunk_bytes;
  return l;
}

struct Slot {
  std::vector<int64_t> chunks;  // chunk ids, in order; chunks[0..mapped) are mapped
  int64_t mapped = 0;           // chunks mapped in the virtual range
  int64_t reserved = 0;         // tokens reserved (max over reserve calls)
  bool queued = false;          // in the mapper queue
  bool draining = false;        // released, waiting for retire(tag)
  int64_t tag = 0;              // fence at release time
};

}  // namespace

struct KVStore::Impl {
  KVSpec spec;
  KVLayout layout;
  std::unique_ptr<Backend> backend;
  uint8_t* base = nullptr;
  int32_t* capacity_host = nullptr;
  int32_t* capacity_device = nullptr;
  int32_t* error_host = nullptr;
  int32_t* error_device = nullptr;

  std::mutex map_mu;                  // backend calls; taken before mu
  std::vector<char> created;          // per chunk id: physical chunk exists (under map_mu)
  std::atomic<int64_t> chunks_created{0};

  mutable std::mutex mu;              // bookkeeping below
  std::condition_variable cv;         // mapper wake-up: work queued or stop
  std::vector<Slot> slots;
  std::vector<int32_t> refcount;      // per allocated chunk id
  std::vector<int64_t> free_ids;      // pool, LIFO
  int64_t allocated = 0;              // chunk ids handed out by the pool so far (<= budget)
  std::deque<int32_t> queue;          // slots awaiting mapping; front may be in flight
  bool in_flight = false;             // queue.front() is being mapped
  std::atomic<int64_t> pending{0};    // queue.size(), for apply_pending's fast path
  int64_t fence = -1;
  int64_t retired = -1;
  bool stop = false;
  bool mapper_stalled = false;        // the mapper hit an error; apply_pending reports it
  std::thread mapper;

  void check_slot(const char* name, int64_t slot) const {
    check_range(name, slot, 0, spec.slots - 1);
  }

  void enqueue(int32_t slot) {  // under mu
    Slot& s = slots[slot];
    if (s.queued) return;
    s.queued = true;
    queue.push_back(slot);
    pending.store(static_cast<int64_t>(queue.size()), std::memory_order_release);
    mapper_stalled = false;
    cv.notify_one();
  }

  void set_capacity(int32_t slot, int64_t mapped_chunks) {  // under mu
    const int64_t tokens = std::min(mapped_chunks * layout.tokens_per_chunk, spec.max_tokens);
    __atomic_store_n(&capacity_host[slot], static_cast<int32_t>(tokens), __ATOMIC_RELEASE);
  }

  // Map the next queued extension. Caller holds map_mu. Returns false when the queue is empty.
  bool map_next() {
    int32_t slot;
    int64_t first;
    std::vector<int64_t> ids;
    {
      std::lock_guard<std::mutex> lk(mu);
      if (queue.empty()) return false;
      slot = queue.front();
      const Slot& s = slots[slot];
      first = s.mapped;
      ids.assign(s.chunks.begin() + first, s.chunks.end());
      in_flight = true;
    }
    try {
      for (int64_t id : ids) {
        if (created[id]) continue;
        backend->create_chunk(id);
        created[id] = 1;
        chunks_created.fetch_add(1, std::memory_order_relaxed);
      }
      if (!ids.empty()) backend->map(slot * layout.slot_stride + first * layout.chunk_bytes,
                                     ids.data(), static_cast<int64_t>(ids.size()));
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      in_flight = false;
      throw;
    }
    std::lock_guard<std::mutex> lk(mu);
    Slot& s = slots[slot];
    s.mapped = first + static_cast<int64_t>(ids.size());
    set_capacity(slot, s.mapped);
    queue.pop_front();
    in_flight = false;
    s.queued = false;
    // Grown again while we mapped: go round once more (unless released meanwhile).
    if (!s.draining && static_cast<int64_t>(s.chunks.size()) > s.mapped) {
      s.queued = true;
      queue.push_back(slot);
    }
    pending.store(static_cast<int64_t>(queue.size()), std::memory_order_release);
    return true;
  }

  void drain_queue() {
    std::lock_guard<std::mutex> m(map_mu);
    while (map_next()) {
    }
  }

  void mapper_loop() {
    try {
      backend->bind_thread();
    } catch (...) {
      // Not fatal: every backend call makes its context current itself; this only saves
      // that check on the hot path.
    }
    while (true) {
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return stop || (!queue.empty() && !mapper_stalled); });
        if (stop) return;
      }
      try {
        drain_queue();
      } catch (...) {
        // Leave the job queued: apply_pending retries it and raises on the engine's thread.
        std::lock_guard<std::mutex> lk(mu);
        mapper_stalled = true;
      }
    }
  }

  // Unmap and return to the pool every draining slot tagged <= limit. Caller holds map_mu.
  void unmap_retired(int64_t limit) {
    std::vector<std::pair<int32_t, int64_t>> victims;  // slot, mapped chunks
    {
      std::lock_guard<std::mutex> lk(mu);
      for (int32_t i = 0; i < spec.slots; ++i) {
        const Slot& s = slots[i];
        if (!s.draining || s.tag > limit) continue;
        // Capacity drops before the pages go: nothing in flight uses the slot any more.
        set_capacity(i, 0);
        victims.emplace_back(i, s.mapped);
      }
    }
    for (auto [slot, mapped] : victims)
      if (mapped > 0) backend->unmap(slot * layout.slot_stride, mapped);
    std::lock_guard<std::mutex> lk(mu);
    for (auto [slot, mapped] : victims) {
      for (int64_t id : slots[slot].chunks)
        if (--refcount[id] == 0) free_ids.push_back(id);
      slots[slot] = Slot{};
    }
  }

  void token_range(int32_t slot, int64_t pos, int32_t layer, const char* who) {
    check_slot("slot", slot);
    check_range("layer", layer, 0, spec.layers - 1);
    const int64_t cap = __atomic_load_n(&capacity_host[slot], __ATOMIC_ACQUIRE);
    require(pos >= 0 && pos < cap, std::string(who) + ": pos=" + std::to_string(pos) +
                                       " out of range [0, " + std::to_string(cap) +
                                       ") (the slot's mapped capacity)");
  }

  // Start of the slot's range after checking that its first n_tokens are mapped. Caller
  // holds map_mu, so no retire can unmap them before the copy is done.
  uint8_t* mapped_prefix(int32_t slot, int64_t n_tokens, const char* who) {
    check_slot("slot", slot);
    const int64_t cap = __atomic_load_n(&capacity_host[slot], __ATOMIC_ACQUIRE);
    require(n_tokens >= 0 && n_tokens <= cap,
            std::string(who) + ": n_tokens=" + std::to_string(n_tokens) + " out of range [0, " +
                std::to_string(cap) + "] (the mapped capacity of slot " + std::to_string(slot) +
                ")");
    return base + slot * layout.slot_stride;
  }

  uint8_t* token_ptr(int32_t slot, int64_t pos, int32_t layer) const {
    return base + slot * layout.slot_stride + pos * layout.token_bytes +
           int64_t{layer} * 2 * spec.kv_heads * spec.head_dim * layout.elem_bytes;
  }
};

KVStore::KVStore(const KVSpec& spec) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.spec = spec;
  validate_spec(spec);
  m.backend = spec.device < 0 ? make_host_backend() : make_cuda_backend(spec.device);
  m.layout = make_layout(spec, m.backend->granularity());
  m.base = m.backend->reserve(int64_t{spec.slots} * m.layout.slot_stride, m.layout.chunk_bytes);
  m.capacity_host = m.backend->alloc_shared_table(spec.slots, &m.capacity_device);
  m.error_host = m.backend->alloc_shared_table(1, &m.error_device);
  m.created.assign(m.layout.budget_chunks, 0);
  m.slots.resize(spec.slots);
  m.mapper = std::thread([this] { impl_->mapper_loop(); });
}

KVStore::~KVStore() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lk(m.mu);
    m.stop = true;
  }
  m.cv.notify_all();
  m.mapper.join();
  // Destructors must not throw: a failing driver at teardown leaves nothing to recover.
  try {
    for (int32_t i = 0; i < m.spec.slots; ++i)
      if (m.slots[i].mapped > 0) m.backend->unmap(i * m.layout.slot_stride, m.slots[i].mapped);
  } catch (...) {
  }
}

const KVSpec& KVStore::spec() const { return impl_->spec; }
const KVLayout& KVStore::layout() const { return impl_->layout; }
uint8_t* KVStore::base() const { return impl_->base; }
const int32_t* KVStore::capacity_table_device() const { return impl_->capacity_device; }
const int32_t* KVStore::capacity_table_host() const { return impl_->capacity_host; }
int32_t* KVStore::error_flag_device() const { return impl_->error_device; }

int32_t KVStore::take_error() { return __atomic_exchange_n(impl_->error_host, 0, __ATOMIC_ACQ_REL); }

void KVStore::reserve(int32_t slot, int64_t n_tokens) {
  Impl& m = *impl_;
  m.check_slot("slot", slot);
  check_range("n_tokens", n_tokens, 0, m.spec.max_tokens);
  std::lock_guard<std::mutex> lk(m.mu);
  Slot& s = m.slots[slot];
  require(!s.draining, "slot " + std::to_string(slot) +
                           " is draining (released, waiting for retire); it cannot be reserved "
                           "until retire(step) with step >= " + std::to_string(s.tag));
  const int64_t need = (n_tokens + m.layout.tokens_per_chunk - 1) / m.layout.tokens_per_chunk;
  const int64_t extra = need - static_cast<int64_t>(s.chunks.size());
  if (extra > 0) {
    const int64_t available =
        static_cast<int64_t>(m.free_ids.size()) + (m.layout.budget_chunks - m.allocated);
    if (extra > available)
      throw KVCacheFullError("KV cache full: slot " + std::to_string(slot) + " needs " +
                                 std::to_string(extra) + " more chunks (" +
                                 std::to_string(extra * m.layout.chunk_bytes) + " bytes), " +
                                 std::to_string(available) + " available (" +
                                 std::to_string(available * m.layout.chunk_bytes) + " bytes)",
                             extra, available);
    for (int64_t i = 0; i < extra; ++i) {
      int64_t id;
      if (!m.free_ids.empty()) {
        id = m.free_ids.back();
        m.free_ids.pop_back();
      } else {
        id = m.allocated++;
        m.refcount.push_back(0);
      }
      m.refcount[id] = 1;
      s.chunks.push_back(id);
    }
    m.enqueue(slot);
  }
  s.reserved = std::max(s.reserved, n_tokens);
}

void KVStore::set_budget_bytes(int64_t budget_bytes) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> mm(m.map_mu);
  std::lock_guard<std::mutex> lk(m.mu);
  const int64_t chunks = budget_bytes / m.layout.chunk_bytes;
  require(chunks >= 1 && chunks >= m.allocated,
          "set_budget_bytes: " + std::to_string(budget_bytes) + " bytes hold " +
              std::to_string(chunks) + " chunks of " + std::to_string(m.layout.chunk_bytes) +
              "; allowed: at least 1 and at least the " + std::to_string(m.allocated) +
              " chunks handed out");
  m.spec.budget_bytes = budget_bytes;
  m.layout.budget_chunks = chunks;
  m.created.resize(chunks, 0);
}

void KVStore::apply_pending() {
  if (impl_->pending.load(std::memory_order_acquire) == 0) return;
  impl_->drain_queue();
}

int64_t KVStore::share(int32_t dst, int32_t src, int64_t n_tokens) {
  Impl& m = *impl_;
  m.check_slot("dst", dst);
  m.check_slot("src", src);
  require(dst != src, "share: dst and src are the same slot " + std::to_string(dst));
  std::lock_guard<std::mutex> lk(m.mu);
  Slot& d = m.slots[dst];
  const Slot& s = m.slots[src];
  require(n_tokens >= 0 && n_tokens <= s.reserved,
          "share: n_tokens=" + std::to_string(n_tokens) + " out of range [0, " +
              std::to_string(s.reserved) + "] (the tokens reserved in src slot " +
              std::to_string(src) + ")");
  require(!d.draining, "share: dst slot " + std::to_string(dst) +
                           " is draining (released, waiting for retire)");
  require(d.chunks.empty(), "share: dst slot " + std::to_string(dst) + " is not empty (" +
                                std::to_string(d.reserved) + " tokens reserved); release it first");
  const int64_t whole = n_tokens / m.layout.tokens_per_chunk;
  if (whole == 0) return 0;
  d.chunks.assign(s.chunks.begin(), s.chunks.begin() + whole);
  for (int64_t id : d.chunks) ++m.refcount[id];
  d.reserved = whole * m.layout.tokens_per_chunk;
  m.enqueue(dst);
  return d.reserved;
}

void KVStore::release(int32_t slot) {
  Impl& m = *impl_;
  m.check_slot("slot", slot);
  std::lock_guard<std::mutex> mm(m.map_mu);
  bool queued;
  {
    std::lock_guard<std::mutex> lk(m.mu);
    const Slot& s = m.slots[slot];
    require(!s.draining, "release: slot " + std::to_string(slot) + " is already draining");
    queued = s.queued;
  }
  // A step enqueued before the release may still run its handler (apply_pending) and read
  // up to the reserved length: map the queued extension instead of dropping it.
  if (queued) {
    while (m.map_next()) {
    }
  }
  bool now;
  {
    std::lock_guard<std::mutex> lk(m.mu);
    Slot& s = m.slots[slot];
    if (s.chunks.empty()) {
      s = Slot{};
      return;
    }
    s.draining = true;
    s.tag = m.fence;
    now = s.tag <= m.retired;
  }
  // Every step enqueued so far has already retired: nothing on the device can touch the slot.
  if (now) m.unmap_retired(m.retired);
}

void KVStore::fence(int64_t step) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lk(m.mu);
  require(step >= m.fence, "fence: step=" + std::to_string(step) + " is below the current fence " +
                               std::to_string(m.fence) + " (fences are monotone)");
  m.fence = step;
}

void KVStore::retire(int64_t step) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> mm(m.map_mu);
  {
    std::lock_guard<std::mutex> lk(m.mu);
    require(step <= m.fence, "retire: step=" + std::to_string(step) +
                                 " is beyond the latest fence " + std::to_string(m.fence) +
                                 " (only enqueued steps can retire)");
    if (step <= m.retired) return;
    m.retired = step;
  }
  m.unmap_retired(step);
}

KVStats KVStore::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lk(m.mu);
  KVStats st;
  st.chunks_created = m.chunks_created.load(std::memory_order_relaxed);
  st.chunks_free = static_cast<int64_t>(m.free_ids.size());
  st.chunks_in_use = m.allocated - st.chunks_free;
  st.chunks_shared = std::count_if(m.refcount.begin(), m.refcount.end(),
                                   [](int32_t r) { return r > 1; });
  st.pending_jobs = static_cast<int64_t>(m.queue.size());
  st.fence_step = m.fence;
  st.retired_step = m.retired;
  for (int32_t i = 0; i < m.spec.slots; ++i) {
    const Slot& s = m.slots[i];
    st.mapped_bytes += s.mapped * m.layout.chunk_bytes;
    st.reserved_tokens.push_back(s.reserved);
    st.mapped_tokens.push_back(__atomic_load_n(&m.capacity_host[i], __ATOMIC_ACQUIRE));
    st.draining.push_back(s.draining ? 1 : 0);
  }
  return st;
}

std::vector<int64_t> KVStore::slot_chunks(int32_t slot) const {
  impl_->check_slot("slot", slot);
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->slots[slot].chunks;
}

void KVStore::write_token(int32_t slot, int64_t pos, int32_t layer, const void* src) {
  apply_pending();
  std::lock_guard<std::mutex> mm(impl_->map_mu);  // no retire can unmap meanwhile
  impl_->token_range(slot, pos, layer, "write_token");
  const int64_t bytes = 2 * int64_t{impl_->spec.kv_heads} * impl_->spec.head_dim *
                        impl_->layout.elem_bytes;
  impl_->backend->copy(impl_->token_ptr(slot, pos, layer), src, bytes);
}

void KVStore::read_token(int32_t slot, int64_t pos, int32_t layer, void* dst) {
  apply_pending();
  std::lock_guard<std::mutex> mm(impl_->map_mu);
  impl_->token_range(slot, pos, layer, "read_token");
  const int64_t bytes = 2 * int64_t{impl_->spec.kv_heads} * impl_->spec.head_dim *
                        impl_->layout.elem_bytes;
  impl_->backend->copy(dst, impl_->token_ptr(slot, pos, layer), bytes);
}

void KVStore::swap_out(int32_t slot, int64_t n_tokens, void* host) {
  apply_pending();
  std::lock_guard<std::mutex> mm(impl_->map_mu);
  uint8_t* src = impl_->mapped_prefix(slot, n_tokens, "swap_out");
  if (n_tokens > 0) impl_->backend->copy(host, src, n_tokens * impl_->layout.token_bytes);
}

void KVStore::swap_in(int32_t slot, int64_t n_tokens, const void* host) {
  apply_pending();
  std::lock_guard<std::mutex> mm(impl_->map_mu);
  uint8_t* dst = impl_->mapped_prefix(slot, n_tokens, "swap_in");
  if (n_tokens > 0) impl_->backend->copy(dst, host, n_tokens * impl_->layout.token_bytes);
}

// ---- registry --------------------------------------------------------------------------

namespace {
std::mutex g_registry_mu;
std::map<int32_t, std::shared_ptr<KVStore>> g_registry;
std::map<int32_t, std::map<int32_t, int32_t>> g_groups;  // group id -> ordinal -> store id
int32_t g_next_id = 1;
}  // namespace

int32_t register_store(std::shared_ptr<KVStore> store) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  const int32_t id = g_next_id++;
  g_registry.emplace(id, std::move(store));
  return id;
}

void unregister_store(int32_t id) {
  std::shared_ptr<KVStore> last;  // destroyed outside the lock (joins the mapper thread)
  std::lock_guard<std::mutex> lk(g_registry_mu);
  auto it = g_registry.find(id);
  if (it == g_registry.end()) return;
  last = std::move(it->second);
  g_registry.erase(it);
}

std::shared_ptr<KVStore> find_store(int32_t id) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  auto it = g_registry.find(id);
  return it == g_registry.end() ? nullptr : it->second;
}

int32_t register_group(const std::vector<std::pair<int32_t, int32_t>>& ordinal_and_store) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  std::map<int32_t, int32_t> members;
  for (const auto& [ordinal, store_id] : ordinal_and_store) {
    if (g_registry.count(store_id) == 0) {
      throw std::invalid_argument("register_group: unknown store id " +
                                  std::to_string(store_id));
    }
    if (!members.emplace(ordinal, store_id).second) {
      throw std::invalid_argument("register_group: device ordinal " + std::to_string(ordinal) +
                                  " given twice");
    }
  }
  const int32_t id = g_next_id++;
  g_groups.emplace(id, std::move(members));
  return id;
}

void unregister_group(int32_t id) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  g_groups.erase(id);
}

std::vector<std::pair<int32_t, int32_t>> group_members(int32_t id) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  auto group = g_groups.find(id);
  if (group == g_groups.end()) return {};
  return {group->second.begin(), group->second.end()};
}

std::shared_ptr<KVStore> find_store_for(int32_t id, int32_t ordinal, std::string* why) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  auto group = g_groups.find(id);
  if (group != g_groups.end()) {
    auto member = group->second.find(ordinal);
    if (member == group->second.end()) {
      *why = "store group " + std::to_string(id) + " has no store for device ordinal " +
             std::to_string(ordinal);
      return nullptr;
    }
    id = member->second;
  }
  auto it = g_registry.find(id);
  if (it == g_registry.end()) {
    *why = "unknown store_id " + std::to_string(id);
    return nullptr;
  }
  return it->second;
}

#ifndef JVT_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int32_t device) {
  throw std::runtime_error("CUDA backend unavailable: jvt was built without CUDA (no nvcc)");
}

bool cuda_backend_available(std::string* why) {
  if (why != nullptr) *why = "jvt was built without CUDA (no nvcc)";
  return false;
}

void cuda_mem_info(int32_t device, int64_t* free_bytes, int64_t* total_bytes) {
  throw std::runtime_error("CUDA backend unavailable: jvt was built without CUDA (no nvcc)");
}
#endif

}  // namespace jvt
