// Device-side view of a packed ragged batch: which sequence, slot and position a row
// belongs to, and whether that sequence passed the safety checks of attention.h.
//
// check_sequences_kernel runs first (one thread per sequence): it reads the capacity table
// once per sequence (it lives in host-mapped memory, far too slow to read from every
// thread), sets the store's error flag for a rejected sequence, and records each
// sequence's slot, or -1, in `seq_ok` (scratch). Every later kernel finds its row's sequence
// by binary search over seq_start and trusts only `seq_ok`.
#pragma once

#include <cstdint>

#include "attention.h"

namespace jvt::cuda {

constexpr int32_t kRowSkipped = -1;  // RowTarget::slot of padding rows and rejected sequences

struct RowTarget {
  int32_t slot;  // slot to read and write, or kRowSkipped (write nothing, output zero)
  int32_t pos;   // position of the row in its slot; its keys are positions [0, pos]
  int32_t rows;  // new rows of the row's sequence in this step
};

// 0 when sequence i may be read and written, -1 when it has no rows or is masked
// (kSlotMasked), else an AttnError.
__device__ __forceinline__ int32_t sequence_status(const AttnParams& p, int64_t i) {
  const int64_t start = p.seq_start[i], end = p.seq_start[i + 1];
  const int32_t slot = p.seq_slot[i];
  if (start == end || slot == kSlotMasked) return -1;
  const int64_t len = p.seq_len[i];
  // Same order of checks, hence the same error code, as the CPU handler.
  if (start < 0 || end < start || end > p.num_rows || len < end - start) return kAttnErrLength;
  if (slot < 0 || slot >= p.slots) return kAttnErrSlot;
  // volatile: the host mapper thread raises capacities in this host-mapped table.
  if (len > *reinterpret_cast<const volatile int32_t*>(p.capacity + slot)) {
    return kAttnErrCapacity;
  }
  return 0;
}

// seq_ok[i] = slot of sequence i when it passed the checks, kRowSkipped otherwise.
__global__ void check_sequences_kernel(AttnParams p, int32_t* seq_ok) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= p.num_seqs) return;
  const int32_t status = sequence_status(p, i);
  // A plain store, not an atomic: the flag may live in host-mapped memory, where device
  // atomics are not guaranteed; any nonzero code makes KVStore.check() raise.
  if (status > 0) *reinterpret_cast<volatile int32_t*>(p.error_flag) = status;
  seq_ok[i] = status == 0 ? p.seq_slot[i] : kRowSkipped;
}

// Row -> (slot, position). The sequence owning `row` is the last i with seq_start[i] <= row;
// rows outside its range (padding, or malformed metadata) and rejected sequences are skipped.
__device__ __forceinline__ RowTarget locate_row(const AttnParams& p, const int32_t* seq_ok,
                                                int64_t row) {
  if (p.num_seqs == 0) return {kRowSkipped, 0, 0};
  int64_t lo = 0, hi = p.num_seqs;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (p.seq_start[mid] <= row) lo = mid; else hi = mid;
  }
  const int64_t start = p.seq_start[lo], end = p.seq_start[lo + 1];
  if (row < start || row >= end || seq_ok[lo] == kRowSkipped) return {kRowSkipped, 0, 0};
  return {seq_ok[lo], static_cast<int32_t>(p.seq_len[lo] - (end - start) + (row - start)),
          static_cast<int32_t>(end - start)};
}

}  // namespace jvt::cuda
