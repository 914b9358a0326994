// nanobind face of the KV store: jvt._native.KVStore (wrapped by jvt/kv.py), the registry
// lookup for tests, CUDA availability, and native timing loops for bench/vmm.py.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <thread>

#include "backend.h"
#include "kv_store.h"

namespace nb = nanobind;

namespace jvt {
namespace {

PyObject* g_kv_full_type = nullptr;  // jvt._native.KVCacheFullError(message, needed, available)

// Owns one registered store; the registry keeps its own reference so an FFI handler that
// found the store keeps it alive until the call returns, even across close().
struct NativeStore {
  std::shared_ptr<KVStore> store;
  int32_t id = 0;

  NativeStore(int32_t layers, int32_t kv_heads, int32_t head_dim, int32_t dtype, int32_t slots,
              int64_t max_tokens, int64_t budget_bytes, int32_t device) {
    KVSpec spec;
    spec.layers = layers;
    spec.kv_heads = kv_heads;
    spec.head_dim = head_dim;
    spec.dtype = static_cast<DType>(dtype);
    spec.slots = slots;
    spec.max_tokens = max_tokens;
    spec.budget_bytes = budget_bytes;
    spec.device = device;
    store = std::make_shared<KVStore>(spec);
    id = register_store(store);
  }
  ~NativeStore() { close(); }

  void close() {
    if (!store) return;
    unregister_store(id);
    store.reset();
  }

