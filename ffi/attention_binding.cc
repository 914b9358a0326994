// Placeholder until the attention FFI handlers land (owned by the attention-op work).
#include <nanobind/nanobind.h>
namespace nb = nanobind;
namespace jvt {
void bind_attention(nb::module_& m) {
  m.def("registrations", []() { return nb::dict(); });
}
}  // namespace jvt
