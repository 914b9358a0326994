// What the host handlers (quant_cpu.cc, attention_cpu.cc) share: the choice of kernel version
// (instruction set), picked at run time so that the module builds for and runs on baseline
// x86-64, and parallel loops on XLA's intra-op thread pool with a policy deciding, per size
// of call, whether asking the pool for helpers pays.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#define JVT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define JVT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#endif

namespace jvt {

// Kernel versions: "avx512" needs AVX-512F, AVX2, FMA and F16C, "avx2" the last three,
// "scalar" (portable code) runs anywhere.
enum class CpuIsa : int32_t { kAvx512, kAvx2, kScalar };

// The versions this CPU can run, best first.
std::vector<std::string> cpu_isas();
// The version every host kernel uses: the best one unless set_cpu_isa chose another.
CpuIsa cpu_isa();
std::string cpu_isa_name();
// Selects a version for every later call of every host kernel (tests and benchmarks); false,
// changing nothing, when `name` is not one of cpu_isas().
bool set_cpu_isa(const std::string& name);

int64_t wall_ns();
void cpu_relax();

// Runs body(i) for every i in [0, items) on the calling thread and on up to `helpers` tasks
// of XLA's intra-op pool, each item claimed by one thread through an atomic counter. The call
// returns once every item is done. It never waits for a task the pool has not started (the
// pool may be busy with other thunks, or this call may run on one of its threads): the caller
// claims whatever is left itself, and a task that starts late finds nothing to claim and
// touches only the shared state, which it keeps alive.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, int64_t helpers, const F& body) {
  if (helpers == 0) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, items, &body] {
    int64_t n = 0;
    for (int64_t i = state->next++; i < items; i = state->next++) {
      body(i);
      ++n;
    }
    if (n && state->done.fetch_add(n, std::memory_order_acq_rel) + n == items) {
      std::lock_guard<std::mutex> lock(state->mu);  // no lost wake-up: the waiter holds mu
      state->all_done.notify_one();                 // between its check and its wait
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  auto finished = [&] { return state->done.load(std::memory_order_acquire) >= items; };
  // Only items that helpers are running remain. Spin a few microseconds (about one item), then
  // sleep: on a busy machine the helper may share this core, and spinning would starve it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
  while (!finished() && std::chrono::steady_clock::now() < deadline) cpu_relax();
  if (!finished()) {
    std::unique_lock<std::mutex> lock(state->mu);
    state->all_done.wait(lock, finished);
  }
}

// Whether a call asks the pool for helpers. They pay only where another core is free. On the
// 2-core build machine with nothing else running, a helper starts within 1-3 us and halves
// the LM head (2.2 -> 1.2 ms) and the MLP matmuls (65 -> 40 us); under a load of 3 the woken
// pool thread shares the caller's core, and helpers on every call made decode 15-20% slower.
// In the engine, between the calls of a decode step, the idle pool thread also falls asleep:
// waking it there made the attention and MLP matmuls 2-4.6x slower with a helper, while the LM
// head still gained. So each size class of call (log2 of its work, in the op's own unit) keeps
// a smoothed wall time per unit of work for both ways, runs the faster one, and every
// kExplore-th call the other, so that both follow the machine's load (exploring costs about
// 1.5% of a SmolLM2 decode step where helpers lose 2-4x; every 8th call cost 12%). One policy
// per op: their units differ.
class HelperPolicy {
 public:
  bool use(int64_t work);
  void record(int64_t work, bool helped, int64_t wall);

  // parallel_for over `items` with up to `wanted` helpers when this policy says they pay for
  // a call of `work` units (never when wanted is 0), timing the call for the policy.
  template <typename F>
  void run(xla::ffi::ThreadPool& pool, int64_t items, int64_t wanted, int64_t work,
           const F& body) {
    if (wanted <= 0) return parallel_for(pool, items, 0, body);
    const bool helped = use(work);
    const int64_t start = wall_ns();
    parallel_for(pool, items, helped ? wanted : 0, body);
    record(work, helped, wall_ns() - start);
  }

 private:
  static constexpr int kExplore = 64;
  static int size_class(int64_t work) { return 63 - __builtin_clzll(work); }
  struct Class {
    uint64_t calls = 0;
    double ns_per_unit[2] = {0, 0};  // alone, with helpers (0: not measured yet)
  };
  std::mutex mu_;
  Class classes_[64];
};

}  // namespace jvt
