// Python face of the attention handlers: registrations() -> {platform: {target: capsule}},
// registered from jvt/ops.py with jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "attention.h"
#include "cpu_kernels.h"
#include "quant.h"

namespace nb = nanobind;

namespace jvt {
namespace {

// Indexed by DType (kF32, kF16, kBF16); numpy/jax dtype names.
constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16"};

nb::capsule handler_capsule(XLA_FFI_Handler* handler) {
  return nb::capsule(reinterpret_cast<void*>(handler));
}

}  // namespace

void bind_attention(nb::module_& m) {
#ifdef JVT_WITH_CUDA
  m.def(
      "attention_workspace_bytes",
      [](int64_t rows, int64_t seqs, int32_t q_heads, int32_t kv_heads, int32_t head_dim,
         int32_t dtype) {
        try {
          return attention_workspace_bytes(rows, seqs, q_heads, kv_heads, head_dim,
                                           static_cast<DType>(dtype));
        } catch (const std::invalid_argument& e) {
          throw nb::value_error(e.what());
        }
      },
      nb::arg("rows"), nb::arg("seqs"), nb::arg("q_heads"), nb::arg("kv_heads"),
      nb::arg("head_dim"), nb::arg("dtype"),
      "Bytes of the CUDA handler's workspace result for a call of these static shapes "
      "(dtype: 1 float16, 2 bfloat16).");
#endif
  m.def(
      "registrations",
      []() {
        nb::dict platforms;
        nb::dict cpu;
        cpu["jvt_attention"] = handler_capsule(kJvtAttentionCpu);
        cpu["jvt_qmatmul"] = handler_capsule(kJvtQMatmulCpu);
        platforms["cpu"] = cpu;
#ifdef JVT_WITH_CUDA
        nb::dict cuda;
        cuda["jvt_attention"] = handler_capsule(kJvtAttentionCuda);
        platforms["CUDA"] = cuda;
#endif
        return platforms;
      },
      "FFI handler capsules by platform: {'cpu': {'jvt_attention': capsule, 'jvt_qmatmul': "
      "capsule}, 'CUDA': {'jvt_attention': capsule}} (the CUDA entry only when the module was "
      "built with CUDA).");
  // The host kernels' versions (cpu_kernels.h: jvt_qmatmul and jvt_attention on the CPU), for
  // tests and benchmarks.
  m.def("cpu_isas", &cpu_isas,
        "Versions of the host kernels (jvt_qmatmul, jvt_attention on the CPU) this CPU can run, "
        "best first ('avx512', 'avx2', 'scalar').");
  m.def("cpu_isa", &cpu_isa_name, "The host kernel version in use.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        if (!set_cpu_isa(name)) {
          throw nb::value_error(("cpu isa " + name + " is not available on this CPU").c_str());
        }
      },
      nb::arg("name"),
      "Use kernel version `name` (one of cpu_isas()) for every later host kernel call.");
  m.def(
      "attention_store_spec",
      [](int32_t store_id) -> nb::object {
        const auto members = group_members(store_id);
        std::shared_ptr<KVStore> store =
            find_store(members.empty() ? store_id : members.front().second);
        if (!store) return nb::none();
        const KVSpec& s = store->spec();
        nb::dict spec;
        spec["layers"] = s.layers;
        spec["kv_heads"] = s.kv_heads;
        spec["head_dim"] = s.head_dim;
        spec["dtype"] = std::string(kDTypeNames[static_cast<int>(s.dtype)]);
        spec["device"] = s.device;
        return spec;
      },
      nb::arg("store_id"),
      "The spec jvt_attention checks its operands against, for the store registered under "
      "store_id (for a group: its first member; all members share layers, kv_heads, head_dim "
      "and dtype): {layers, kv_heads, head_dim, dtype, device} (device -1: host store), or "
      "None.");
}

}  // namespace jvt
