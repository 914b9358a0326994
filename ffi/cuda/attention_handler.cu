// The CUDA handler of jvt_attention: host work (validation, the number of KV splits, carving
// the workspace) from static shapes only, then launches on XLA's stream:
// check_sequences -> append_kv -> split_kv_attention -> merge_splits (when split)
// -> plan_prefill_tiles -> prefill_attention (when a sequence may have >= 32 new rows).
// Host code never reads a device buffer; every per-row decision is made on the device.
//
// Command-buffer compatible: the host code computes the same launches from the same shapes
// every time, maps nothing (the engine applies pending KV mappings before it dispatches a
// step; a position beyond a slot's mapped capacity is still caught on the device by
// check_sequences), and its temporaries live in a workspace result that XLA allocates (no
// scratch allocation that a CUDA graph replay would outlive).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "cuda/append_kv.cuh"
#include "cuda/prefill_attention.cuh"
#include "cuda/split_kv_attention.cuh"

namespace jvt {
namespace {

namespace ffi = xla::ffi;
using cuda::SplitKV;

ffi::Error launch_error(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jvt_attention: launching ") + kernel + " failed: " +
                              cudaGetErrorString(err));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Query heads per CTA: the smallest of 1, 2, 4, 8 covering the GQA group, at most 8.
int heads_per_cta(int group) {
  int hb = 1;
  while (hb < group && hb < 8) hb *= 2;
  return hb;
}

// CTAs of `kernel` the whole GPU holds at once.
template <typename Kernel>
int64_t resident_ctas(Kernel kernel, int threads) {
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess) {
    cudaGetLastError();  // a failed query only costs a less tuned split count
    return 2 * 132;
  }
  return int64_t{sms} * std::max(per_sm, 1);
}

// FlashAttention-2's rule, from static shapes only: no split when the rows alone fill 80% of
// the GPU (prefill); otherwise the fewest splits whose last wave of CTAs is at least 85% as
// full as the best count's (decode).
int choose_splits(int64_t ctas, int64_t resident) {
  if (ctas * 5 >= resident * 4) return 1;
  double efficiency[cuda::kMaxSplits + 1] = {};
  double best = 0.0;
  for (int s = 1; s <= cuda::kMaxSplits; ++s) {
    const double waves = static_cast<double>(ctas * s) / resident;
    efficiency[s] = waves / std::ceil(waves);
    best = std::max(best, efficiency[s]);
  }
  for (int s = 1; s <= cuda::kMaxSplits; ++s) {
    if (efficiency[s] >= 0.85 * best) return s;
  }
  return 1;
}

// The plan of one call from its static shapes: KV splits and the workspace layout
// (seq_ok [S] and tile_start [S+1] int32, then, when split, partial_o and partial_lse).
struct CallPlan {
  int32_t num_splits;
  int32_t head_blocks;
  int64_t table_bytes;    // each of the two int32 tables, rounded to 256 bytes
  int64_t partial_bytes;  // partial outputs and log-sum-exps of the splits
  int64_t workspace_bytes() const { return 2 * table_bytes + partial_bytes; }
};

template <typename T, int D, int HB>
CallPlan plan_call(int64_t rows, int64_t seqs, int32_t q_heads, int32_t kv_heads) {
  using C = cuda::SplitKVConfig<D, HB>;
  // Queried once per kernel: the GPUs of one process are assumed alike.
  static const int64_t resident =
      resident_ctas(cuda::split_kv_attention_kernel<T, D, HB>, C::kThreads);
  CallPlan plan{};
  plan.head_blocks = (q_heads / kv_heads + HB - 1) / HB;
  plan.num_splits = choose_splits(rows * kv_heads * plan.head_blocks, resident);
  plan.table_bytes = ((seqs + 1) * 4 + 255) / 256 * 256;
  plan.partial_bytes =
      plan.num_splits > 1 ? plan.num_splits * rows * q_heads * (D + 1) * int64_t{sizeof(float)}
                          : 0;
  return plan;
}

// The launches for one (dtype, head_dim, heads per CTA).
template <typename T, int D, int HB>
ffi::Error run_attention(const AttnParams& p, ffi::AnyBuffer& workspace, cudaStream_t stream) {
  using C = cuda::SplitKVConfig<D, HB>;
  auto* kernel = cuda::split_kv_attention_kernel<T, D, HB>;
  const CallPlan plan = plan_call<T, D, HB>(p.num_rows, p.num_seqs, p.q_heads, p.kv_heads);
  if (static_cast<int64_t>(workspace.size_bytes()) < plan.workspace_bytes()) {
    return ffi::Error::InvalidArgument(
        "jvt_attention: workspace of " + std::to_string(workspace.size_bytes()) +
        " bytes, the call needs " + std::to_string(plan.workspace_bytes()) +
        " (size it with attention_workspace_bytes)");
  }
  SplitKV sk{};
  sk.head_blocks = plan.head_blocks;
  sk.num_splits = plan.num_splits;
  // The tensor-core kernel can only have work when some sequence may be long enough.
  const bool prefill = p.num_seqs > 0 && p.num_rows >= cuda::kPrefillMinRows;
  sk.prefill_min_rows = prefill ? cuda::kPrefillMinRows : INT32_MAX;
  auto* base = static_cast<uint8_t*>(workspace.untyped_data());
  auto* seq_ok = reinterpret_cast<int32_t*>(base);
  auto* tile_start = reinterpret_cast<int32_t*>(base + plan.table_bytes);
  const int64_t plane = p.num_rows * p.q_heads;
  if (sk.num_splits > 1) {
    sk.partial_o = reinterpret_cast<float*>(base + 2 * plan.table_bytes);
    sk.partial_lse = sk.partial_o + sk.num_splits * plane * D;
  }

  if (p.num_seqs > 0) {
    const unsigned blocks = static_cast<unsigned>((p.num_seqs + 127) / 128);
    cuda::check_sequences_kernel<<<blocks, 128, 0, stream>>>(p, seq_ok);
    if (ffi::Error err = launch_error("check_sequences"); err.failure()) return err;
  }
  const int64_t row_vecs = int64_t{p.kv_heads} * D * int64_t{sizeof(T)} / 16;
  const int64_t append_threads = p.num_rows * 2 * row_vecs;
  cuda::append_kv_kernel<<<static_cast<unsigned>((append_threads + 255) / 256), 256, 0,
                           stream>>>(p, seq_ok, row_vecs);
  if (ffi::Error err = launch_error("append_kv"); err.failure()) return err;

  const dim3 grid(static_cast<unsigned>(p.num_rows),
                  static_cast<unsigned>(p.kv_heads * sk.head_blocks),
                  static_cast<unsigned>(sk.num_splits));
  kernel<<<grid, C::kThreads, 0, stream>>>(p, sk, seq_ok);
  if (ffi::Error err = launch_error("split_kv_attention"); err.failure()) return err;
  if (sk.num_splits > 1) {
    const dim3 merge_grid(static_cast<unsigned>(p.num_rows), static_cast<unsigned>(p.q_heads));
    cuda::merge_splits_kernel<T><<<merge_grid, D, 0, stream>>>(p, sk);
    if (ffi::Error err = launch_error("merge_splits"); err.failure()) return err;
  }
  if (!prefill) return ffi::Error::Success();
  cuda::plan_prefill_tiles_kernel<<<1, 32, 0, stream>>>(p, seq_ok, tile_start);
  if (ffi::Error err = launch_error("plan_prefill_tiles"); err.failure()) return err;
  // At most ceil(n / 64) <= n / 64 + 1 tiles per long sequence; CTAs past the planned
  // tiles exit at once.
  const int64_t max_tiles = (p.num_rows + cuda::kTileRows - 1) / cuda::kTileRows +
                            std::min<int64_t>(p.num_seqs, p.num_rows / cuda::kPrefillMinRows);
  const dim3 prefill_grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(p.q_heads));
  cuda::prefill_attention_kernel<T, D><<<prefill_grid, 128, 0, stream>>>(p, seq_ok, tile_start);
  return launch_error("prefill_attention");
}

