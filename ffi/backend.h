// The memory backend behind a KVStore: one virtual reservation, physical chunks mapped
// into it, and small tables that both the host and the device can reach. The store owns all
// bookkeeping (which chunk sits where, refcounts, budget); a backend only does what the OS or
// the CUDA driver is asked to do. Calls are serialised by the store (never concurrent).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace jvt {

class Backend {
 public:
  virtual ~Backend() = default;

  // Physical allocation granularity in bytes; chunk sizes are multiples of it.
  virtual int64_t granularity() const = 0;
  // Reserve `bytes` of virtual address space (no physical memory) for chunks of `chunk_bytes`.
  // Called once, before anything else below.
  virtual uint8_t* reserve(int64_t bytes, int64_t chunk_bytes) = 0;
  // Create physical chunk `id` (ids are dense from 0 but may be created in any order).
  virtual void create_chunk(int64_t id) = 0;
  // Map chunks ids[0..n) at consecutive chunk positions starting `offset` bytes into the
  // reservation, and make them readable and writable by the device.
  virtual void map(int64_t offset, const int64_t* ids, int64_t n) = 0;
  // Unmap n consecutive chunk positions starting `offset` bytes into the reservation.
  virtual void unmap(int64_t offset, int64_t n) = 0;
  // Make the backend's context current on the calling thread (the mapper thread calls it once).
  virtual void bind_thread() {}

  // Zeroed int32 [n] table written by the host and read/written by the device without copies.
  // Returns the host pointer; *device receives the pointer kernels use. Freed with the backend.
  virtual int32_t* alloc_shared_table(int64_t n, int32_t** device) = 0;
  // Copy bytes between host memory (pageable) and mapped store memory, either direction. The
  // copy is complete when the call returns: the destination holds every byte.
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
};

std::unique_ptr<Backend> make_host_backend();
// Throws std::runtime_error("CUDA backend unavailable: ...") where no driver or device exists.
std::unique_ptr<Backend> make_cuda_backend(int32_t device);
// cuMemGetInfo on the device's primary context: free and total bytes (tests and benchmarks).
void cuda_mem_info(int32_t device, int64_t* free_bytes, int64_t* total_bytes);

}  // namespace jvt
