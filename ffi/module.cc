// The nanobind extension jvt._native: the KV store class and the FFI handler capsules.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

namespace jvt {
void bind_kv_store(nb::module_& m);   // kv_binding.cc
void bind_attention(nb::module_& m);  // attention_binding.cc: registrations() and friends
}  // namespace jvt

NB_MODULE(_native, m) {
  m.doc() = "jvt native core: virtual-memory KV store and the jvt_attention XLA FFI handlers";
#ifdef JVT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  jvt::bind_kv_store(m);
  jvt::bind_attention(m);
}
