// Placeholder until the KV store binding lands (owned by the KV-store work).
#include <nanobind/nanobind.h>
namespace nb = nanobind;
namespace jvt {
void bind_kv_store(nb::module_& m) {}
}  // namespace jvt