// The one place where runtime switches (dtype, head_dim, heads per CTA) become template
// constants.
template <typename T, int D>
ffi::Error dispatch_heads(const AttnParams& p, ffi::AnyBuffer& workspace, cudaStream_t stream) {
  switch (heads_per_cta(p.q_heads / p.kv_heads)) {
    case 1: return run_attention<T, D, 1>(p, workspace, stream);
    case 2: return run_attention<T, D, 2>(p, workspace, stream);
    case 4: return run_attention<T, D, 4>(p, workspace, stream);
    default: return run_attention<T, D, 8>(p, workspace, stream);
  }
}

template <typename T, int D>
int64_t plan_bytes(int64_t rows, int64_t seqs, int32_t q_heads, int32_t kv_heads) {
  switch (heads_per_cta(q_heads / kv_heads)) {
    case 1: return plan_call<T, D, 1>(rows, seqs, q_heads, kv_heads).workspace_bytes();
    case 2: return plan_call<T, D, 2>(rows, seqs, q_heads, kv_heads).workspace_bytes();
    case 4: return plan_call<T, D, 4>(rows, seqs, q_heads, kv_heads).workspace_bytes();
    default: return plan_call<T, D, 8>(rows, seqs, q_heads, kv_heads).workspace_bytes();
  }
}

