// Kernel version selection and the helper policy of cpu_kernels.h.
#include "cpu_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jvt {
namespace {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kScalar: return "scalar";
  }
  return "?";
}

const std::vector<CpuIsa>& available() {
  static const std::vector<CpuIsa> isas = [] {
    std::vector<CpuIsa> v;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f")) v.push_back(CpuIsa::kAvx512);
    if (avx2) v.push_back(CpuIsa::kAvx2);
#endif
    v.push_back(CpuIsa::kScalar);
    return v;
  }();
  return isas;
}

std::atomic<int32_t> g_isa{-1};  // the CpuIsa in use; -1: the best available

}  // namespace

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (CpuIsa isa : available()) names.emplace_back(isa_name(isa));
  return names;
}

CpuIsa cpu_isa() {
  const int32_t chosen = g_isa.load(std::memory_order_relaxed);
  return chosen < 0 ? available().front() : static_cast<CpuIsa>(chosen);
}

std::string cpu_isa_name() { return isa_name(cpu_isa()); }

bool set_cpu_isa(const std::string& name) {
  for (CpuIsa isa : available()) {
    if (name == isa_name(isa)) {
      g_isa.store(static_cast<int32_t>(isa));
      return true;
    }
  }
  return false;
}

int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

bool HelperPolicy::use(int64_t work) {
  Class& c = classes_[size_class(work)];
  std::lock_guard<std::mutex> lock(mu_);
  const bool faster = c.ns_per_unit[1] < c.ns_per_unit[0];
  return ++c.calls % kExplore == 0 ? !faster : faster;
}

void HelperPolicy::record(int64_t work, bool helped, int64_t wall) {
  Class& c = classes_[size_class(work)];
  const double t = static_cast<double>(wall) / work;
  std::lock_guard<std::mutex> lock(mu_);
  double& mean = c.ns_per_unit[helped];
  mean = mean == 0 ? t : mean + (t - mean) / 8;
}

}  // namespace jvt