  KVStore& get() const {
    if (!store) throw std::runtime_error("KVStore is closed");
    return *store;
  }
};

nb::dict stats_dict(const KVStats& s) {
  nb::dict d;
  d["chunks_created"] = s.chunks_created;
  d["chunks_in_use"] = s.chunks_in_use;
  d["chunks_free"] = s.chunks_free;
  d["chunks_shared"] = s.chunks_shared;
  d["mapped_bytes"] = s.mapped_bytes;
  d["pending_jobs"] = s.pending_jobs;
  d["fence_step"] = s.fence_step;
  d["retired_step"] = s.retired_step;
  d["reserved_tokens"] = s.reserved_tokens;
  d["mapped_tokens"] = s.mapped_tokens;
  d["draining"] = s.draining;
  return d;
}

int64_t token_kv_bytes(const KVStore& s) {
  return 2 * int64_t{s.spec().kv_heads} * s.spec().head_dim * s.layout().elem_bytes;
}

// Host buffers of swap_out / swap_in: flat uint8 numpy arrays, never converted (a converted
// copy would receive swap_out's bytes instead of the caller's array).
using HostOut = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using HostIn = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

void check_swap_size(const KVStore& s, const char* who, int64_t n_tokens, size_t size) {
  const int64_t want = n_tokens * s.layout().token_bytes;
  if (static_cast<int64_t>(size) != want)
    throw std::invalid_argument(std::string(who) + ": the host buffer has " +
                                std::to_string(size) + " bytes, expected n_tokens=" +
                                std::to_string(n_tokens) + " * token_bytes=" +
                                std::to_string(s.layout().token_bytes));
}

using Clock = std::chrono::steady_clock;

double elapsed_ns(Clock::time_point t0) {
  return std::chrono::duration<double, std::nano>(Clock::now() - t0).count();
}

}  // namespace

void bind_kv_store(nb::module_& m) {
  g_kv_full_type = PyErr_NewException("jvt._native.KVCacheFullError", PyExc_RuntimeError, nullptr);
  m.attr("KVCacheFullError") = nb::handle(g_kv_full_type);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const KVCacheFullError& e) {
      PyObject* args = Py_BuildValue("(sLL)", e.what(), static_cast<long long>(e.needed_chunks),
                                     static_cast<long long>(e.available_chunks));
      PyErr_SetObject(g_kv_full_type, args);
      Py_XDECREF(args);
    }
  });

  using G = nb::call_guard<nb::gil_scoped_release>;
  nb::class_<NativeStore>(m, "KVStore")
      .def(nb::init<int32_t, int32_t, int32_t, int32_t, int32_t, int64_t, int64_t, int32_t>(),
           nb::arg("layers"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("dtype"),
           nb::arg("slots"), nb::arg("max_tokens"), nb::arg("budget_bytes"), nb::arg("device"),
           G())
      .def("close", &NativeStore::close, G())
      .def_prop_ro("closed", [](const NativeStore& s) { return !s.store; })
      .def_prop_ro("store_id", [](const NativeStore& s) { s.get(); return s.id; })
      .def("layout",
           [](const NativeStore& s) {
             const KVLayout& l = s.get().layout();
             nb::dict d;
             d["elem_bytes"] = l.elem_bytes;
             d["token_bytes"] = l.token_bytes;
             d["chunk_bytes"] = l.chunk_bytes;
             d["tokens_per_chunk"] = l.tokens_per_chunk;
             d["chunks_per_slot"] = l.chunks_per_slot;
             d["slot_stride"] = l.slot_stride;
             d["budget_chunks"] = l.budget_chunks;
             return d;
           })
      .def("reserve", [](NativeStore& s, int32_t slot, int64_t n) { s.get().reserve(slot, n); },
           G())
      .def("apply_pending", [](NativeStore& s) { s.get().apply_pending(); }, G())
      .def("set_budget_bytes",
           [](NativeStore& s, int64_t bytes) { s.get().set_budget_bytes(bytes); },
           nb::arg("budget_bytes"), G())
      .def("share",
           [](NativeStore& s, int32_t dst, int32_t src, int64_t n) {
             return s.get().share(dst, src, n);
           },
           G())
      .def("release", [](NativeStore& s, int32_t slot) { s.get().release(slot); }, G())
      .def("fence", [](NativeStore& s, int64_t step) { s.get().fence(step); }, G())
      .def("retire", [](NativeStore& s, int64_t step) { s.get().retire(step); }, G())
      .def("stats", [](const NativeStore& s) { return stats_dict(s.get().stats()); })
      .def("slot_chunks", [](const NativeStore& s, int32_t slot) { return s.get().slot_chunks(slot); })
      .def("base", [](const NativeStore& s) { return reinterpret_cast<uintptr_t>(s.get().base()); })
      .def("capacity_table_ptr",
           [](const NativeStore& s) {
             return reinterpret_cast<uintptr_t>(s.get().capacity_table_device());
           })
      .def("error_flag_ptr",
           [](const NativeStore& s) {
             return reinterpret_cast<uintptr_t>(s.get().error_flag_device());
           })
      .def("capacity_table",
           [](const NativeStore& s) {
             const KVStore& k = s.get();
             const int32_t* t = k.capacity_table_host();
             std::vector<int32_t> out(k.spec().slots);
             for (size_t i = 0; i < out.size(); ++i) out[i] = __atomic_load_n(&t[i], __ATOMIC_ACQUIRE);
             return out;
           })
      .def("take_error", [](NativeStore& s) { return s.get().take_error(); })
      .def("write_token",
           [](NativeStore& s, int32_t slot, int64_t pos, int32_t layer, nb::bytes data) {
             KVStore& k = s.get();
             const int64_t want = token_kv_bytes(k);
             if (static_cast<int64_t>(data.size()) != want)
               throw std::invalid_argument("write_token: got " + std::to_string(data.size()) +
                                           " bytes, expected " + std::to_string(want) +
                                           " (K then V of one layer)");
             std::string copy(data.c_str(), data.size());
             nb::gil_scoped_release nogil;
             k.write_token(slot, pos, layer, copy.data());
           })
      .def("read_token",
           [](NativeStore& s, int32_t slot, int64_t pos, int32_t layer) {
             KVStore& k = s.get();
             std::string out(token_kv_bytes(k), '\0');
             {
               nb::gil_scoped_release nogil;
               k.read_token(slot, pos, layer, out.data());
             }
             return nb::bytes(out.data(), out.size());
           })
      .def("swap_out",
           [](NativeStore& s, int32_t slot, int64_t n_tokens, HostOut out) {
             KVStore& k = s.get();
             check_swap_size(k, "swap_out", n_tokens, out.size());
             nb::gil_scoped_release nogil;
             k.swap_out(slot, n_tokens, out.data());
           },
           nb::arg("slot"), nb::arg("n_tokens"), nb::arg("out").noconvert())
      .def("swap_in",
           [](NativeStore& s, int32_t slot, int64_t n_tokens, HostIn data) {
             KVStore& k = s.get();
             check_swap_size(k, "swap_in", n_tokens, data.size());
             nb::gil_scoped_release nogil;
             k.swap_in(slot, n_tokens, data.data());
           },
           nb::arg("slot"), nb::arg("n_tokens"), nb::arg("data").noconvert())
      // Benchmark helpers (bench/vmm.py): native loops, no Python in the timed region.
      .def("_bench_apply_pending",
           [](NativeStore& s, int64_t n) {
             KVStore& k = s.get();
             const auto t0 = Clock::now();
             for (int64_t i = 0; i < n; ++i) k.apply_pending();
             return elapsed_ns(t0) / static_cast<double>(n);
           },
           G())
      .def("_bench_reserve_to_mapped",
           [](NativeStore& s, int32_t slot, int64_t n_tokens) {
             // Reserve, then poll the capacity table until the background mapper has mapped
             // the extension (no apply_pending): the mapper's end-to-end latency.
             KVStore& k = s.get();
             const int64_t want = std::min<int64_t>(n_tokens, k.spec().max_tokens);
             const int32_t* cap = k.capacity_table_host();
             const auto t0 = Clock::now();
             k.reserve(slot, n_tokens);
             while (__atomic_load_n(&cap[slot], __ATOMIC_ACQUIRE) < want) std::this_thread::yield();
             return elapsed_ns(t0);
           },
           G())
      .def("_bench_reserve_apply",
           [](NativeStore& s, int32_t slot, int64_t n_tokens) {
             // Reserve and map on the calling thread: the synchronous cost of an extension.
             KVStore& k = s.get();
             const auto t0 = Clock::now();
             k.reserve(slot, n_tokens);
             k.apply_pending();
             return elapsed_ns(t0);
           },
           G());

  m.def("cuda_status", []() {
    std::string why;
    return cuda_backend_available(&why) ? std::string() : why;
  }, G());
  m.def("_cuda_mem_info", [](int32_t device) {
    int64_t free = 0, total = 0;
    cuda_mem_info(device, &free, &total);
    return nb::make_tuple(free, total);
  });
  m.def("_store_registered", [](int32_t id) { return find_store(id) != nullptr; });
  m.def(
      "register_group",
      [](const std::vector<std::pair<int32_t, int32_t>>& members) {
        try {
          return register_group(members);
        } catch (const std::invalid_argument& e) {
          throw nb::value_error(e.what());
        }
      },
      nb::arg("members"),
      "Register a tensor-parallel store group from [(device ordinal, store id)]; returns its "
      "id, which jvt_attention takes as store_id (each shard uses its device's store).");
  m.def("unregister_group", &unregister_group, nb::arg("group_id"));
  m.def("group_members", &group_members, nb::arg("group_id"),
        "[(device ordinal, store id)] of a store group; [] when group_id names no group.");
}

}  // namespace jvt
