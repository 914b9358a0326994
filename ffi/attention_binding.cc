// Python face of the attention handlers: registrations() -> {platform: {target: capsule}},
// registered from jvt/ops.py with jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>

#include "attention.h"

namespace nb = nanobind;

namespace jvt {
namespace {

nb::capsule handler_capsule(XLA_FFI_Handler* handler) {
  return nb::capsule(reinterpret_cast<void*>(handler));
}

}  // namespace

void bind_attention(nb::module_& m) {
  m.def(
      "registrations",
      []() {
        nb::dict platforms;
        nb::dict cpu;
        cpu["jvt_attention"] = handler_capsule(kJvtAttentionCpu);
        platforms["cpu"] = cpu;
        return platforms;
      },
      "FFI handler capsules by platform: {'cpu': {'jvt_attention': capsule}, 'CUDA': {...}} "
      "(the CUDA entry only when the module was built with CUDA).");
}

}  // namespace jvt