template <typename T>
ffi::Error dispatch_head_dim(const AttnParams& p, ffi::AnyBuffer& workspace,
                             cudaStream_t stream) {
  if (p.head_dim == 64) return dispatch_heads<T, 64>(p, workspace, stream);
  return dispatch_heads<T, 128>(p, workspace, stream);
}

ffi::Error attention_cuda(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer q,
                          ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer seq_start,
                          ffi::AnyBuffer seq_slot, ffi::AnyBuffer seq_len,
                          ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::AnyBuffer> workspace, int32_t store_id,
                          int32_t layer, float scale) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    return ffi::Error::Internal("jvt_attention: cudaGetDevice failed: " +
                                std::string(cudaGetErrorString(cudaGetLastError())));
  }
  AttnParams p;
  if (ffi::Error err = prepare_attention(q, k, v, seq_start, seq_slot, seq_len, *out, store_id,
                                         layer, scale, ordinal, device,
                                         /*map_pending=*/false, &p);
      err.failure()) {
    return err;
  }
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "jvt_attention: the CUDA kernels support bf16 and f16, not f32");
  }
  if (p.head_dim != 64 && p.head_dim != 128) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "jvt_attention: the CUDA kernels support head_dim 64 and 128, got " +
                          std::to_string(p.head_dim));
  }
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out) ||
      !aligned16(p.kv_base) || p.token_bytes % 16 != 0 || p.slot_stride % 16 != 0) {
    return ffi::Error::Internal("jvt_attention: buffers and the KV layout must be 16-byte aligned");
  }
  if (p.num_rows == 0) return ffi::Error::Success();
  if (p.dtype == DType::kBF16) return dispatch_head_dim<__nv_bfloat16>(p, *workspace, stream);
  return dispatch_head_dim<__half>(p, *workspace, stream);
}

XLA_FFI_DEFINE_HANDLER(kHandler, attention_cuda,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()  // XLA's compute stream
                           .Ctx<ffi::DeviceOrdinal>()     // which member of a store group
                           .Arg<ffi::AnyBuffer>()         // q [T, Hq, D]
                           .Arg<ffi::AnyBuffer>()         // k [T, Hkv, D]
                           .Arg<ffi::AnyBuffer>()         // v [T, Hkv, D]
                           .Arg<ffi::AnyBuffer>()         // seq_start int32 [S+1]
                           .Arg<ffi::AnyBuffer>()         // seq_slot int32 [S]
                           .Arg<ffi::AnyBuffer>()         // seq_len int32 [S]
                           .Ret<ffi::AnyBuffer>()         // out [T, Hq, D]
                           .Ret<ffi::AnyBuffer>()         // workspace u8 [workspace bytes]
                           .Attr<int32_t>("store_id")
                           .Attr<int32_t>("layer")
                           .Attr<float>("scale"),
                       {ffi::Traits::kCmdBufferCompatible});

}  // namespace

XLA_FFI_Handler* const kJvtAttentionCuda = kHandler;

int64_t attention_workspace_bytes(int64_t rows, int64_t seqs, int32_t q_heads, int32_t kv_heads,
                                  int32_t head_dim, DType dtype) {
  if (q_heads <= 0 || kv_heads <= 0 || q_heads % kv_heads != 0 || rows < 0 || seqs < 0) {
    throw std::invalid_argument("attention_workspace_bytes: bad shapes");
  }
  if (head_dim != 64 && head_dim != 128) {
    throw std::invalid_argument("attention_workspace_bytes: head_dim must be 64 or 128");
  }
  const bool bf16 = dtype == DType::kBF16;
  if (!bf16 && dtype != DType::kF16) {
    throw std::invalid_argument("attention_workspace_bytes: dtype must be bf16 or f16");
  }
  if (head_dim == 64) {
    return bf16 ? plan_bytes<__nv_bfloat16, 64>(rows, seqs, q_heads, kv_heads)
                : plan_bytes<__half, 64>(rows, seqs, q_heads, kv_heads);
  }
  return bf16 ? plan_bytes<__nv_bfloat16, 128>(rows, seqs, q_heads, kv_heads)
              : plan_bytes<__half, 128>(rows, seqs, q_heads, kv_heads);
}

}  // namespace jvt
